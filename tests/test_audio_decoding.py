"""Compressed audio is decoded to the end of the stream (not cut at libsndfile's length
estimate), within the duration limit; and a directory, FIFO, socket or device node passed as
a media file gets its own error from the one check every loader shares.

Every MP3 is encoded on the fly with PyAV's libmp3lame in ``tmp_path``; no binary is committed.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from anygpt import media
from anygpt.errors import MediaError
from anygpt.modalities import get_modality

RATE = 44100
FF_QP2LAMBDA = 118


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # av raises UnknownCodecError, a ValueError, or FFmpegError
        return False
    return True


needs_lame = pytest.mark.skipif(not _has_encoder("libmp3lame"),
                                reason="this FFmpeg build has no MP3 encoder (libmp3lame)")


def _signal(seconds: float, rate: int = RATE, *, loud_first: bool = True) -> np.ndarray:
    """Loud noise for 2 s (high-bitrate frames) and a quiet tone (low-bitrate frames): noise
    first, or (``loud_first=False``) a silent start and the noise at the end."""
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.3 * np.sin(2 * np.pi * 440 * t)
    noise = int(min(2.0, seconds / 4) * rate)
    rng = np.random.default_rng(0)
    if loud_first:
        sig[:noise] = 0.8 * rng.uniform(-1, 1, noise)
    else:
        sig[:rate // 2] = 0.0
        sig[-noise:] = 0.8 * rng.uniform(-1, 1, noise)
    return sig.astype(np.float32)


def write_mp3(path: Path, seconds: float = 16.0, *, vbr: bool = True, xing: bool = False,
              rate: int = RATE, loud_first: bool = True) -> Path:
    """An MP3 of ``seconds``; VBR (LAME quality 4) or 128 kbit/s CBR; with or without the Xing
    length header."""
    sig = _signal(seconds, rate, loud_first=loud_first)
    options = {} if xing else {"write_xing": "0"}
    with av.open(str(path), "w", format="mp3", options=options) as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout="mono")
        if vbr:
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 4 * FF_QP2LAMBDA
        else:
            stream.codec_context.bit_rate = 128_000
        for start in range(0, len(sig), 1152):
            frame = av.AudioFrame.from_ndarray(sig[None, start:start + 1152], format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _first_frame(data: bytes) -> bytes:
    """The bytes after any ID3v2 tag: the first MPEG frame's region."""
    if data[:3] == b"ID3":
        size = sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
        data = data[10 + size:]
    return data[:1500]


# ---------------------------------------------------------------------------------------------
# MP3: decoded to the end of the stream
# ---------------------------------------------------------------------------------------------


@needs_lame
def test_vbr_mp3_without_length_header_loads_whole(tmp_path):
    path = write_mp3(tmp_path / "vbr.mp3", 16.0, vbr=True, xing=False)
    head = _first_frame(path.read_bytes())
    assert not any(tag in head for tag in (b"Xing", b"Info", b"VBRI")), "fixture has a length header"
    estimate = sf.info(str(path))
    # The fixture reproduces the bug: libsndfile's estimate (first frame's bitrate) is far off.
    assert estimate.frames / estimate.samplerate < 12
    audio = get_modality("audio").load(path)
    assert audio.sample_rate == RATE and audio.waveform.ndim == 1
    assert abs(len(audio.waveform) / RATE - 16.0) < 0.2
    # The tone is there to the end (not silence or padding).
    assert np.abs(audio.waveform[-RATE:-RATE // 2]).max() > 0.1


@needs_lame
@pytest.mark.parametrize("xing", [False, True])
def test_cbr_mp3_round_trip(tmp_path, xing):
    path = write_mp3(tmp_path / "cbr.mp3", 3.0, vbr=False, xing=xing)
    audio = media.load_audio(path)
    source = _signal(3.0)
    assert audio.sample_rate == RATE
    assert abs(len(audio.waveform) - len(source)) < 0.05 * RATE
    # Encoder delay aside, the decoded tone matches the source.
    n = min(len(source), len(audio.waveform))
    tail = slice(int(2.5 * RATE), n - 2048)
    lag = int(np.argmax(np.correlate(audio.waveform[tail][:4096], source[tail][:2048], "valid")))
    assert lag < 2048
    corr = np.corrcoef(audio.waveform[tail.start + lag:tail.start + lag + 8192],
                       source[tail.start:tail.start + 8192])[0, 1]
    assert corr > 0.99


@needs_lame
def test_vbr_mp3_with_xing_header_loads_whole(tmp_path):
    path = write_mp3(tmp_path / "vbrx.mp3", 16.0, vbr=True, xing=True)
    audio = media.load_audio(path)
    assert abs(len(audio.waveform) / RATE - 16.0) < 0.1


TRAILING_TAGS = {
    "id3v1": b"TAG" + b"\0" * 125,
    "ape": b"APETAGEX" + b"\0" * 60000,
    "lyrics3": b"LYRICSBEGIN" + b"x" * 3000 + b"LYRICS200",
}


@needs_lame
@pytest.mark.parametrize("vbr", [False, True])
@pytest.mark.parametrize("tag", list(TRAILING_TAGS))
def test_complete_mp3_with_trailing_tag_is_not_called_truncated(tmp_path, tag, vbr):
    # libsndfile counts a trailing tag's bytes as audio in its length estimate, so fewer
    # samples than "declared" decode (once reported as truncated), or its decoder gives up on
    # the tag (once reported as unreadable); ffmpeg decodes these files completely.
    path = write_mp3(tmp_path / f"{tag}.mp3", 3.0, vbr=vbr)
    path.write_bytes(path.read_bytes() + TRAILING_TAGS[tag])
    assert abs(len(media.load_audio(path).waveform) / RATE - 3.0) < 0.1


@needs_lame
@pytest.mark.parametrize("xing", [False, True])
def test_cut_mp3_is_reported_truncated(tmp_path, xing):
    path = write_mp3(tmp_path / "whole.mp3", 4.0, xing=xing)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) * 2 // 3 + 7])  # inside a frame
    with pytest.raises(MediaError, match=r"cut\.mp3: the audio file is truncated \(the last"):
        media.load_audio(cut)


def _frame_starts(data: bytes) -> list[int]:
    from anygpt.media.audio import _mpeg_frame_length

    pos = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10])) \
        if data[:3] == b"ID3" else 0
    while _mpeg_frame_length(data[pos:pos + 4]) is None:
        pos += 1
    starts = []
    while pos < len(data) and (length := _mpeg_frame_length(data[pos:pos + 4])):
        starts.append(pos)
        pos += length
    return starts


@needs_lame
def test_mp3_cut_at_a_frame_boundary_is_caught_by_its_xing_header(tmp_path):
    path = write_mp3(tmp_path / "whole.mp3", 4.0, xing=True)
    data = path.read_bytes()
    starts = _frame_starts(data)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: starts[len(starts) // 2]])
    with pytest.raises(MediaError, match=r"truncated \(the MP3 header declares \d+ frames"):
        media.load_audio(cut)


@needs_lame
def test_mp3_duration_limit_stops_decoding(tmp_path, monkeypatch):
    path = write_mp3(tmp_path / "long.mp3", 16.0, xing=False)
    monkeypatch.setattr(media.audio, "MAX_AUDIO_SECONDS", 5.0)
    decoded = []
    real = av.AudioResampler

    class Counting:  # wraps the resampler (a final type) to count the decoded samples
        def __init__(self, *args, **kwargs):
            self._inner = real(*args, **kwargs)

        def resample(self, frame):
            out = self._inner.resample(frame)
            decoded.extend(f.samples for f in out)
            return out

    monkeypatch.setattr(av, "AudioResampler", Counting)
    with pytest.raises(MediaError, match=r"long\.mp3: audio is longer than the limit of 5 s"
                                         r" \(decoding stopped there\); trim it"):
        media.load_audio(path)
    # Decoding stopped at the limit, not at the end of the 16 s stream.
    assert sum(decoded) / RATE < 5.5


def test_wav_duration_limit_still_checked_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(2 * 8000, np.float32), 8000)
    monkeypatch.setattr(media.audio, "MAX_AUDIO_SECONDS", 1.0)
    with pytest.raises(MediaError, match="over the limit"):
        media.load_audio(path)


# ---------------------------------------------------------------------------------------------
# Not a regular file: one shared check, for every modality
# ---------------------------------------------------------------------------------------------

MODALITY_FILES = {"image": "x.png", "audio": "x.wav", "video": "x.mp4"}


def _load_without_blocking(modality: str, path: Path, seconds: float = 10.0) -> BaseException:
    """Run the public loader in a thread; fail if it blocks (a FIFO opened for reading would)."""
    result: list[BaseException | object] = []

    def target() -> None:
        try:
            get_modality(modality).load(path)
            result.append(object())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        # Unblock the reader (a writer opening the FIFO lets it return), then fail.
        if stat.S_ISFIFO(os.stat(path).st_mode):
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"loading {path} blocked")
    assert result and isinstance(result[0], MediaError), result
    return result[0]


@pytest.mark.parametrize("modality", list(MODALITY_FILES))
def test_directory_is_not_a_file(tmp_path, modality):
    path = tmp_path / MODALITY_FILES[modality]
    path.mkdir()
    exc = _load_without_blocking(modality, path)
    assert str(exc) == (f"{path}: is a directory, not a file; pass the path of the {modality}"
                        " file inside it")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
@pytest.mark.parametrize("modality", list(MODALITY_FILES))
def test_fifo_is_refused_without_blocking(tmp_path, modality):
    path = tmp_path / MODALITY_FILES[modality]
    os.mkfifo(path)
    exc = _load_without_blocking(modality, path)
    assert str(exc).startswith(f"{path}: is a FIFO (named pipe), not a file; pass a regular file")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets on this platform")
@pytest.mark.parametrize("modality", list(MODALITY_FILES))
def test_socket_is_refused(modality):
    folder = Path(tempfile.mkdtemp(prefix="ag", dir="/tmp" if os.path.isdir("/tmp") else None))
    path = folder / MODALITY_FILES[modality]  # short: socket paths are limited to ~100 bytes
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        exc = _load_without_blocking(modality, path)
        assert str(exc).startswith(f"{path}: is a socket, not a file; pass a regular file")
    finally:
        server.close()
        path.unlink(missing_ok=True)
        folder.rmdir()


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
@pytest.mark.parametrize("modality", list(MODALITY_FILES))
def test_device_node_is_refused(tmp_path, modality):
    link = tmp_path / MODALITY_FILES[modality]  # a suffix the modality accepts
    link.symlink_to("/dev/null")
    exc = _load_without_blocking(modality, link)
    assert str(exc).startswith(f"{link}: is a character device node, not a file")
    # Also without a suffix, straight to the loader.
    exc = _load_without_blocking(modality, Path("/dev/null"))
    assert "character device node" in str(exc)


def test_missing_file_and_broken_link_keep_their_messages(tmp_path):
    with pytest.raises(MediaError, match=r"nope\.wav: no such file"):
        get_modality("audio").load(tmp_path / "nope.wav")
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "deleted.png")
    with pytest.raises(MediaError, match=r"gone\.png: is a broken symbolic link"):
        get_modality("image").load(link)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_pipeline_refuses_a_fifo_and_a_directory(tiny_pipe, tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    folder = tmp_path / "photos.png"
    folder.mkdir()
    outcome: list[BaseException] = []

    def run() -> None:
        for kwargs in ({"audios": [fifo]}, {"images": [folder]}):
            try:
                tiny_pipe("hi", max_new_tokens=1, **kwargs)
            except MediaError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the pipeline blocked on a FIFO")
    assert [str(e) for e in outcome] == [
        f"{fifo}: is a FIFO (named pipe), not a file; pass a regular file (save the audio from"
        " the pipe to a file first)",
        f"{folder}: is a directory, not a file; pass the path of the image file inside it",
    ]

"""Audio: load and validate WAV, FLAC, Ogg and MP3 files, ImageBind's audio transform, and
writing 16-bit WAV.

Only numpy is imported with this module; soundfile, torch and torchaudio are imported by the
functions that need them.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anygpt.errors import MediaError
from anygpt.media.files import PathLike, _check_file, _suffix, _write_file
from anygpt.media.preprocessing import _check_sizes, _clip_bounds
from anygpt.types import Audio

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_AUDIO_SECONDS", "MAX_AUDIO_CHANNELS", "load_audio", "audio_to_encoder_input",
           "write_audio"]

logger = logging.getLogger(__name__)

# The limits are module-level, and read at call time, so that an application can tighten or
# relax them in one place: ``anygpt.media.audio.MAX_AUDIO_SECONDS``.

#: Longest accepted audio file, in seconds. Checked from the header before decoding where the
#: header gives an exact length (WAV, FLAC, Ogg); otherwise (MP3) while decoding, which stops
#: at the limit.
MAX_AUDIO_SECONDS = 600.0
#: Most channels accepted in an audio file (a corrupt header can claim thousands).
MAX_AUDIO_CHANNELS = 32

#: libsndfile major formats accepted by :func:`load_audio` (the WAV family, FLAC, Ogg, MP3).
AUDIO_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "OGG", "MP3")

# ImageBind preprocessing constants (imagebind/data.py).
AUDIO_SAMPLE_RATE = 16_000
AUDIO_CLIPS = 3
AUDIO_CLIP_SECONDS = 2
#: Defaults of the preprocessing's ``mel_bins`` and ``target_frames`` (ImageBind's); the encoder
#: passes its own (``audio_num_mel_bins``, ``audio_target_len``).
AUDIO_MEL_BINS = 128
AUDIO_TARGET_FRAMES = 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138
_FBANK_FRAME_MS = 25
_FBANK_SHIFT_MS = 10


def load_audio(audio: PathLike | Audio) -> Audio:
    """Load and validate an audio file; return a float32 :class:`~anygpt.types.Audio`.

    Accepted: WAV (incl. WAVE_FORMAT_EXTENSIBLE, RF64, W64), FLAC, Ogg (Vorbis, Opus) and MP3,
    through libsndfile (``soundfile``), at any sample rate and channel count. MP3 (and FLAC or
    Ogg whose header leaves the length unset) is decoded to the end of the stream with PyAV,
    not cut at libsndfile's length estimate. The waveform is
    (T,) for mono and (C, T) otherwise, with the file's sample rate, not resampled.

    Args:
        audio: a file path, or an :class:`Audio` to validate (float32 conversion included;
            integer PCM is scaled to [-1, 1]). The duration limit applies to files only.

    Raises:
        MediaError: missing, unreadable, empty, unsupported, corrupt or truncated file; no
            samples; non-finite samples; longer than :data:`MAX_AUDIO_SECONDS` or more than
            :data:`MAX_AUDIO_CHANNELS` channels (checked before decoding; the duration of an
            MP3, whose header has no exact length, while decoding, which stops at the limit).
    """
    if isinstance(audio, Audio):
        return _validate_audio(audio, "<audio>")
    path = _check_file(audio, "audio")
    data, sample_rate = _read_sound_file(path)
    waveform = data[:, 0] if data.shape[1] == 1 else data.T
    return _validate_audio(Audio(np.ascontiguousarray(waveform), sample_rate), str(path))


def _read_sound_file(path: Path) -> tuple[np.ndarray, int]:
    """Decode ``path`` into a (T, C) float32 array and its sample rate.

    libsndfile identifies the format and reads the header. WAV, FLAC and Ogg whose header
    gives the length are decoded by libsndfile (their lengths are exact: the WAV data chunk,
    FLAC's STREAMINFO, Ogg's last granule position). MP3 gives no exact length (libsndfile
    estimates it from the file size and the first frame's bitrate, which is wrong for variable
    bitrate files), and a FLAC or Ogg stream may leave the length unset: these are decoded to
    the end of the stream with PyAV, :data:`MAX_AUDIO_SECONDS` enforced while decoding.
    """
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as sound:
            fmt, rate, channels, declared = (sound.format, sound.samplerate, sound.channels,
                                             sound.frames)
            decode_to_end = fmt == "MP3" or (fmt in _COMPRESSED_FORMATS and declared <= 0)
            if decode_to_end:
                _check_audio_header(path, fmt, rate, channels, None)
            else:
                _check_audio_header(path, fmt, rate, channels, declared)
                data = sound.read(dtype="float32", always_2d=True)
                log = sound.extra_info
    except MediaError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, OSError) as exc:
        raise MediaError(_audio_open_message(path, exc)) from exc
    if decode_to_end:
        data, rate = _decode_to_end(path)
        if fmt == "MP3":
            short = _mp3_truncation(path)
            if short:
                raise MediaError(
                    f"{path}: the audio file is truncated ({short}); re-export or re-download it"
                )
        return data, rate
    _check_audio_complete(path, fmt, declared, len(data), log)
    return data, rate


#: Compressed libsndfile formats; their stream is decoded to the end when no exact length is
#: known (see :func:`_read_sound_file`).
_COMPRESSED_FORMATS = ("FLAC", "OGG", "MP3")


def _decode_to_end(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path`` with PyAV until the end of the stream.

    Decoding stops, with a :class:`MediaError`, as soon as the audio passes
    :data:`MAX_AUDIO_SECONDS` (a bogus or missing length cannot make it read without bound).
    """
    import av

    limit = MAX_AUDIO_SECONDS
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: the file holds no audio stream; pass an audio file")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or 0)
            channels = int(stream.codec_context.channels or 0)
            _check_audio_header(path, _suffix(path), rate, channels, None, check_format=False)
            max_samples = int(limit * rate)
            resampler = None
            chunks: list[np.ndarray] = []
            total = 0
            for frame in _decode_packets(path, container, stream):
                if resampler is None:
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray()
                    total += chunk.shape[1]
                    if total > max_samples:
                        raise MediaError(
                            f"{path}: audio is longer than the limit of {limit:.0f} s (decoding"
                            f" stopped there); trim it (e.g. ffmpeg -i in -t {limit:.0f}"
                            " out.wav)"
                        )
                    chunks.append(chunk)
            if resampler is not None:
                chunks.extend(out.to_ndarray() for out in resampler.resample(None))
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as exc:
        raise MediaError(_audio_open_message(path, exc)) from exc
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise MediaError(f"{path}: the audio has no samples (zero length); use a longer recording")
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if data.shape[1] > max_samples:  # the resampler's flush may add a few samples
        data = data[:, :max_samples]
    return np.ascontiguousarray(data.T), rate


def _decode_packets(path: Path, container: Any, stream: Any) -> Any:
    """The decoded frames of ``stream``; like ffmpeg, a packet that does not decode (junk or a
    tag between or after the frames) is skipped, and only a stream of which nothing decodes
    is an error."""
    import av

    decoded, skipped, last_error = 0, 0, None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.InvalidDataError as exc:
            skipped, last_error = skipped + 1, exc
            continue
        for frame in frames:
            decoded += 1
            yield frame
    if skipped:
        logger.debug("%s: skipped %d undecodable packet(s): %s", path, skipped, last_error)
        if not decoded:
            raise MediaError(_audio_open_message(path, last_error))


# MPEG audio frame header tables: bitrates (kbit/s) by (version is MPEG-1, layer), sample rates.
_MPEG_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mpeg_frame_length(header: bytes) -> int | None:
    """Length in bytes of the MPEG audio frame starting with ``header`` (4 bytes), or None."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version = (header[1] >> 3) & 3  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5, 1: reserved
    layer = 4 - ((header[1] >> 1) & 3)  # 1, 2, 3 (4: reserved)
    bitrate_index, rate_index = header[2] >> 4, (header[2] >> 2) & 3
    if version == 1 or layer == 4 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _MPEG_BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    rate = _MPEG_RATES[version][rate_index]
    padding = (header[2] >> 1) & 1
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4
    if layer == 3 and not mpeg1:
        return 72 * bitrate // rate + padding
    return 144 * bitrate // rate + padding


def _mp3_truncation(path: Path) -> str | None:
    """Detect an MP3 cut short: the last frame runs past the end of the file, or a Xing/Info
    or VBRI header declares more frames than the file holds.

    The stream itself was already decoded to its end, so this only tells a damaged file from a
    complete one; trailing tags (ID3v1, APE) end the frame walk without a complaint.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(10)
        pos = 0
        if head[:3] == b"ID3" and len(head) == 10:  # ID3v2: a syncsafe size, and a footer flag
            pos = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
            pos += 10 if head[5] & 0x10 else 0
        handle.seek(pos)
        window = handle.read(64 * 1024)  # the first frame, after any junk
        start = next((i for i in range(len(window) - 3)
                      if _mpeg_frame_length(window[i:i + 4])), None)
        if start is None:
            return None
        pos += start
        handle.seek(pos)
        first = handle.read(_mpeg_frame_length(window[start:start + 4]) or 0)
        declared = _mp3_declared_frames(first)
        frames = 0
        while pos < size:
            handle.seek(pos)
            length = _mpeg_frame_length(handle.read(4))
            if length is None:
                break
            if pos + length > size:
                return (f"the last MPEG frame needs {length} bytes but only {size - pos}"
                        " are left in the file")
            frames += 1
            pos += length
    # Encoders disagree on whether the count includes the Xing/Info frame itself; comparing
    # with all frames walked (that one included) never flags a complete file.
    if declared is not None and frames < declared:
        return f"the MP3 header declares {declared} frames but only {frames} are present"
    return None


def _mp3_declared_frames(frame: bytes) -> int | None:
    """The frame count of a Xing/Info or VBRI header in the first MPEG frame, if it has one."""
    for tag in (b"Xing", b"Info"):
        at = frame.find(tag, 4, 64)
        if at >= 0 and len(frame) >= at + 12 and struct.unpack(">I", frame[at + 4:at + 8])[0] & 1:
            return struct.unpack(">I", frame[at + 8:at + 12])[0]
    if frame[36:40] == b"VBRI" and len(frame) >= 54:  # id, version, delay, quality, bytes, frames
        return struct.unpack(">I", frame[50:54])[0]
    return None


def _audio_open_message(path: Path, exc: Exception) -> str:
    """Explain a libsndfile failure: unsupported format or damaged file."""
    detail = str(exc).replace(f"Error opening {str(path)!r}: ", "").rstrip(".")
    if "does not exist or is not a regular file" in detail:
        # libsndfile's MP3 reader says this when it finds no MPEG frame; the file does exist.
        detail = "no valid audio frames found"
    suffix = _suffix(path)
    if suffix not in ("WAV", "WAVE", "FLAC", "OGG", "OGA", "OPUS", "MP3"):
        return (
            f"{path}: unsupported audio format {suffix} ({detail}); convert it to WAV or FLAC"
            " (e.g. ffmpeg -i input output.wav)"
        )
    return (
        f"{path}: not a readable {suffix} file ({detail}); the file is corrupt, truncated or"
        " mislabelled: re-export it as WAV or FLAC"
    )


def _check_audio_header(path: Path, fmt: str, rate: int, channels: int, frames: int | None,
                        *, check_format: bool = True) -> None:
    """Validate format, rate, channels and duration from the header, before decoding.

    ``frames`` is None where the header gives no exact length (the duration limit is then
    enforced while decoding, see :func:`_decode_to_end`).
    """
    if check_format and fmt not in AUDIO_FORMATS:
        raise MediaError(
            f"{path}: unsupported audio format {fmt} (need WAV, FLAC, OGG or MP3);"
            " convert it to WAV or FLAC"
        )
    if rate <= 0 or not 1 <= channels <= MAX_AUDIO_CHANNELS:
        raise MediaError(
            f"{path}: implausible header ({rate} Hz, {channels} channels; at most"
            f" {MAX_AUDIO_CHANNELS} channels are accepted); the file is corrupt or unusual:"
            " re-export it as mono or stereo WAV"
        )
    if frames is None:
        return
    if frames <= 0:
        raise MediaError(f"{path}: the audio has no samples (zero length); use a longer recording")
    if frames / rate > MAX_AUDIO_SECONDS:
        raise MediaError(
            f"{path}: audio is {frames / rate:.0f} s long, over the limit of"
            f" {MAX_AUDIO_SECONDS:.0f} s; trim it (e.g. ffmpeg -i in -t {MAX_AUDIO_SECONDS:.0f}"
            " out.wav)"
        )


def _check_audio_complete(path: Path, fmt: str, declared: int, decoded: int, log: str) -> None:
    """Detect truncation, which libsndfile mostly tolerates silently.

    * any format: fewer samples decoded than the header declares (MP3, FLAC);
    * WAV: the ``data`` chunk declares more bytes than the file holds (libsndfile shortens the
      stream to what is there);
    * Ogg: the last page lacks the end-of-stream flag (the writer never finished). A cut inside
      the final page goes unnoticed: libsndfile drops the partial page as "junk", which some
      valid files also carry (appended tags), so it is not treated as an error.
    """
    short = None
    if decoded < declared:
        short = f"the header declares {declared} samples but only {decoded} decode"
    elif fmt in ("WAV", "WAVEX"):
        short = _wav_truncation(path)
    elif fmt == "OGG" and "lacks an end-of-stream" in log:
        short = "the last Ogg page has no end-of-stream mark"
    if short:
        raise MediaError(
            f"{path}: the audio file is truncated ({short}); re-export or re-download it"
        )


def _wav_truncation(path: Path) -> str | None:
    """Compare the RIFF ``data`` chunk's declared size with the bytes actually present."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(12)[8:12] != b"WAVE":
            return None
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return None
            chunk, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk == b"data":
                available = file_size - handle.tell()
                # 0 and 0xFFFFFFFF are placeholders written by streaming encoders.
                if size not in (0, 0xFFFFFFFF) and size > available:
                    return f"the data chunk declares {size} bytes but {available} are present"
                return None
            handle.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to even sizes


def _validate_audio(audio: Audio, name: str) -> Audio:
    """Check an :class:`Audio` value and return it with a float32 waveform."""
    waveform = np.asarray(audio.waveform)
    if waveform.ndim not in (1, 2):
        raise MediaError(f"{name}: waveform has shape {waveform.shape}; expected (T,) or (C, T)")
    if waveform.ndim == 2 and waveform.shape[0] > MAX_AUDIO_CHANNELS:
        if waveform.shape[1] <= MAX_AUDIO_CHANNELS:
            raise MediaError(
                f"{name}: waveform has shape {waveform.shape}, which looks like (T, C);"
                " pass it channels-first as (C, T) (waveform.T)"
            )
        raise MediaError(
            f"{name}: waveform has {waveform.shape[0]} channels, over the limit of"
            f" {MAX_AUDIO_CHANNELS}; mix it down to mono or stereo"
        )
    if np.issubdtype(waveform.dtype, np.integer):
        waveform = waveform / float(np.iinfo(waveform.dtype).max)
    elif not np.issubdtype(waveform.dtype, np.floating):
        raise MediaError(f"{name}: waveform dtype {waveform.dtype} is not numeric; use float32")
    waveform = waveform.astype(np.float32, copy=False)
    rate = audio.sample_rate
    if not isinstance(rate, (int, float, np.number)) or rate <= 0 or rate != int(rate):
        raise MediaError(f"{name}: sample rate {rate!r} is not a positive integer")
    if waveform.shape[-1] == 0 or waveform.size == 0:
        raise MediaError(f"{name}: the audio has no samples (zero length); use a longer recording")
    if not np.isfinite(waveform).all():
        raise MediaError(
            f"{name}: the audio contains NaN or infinite samples; whatever produced it is broken:"
            " re-export the file (or clean the array with np.nan_to_num)"
        )
    return Audio(waveform=waveform, sample_rate=int(rate))


# ---------------------------------------------------------------------------------------------
# ImageBind preprocessing
# ---------------------------------------------------------------------------------------------


def audio_to_encoder_input(
    audio: PathLike | Audio,
    clips: int = AUDIO_CLIPS,
    *,
    mel_bins: int = AUDIO_MEL_BINS,
    target_frames: int = AUDIO_TARGET_FRAMES,
    **other_geometry: Any,
) -> "torch.Tensor":
    """ImageBind's audio transform: a float32 (clips, 1, mel_bins, target_frames) tensor of
    log-mel clips ((3, 1, 128, 204) with ImageBind's values).

    As ``imagebind.data.load_and_transform_audio_data``: resample to 16 kHz
    (``torchaudio.functional.resample`` defaults), cut ``clips`` clips of 2 s whose starts are
    spaced evenly over the waveform (pytorchvideo's ``ConstantClipsPerVideoSampler``, whose
    starts are ``i * (duration - 2) / clips``), remove each clip's mean, Kaldi fbank (128 mel
    bins, 25 ms Hanning window, 10 ms shift, HTK-compatible, no dither, no energy), zero-pad or
    crop to 204 frames, normalise with mean -4.268 and std 9.138. Audio shorter than 2 s gives
    ``clips`` identical clips of the whole waveform, padded.

    Differences: multi-channel audio is mixed to mono (ImageBind's fbank reads channel 0 only);
    each clip's mean is removed from a copy (ImageBind subtracts it in place from the shared
    waveform, which shifts later overlapping clips); clips shorter than one 25 ms window are
    zero-padded to one window (ImageBind fails on them).

    Args:
        audio: a path or :class:`Audio` (loaded through :func:`load_audio`).
        clips: number of clips (ImageBind: 3).
        mel_bins: mel filterbank bins (ImageBind: 128; the encoder's ``audio_num_mel_bins``).
        target_frames: frames each clip is padded or cropped to (ImageBind: 204; the
            encoder's ``audio_target_len``).
        other_geometry: ignored, so that any encoder's options dict can be passed whole.
    """
    import torch

    _check_sizes(mel_bins=mel_bins, target_frames=target_frames)
    loaded = load_audio(audio)
    mono = loaded.waveform if loaded.waveform.ndim == 1 else loaded.waveform.mean(axis=0)
    waveform = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0)
    resampled = _Resampled(waveform, loaded.sample_rate)
    # ImageBind computes the duration as a float and the clip bounds as Fractions: mirror it
    # so that sample boundaries match exactly.
    duration = resampled.length / AUDIO_SAMPLE_RATE
    specs = [
        _log_mel(resampled.slice(int(start * AUDIO_SAMPLE_RATE), int(end * AUDIO_SAMPLE_RATE)),
                 mel_bins, target_frames)
        for start, end in _clip_bounds(duration, AUDIO_CLIP_SECONDS, clips)
    ]
    return torch.stack(specs)


class _Resampled:
    """A (1, T) waveform as it would be resampled to 16 kHz, resampling only the parts asked for.

    The encoder reads three 2 s clips, however long the file: resampling all of a 10-minute
    file would cost far more than the clips. torchaudio's resampler maps each block of
    ``orig / gcd`` input samples to ``new / gcd`` output samples with a kernel a few input
    samples wide, so a slice resampled from a block-aligned stretch with a block or more of
    context on each side equals (to float rounding) that slice of the whole resampled waveform.
    """

    def __init__(self, waveform: "torch.Tensor", rate: int):
        import math

        self.waveform, self.rate = waveform, rate
        divisor = math.gcd(rate, AUDIO_SAMPLE_RATE)
        self.block_in, self.block_out = rate // divisor, AUDIO_SAMPLE_RATE // divisor
        length = waveform.shape[1]
        self.length = length if rate == AUDIO_SAMPLE_RATE else -(-length * self.block_out // self.block_in)
        # Context on each side, in blocks: the kernel spans about 6 input samples per output
        # sample at the lower rate (torchaudio's lowpass_filter_width=6, rolloff 0.99).
        self.context = 2 + math.ceil(6 * self.block_in / (min(self.block_in, self.block_out) * 0.99) / self.block_in)

    def slice(self, start: int, end: int) -> "torch.Tensor":
        """Output samples ``[start, end)`` at 16 kHz, (1, n)."""
        import torchaudio

        if self.rate == AUDIO_SAMPLE_RATE:
            return self.waveform[:, start:end]
        end = min(end, self.length)
        if end <= start:
            return self.waveform[:, :0]
        first = max(0, start // self.block_out - self.context)  # in blocks
        last = -(-end // self.block_out) + self.context
        piece = self.waveform[:, first * self.block_in:last * self.block_in]
        out = torchaudio.functional.resample(piece, self.rate, AUDIO_SAMPLE_RATE)
        offset = first * self.block_out
        return out[:, start - offset:end - offset]


def _log_mel(clip: "torch.Tensor", mel_bins: int, target_frames: int) -> "torch.Tensor":
    """One (1, T) 16 kHz clip → normalised (1, mel_bins, target_frames) log-mel spectrogram."""
    import torch
    import torchaudio

    clip = clip - clip.mean()
    window = AUDIO_SAMPLE_RATE * _FBANK_FRAME_MS // 1000
    if clip.shape[1] < window:
        clip = torch.nn.functional.pad(clip, (0, window - clip.shape[1]))
    fbank = torchaudio.compliance.kaldi.fbank(
        clip,
        htk_compat=True,
        sample_frequency=AUDIO_SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=mel_bins,
        dither=0.0,
        frame_length=_FBANK_FRAME_MS,
        frame_shift=_FBANK_SHIFT_MS,
    ).transpose(0, 1)
    missing = target_frames - fbank.shape[1]
    if missing > 0:
        fbank = torch.nn.functional.pad(fbank, (0, missing))
    fbank = fbank[:, :target_frames].unsqueeze(0)
    return (fbank - AUDIO_MEAN) / AUDIO_STD


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_audio(audio: Audio, path: PathLike) -> Path:
    """Write audio as a 16-bit PCM WAV at the audio's own sample rate.

    Samples outside [-1, 1] are clipped (libsndfile would otherwise wrap them around).
    """
    import soundfile as sf

    if not isinstance(audio, Audio):
        raise MediaError(
            f"{path}: cannot write a {type(audio).__name__} as audio; pass an anygpt.types.Audio"
        )
    audio = _validate_audio(audio, str(path))
    data = audio.waveform if audio.waveform.ndim == 1 else audio.waveform.T
    if np.abs(data).max() > 1.0:
        logger.debug("%s: clipping samples outside [-1, 1]", path)
        data = np.clip(data, -1.0, 1.0)

    def save(target: Path) -> None:
        sf.write(str(target), data, audio.sample_rate, format="WAV", subtype="PCM_16")

    return _write_file(path, "audio", save)


"""Media I/O: loading and validation, ImageBind preprocessing (at ImageBind's and at other
geometries), writing, and the modality registry that dispatches to them.

Every fixture is generated on the fly in ``tmp_path`` (Pillow, soundfile and PyAV write them);
no binary file is committed.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from anygpt import media
from anygpt.errors import MediaError, UnknownNameError
from anygpt.export import save_output
from anygpt.modalities import (
    MODALITIES,
    ModalitySpec,
    get_modality,
    modality_for_suffix,
    register_modality,
    unregister_modality,
)
from anygpt.types import Audio, GenerationOutput, MediaSegment, TextSegment, Video

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# Fixture builders
# ---------------------------------------------------------------------------------------------


def noise_image(height: int = 48, width: int = 64) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height`` 1-bit pixels, a token IDAT
    and IEND: a few dozen bytes that announce a huge image without holding its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def tone(rate: int, seconds: float, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A (T, C) float32 sine, a different frequency per channel."""
    t = np.arange(int(rate * seconds)) / rate
    cols = [0.4 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def write_test_video(path: Path, fmt: str, codec: str, n: int = 12, fps: int = 10,
                     size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Write ``n`` flat frames whose grey level encodes the frame index, with PyAV directly
    (independent of media.write_video). Returns the frames written."""
    height, width = size
    frames = np.stack([np.full((height, width, 3), 10 + 15 * (i % 16), np.uint8) for i in range(n)])
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    return frames


def assert_media_error(call, path: Path, *fragments: str) -> MediaError:
    """``call(path)`` raises MediaError naming the file and containing ``fragments``."""
    with pytest.raises(MediaError) as info:
        call(path)
    message = str(info.value)
    assert path.name in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return info.value


# ---------------------------------------------------------------------------------------------
# Images: loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix,lossless", [
    ("PNG", ".png", True), ("JPEG", ".jpg", False), ("WEBP", ".webp", False),
    ("GIF", ".gif", False), ("BMP", ".bmp", True),
])
def test_load_image_formats(tmp_path, fmt, suffix, lossless):
    pixels = noise_image()
    path = tmp_path / f"img{suffix}"
    Image.fromarray(pixels).save(path, format=fmt)
    image = media.load_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    if lossless:
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_load_image_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    assert np.asarray(media.load_image(path))[0, 0].tolist() == [255, 0, 0]


def test_load_image_modes(tmp_path):
    # RGBA: transparent pixels become white, opaque ones keep their colour.
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (10, 20, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(media.load_image(tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [10, 20, 30] and out[3, 3].tolist() == [255, 255, 255]
    # Palette with a transparent index.
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(media.load_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [200, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    # Greyscale, CMYK JPEG and 16-bit greyscale all come out RGB.
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert np.asarray(media.load_image(tmp_path / "l.png"))[0, 0].tolist() == [77, 77, 77]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(media.load_image(tmp_path / "cmyk.jpg"))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60
    Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)).save(tmp_path / "g16.png")
    assert np.asarray(media.load_image(tmp_path / "g16.png"))[0, 0].tolist() == [100, 100, 100]


def test_load_image_uses_content_and_exif(tmp_path):
    # A PNG named .jpg loads: the format comes from the content.
    Image.fromarray(noise_image()).save(tmp_path / "really_png.jpg", format="PNG")
    assert media.load_image(tmp_path / "really_png.jpg").size == (64, 48)
    # EXIF orientation 6 (rotate 90° clockwise to display) swaps width and height.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise_image(20, 40)).save(tmp_path / "rotated.jpg", exif=exif)
    assert media.load_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_load_image_accepts_pil_image():
    original = Image.fromarray(noise_image()).convert("RGBA")
    loaded = media.load_image(original)
    assert loaded.mode == "RGB" and original.mode == "RGBA"
    assert media.load_image(loaded).size == (64, 48)


def _truncated(fmt: str):
    def make(path: Path) -> None:
        buffer = io.BytesIO()
        Image.fromarray(noise_image(64, 64)).save(buffer, format=fmt)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return make


@pytest.mark.parametrize("name,make,fragments", [
    ("missing.png", None, ["no such file"]),
    ("empty.png", lambda p: p.write_bytes(b""), ["empty"]),
    ("noise.png", lambda p: p.write_bytes(os.urandom(2048)), ["not a valid PNG"]),
    ("cut.png", _truncated("PNG"), ["truncated"]),
    ("cut.jpg", _truncated("JPEG"), ["truncated"]),
    ("notes.txt", lambda p: p.write_text("hello\n" * 50), ["unsupported image format TXT", "PNG"]),
    ("photo.heic", lambda p: p.write_bytes(b"\0\0\0\x18ftypheic" + bytes(64)), ["HEIC", "convert"]),
    ("scan.tiff", lambda p: Image.new("RGB", (4, 4)).save(p, format="TIFF"), ["TIFF"]),
    ("huge.png", lambda p: p.write_bytes(png_header_only(20000, 20000)), ["megapixels"]),
    ("big.png", lambda p: p.write_bytes(png_header_only(9000, 9000)), ["9000x9000", "downscale"]),
])
def test_load_image_rejects(tmp_path, name, make, fragments):
    path = tmp_path / name
    if make:
        make(path)
    assert_media_error(media.load_image, path, *fragments)


def test_load_rejects_directory_and_non_path(tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for loader in (media.load_image, media.load_audio, media.load_video):
        assert_media_error(loader, folder, "directory")
    with pytest.raises(MediaError, match="pass a file path"):
        media.load_image(b"not a path")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_load_rejects_unreadable(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        assert_media_error(media.load_image, path, "permission denied")
    finally:
        path.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# Audio: loading
# ---------------------------------------------------------------------------------------------

AUDIO_FORMATS = [("WAV", "PCM_16", ".wav"), ("FLAC", "PCM_16", ".flac"),
                 ("OGG", "VORBIS", ".ogg"), ("MP3", "MPEG_LAYER_III", ".mp3")]


@pytest.mark.parametrize("fmt,subtype,suffix", AUDIO_FORMATS)
@pytest.mark.parametrize("rate", [8000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_load_audio_formats(tmp_path, fmt, subtype, suffix, rate, channels):
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    source = tone(rate, 0.5, channels)
    path = tmp_path / f"tone{suffix}"
    sf.write(path, source, rate, format=fmt, subtype=subtype)
    audio = media.load_audio(path)
    assert audio.sample_rate == rate and audio.waveform.dtype == np.float32
    expected_shape = (len(source),) if channels == 1 else (channels, len(source))
    if fmt in ("WAV", "FLAC"):
        assert audio.waveform.shape == expected_shape
        np.testing.assert_allclose(audio.waveform, source.T.squeeze(), atol=1e-4)
    else:  # lossy codecs may add or drop an encoder delay's worth of samples
        assert audio.waveform.shape[:-1] == expected_shape[:-1]
        assert abs(audio.waveform.shape[-1] - len(source)) < 0.1 * rate


def test_load_audio_opus(tmp_path):
    sf.write(tmp_path / "voice.ogg", tone(48000, 0.5), 48000, format="OGG", subtype="OPUS")
    audio = media.load_audio(tmp_path / "voice.ogg")
    assert audio.sample_rate == 48000 and audio.waveform.ndim == 1
    assert abs(len(audio.waveform) - 24000) < 4800


def test_load_audio_validates_in_memory_values():
    pcm = Audio(np.array([0, 16384, -32767], np.int16), 8000)
    np.testing.assert_allclose(media.load_audio(pcm).waveform, [0, 0.5, -1], atol=1e-4)
    with pytest.raises(MediaError, match="looks like"):
        media.load_audio(Audio(np.zeros((1000, 2), np.float32), 8000))
    with pytest.raises(MediaError, match="NaN"):
        media.load_audio(Audio(np.array([0.0, np.nan], np.float32), 8000))
    with pytest.raises(MediaError, match="no samples"):
        media.load_audio(Audio(np.zeros(0, np.float32), 8000))
    with pytest.raises(MediaError, match="sample rate"):
        media.load_audio(Audio(np.zeros(10, np.float32), 0))


def _truncated_audio(fmt: str, subtype: str, rate: int = 16000):
    """Half of a 1 s stereo file."""
    def make(path: Path) -> None:
        buffer = io.BytesIO()
        sf.write(buffer, tone(rate, 1.0, 2), rate, format=fmt, subtype=subtype)
        data = buffer.getvalue()
        path.write_bytes(data[: len(data) // 2])
    return make


@pytest.mark.parametrize("name,make,fragments", [
    ("missing.wav", None, ["no such file"]),
    ("empty.wav", lambda p: p.write_bytes(b""), ["empty"]),
    ("noise.wav", lambda p: p.write_bytes(os.urandom(4096)), ["not a readable WAV"]),
    ("noise.mp3", lambda p: p.write_bytes(os.urandom(4096)), ["not a readable MP3"]),
    ("cut.wav", _truncated_audio("WAV", "PCM_16"), ["truncated"]),
    ("cut.flac", _truncated_audio("FLAC", "PCM_16"), ["FLAC"]),
    ("cut.ogg", _truncated_audio("OGG", "VORBIS"), ["OGG"]),
    ("cut.mp3", _truncated_audio("MP3", "MPEG_LAYER_III"), ["truncated"]),
    # Cut between Ogg pages, Opus opens and decodes what is there; the missing EOS flag tells.
    ("cut_opus.ogg", _truncated_audio("OGG", "OPUS", 48000), ["truncated", "end-of-stream"]),
    ("notes.txt", lambda p: p.write_text("hello\n" * 50), ["unsupported audio format TXT"]),
    ("zero.wav", lambda p: sf.write(p, np.zeros(0, np.float32), 16000), ["no samples"]),
    ("many.wav", lambda p: sf.write(p, np.zeros((10, 40), np.float32), 8000), ["40 channels"]),
    ("sound.aiff", lambda p: sf.write(p, tone(8000, 0.1), 8000, format="AIFF"), ["AIFF"]),
])
def test_load_audio_rejects(tmp_path, name, make, fragments):
    path = tmp_path / name
    if make:
        make(path)
    assert_media_error(media.load_audio, path, *fragments)


def test_load_audio_duration_limit(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    sf.write(path, tone(8000, 2.0), 8000)
    monkeypatch.setattr(media.audio, "MAX_AUDIO_SECONDS", 1.0)
    assert_media_error(media.load_audio, path, "over the limit", "trim")


# ---------------------------------------------------------------------------------------------
# Video: loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,codec,suffix", [
    ("mp4", "libx264", ".mp4"), ("webm", "libvpx", ".webm"), ("mov", "libx264", ".mov"),
    ("matroska", "libx264", ".mkv"), ("avi", "mpeg4", ".avi"),
])
def test_load_video_formats(tmp_path, fmt, codec, suffix):
    path = tmp_path / f"clip{suffix}"
    written = write_test_video(path, fmt, codec, n=12, fps=10)
    video = media.load_video(path)
    assert video.frames.shape == (12, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(10)
    levels = video.frames.reshape(12, -1).mean(axis=1)
    np.testing.assert_allclose(levels, written.reshape(12, -1).mean(axis=1), atol=4)


@pytest.mark.parametrize("seek", [False, True], ids=["sequential", "seeking"])
def test_load_video_samples_evenly(tmp_path, monkeypatch, seek):
    path = tmp_path / "long.mp4"
    write_test_video(path, "mp4", "libx264", n=120, fps=30, size=(16, 16))
    if seek:
        monkeypatch.setattr(media.video, "SEEK_MIN_FRAMES", 50)
    video = media.load_video(path, max_frames=10)
    assert 5 <= video.num_frames <= 10
    assert video.duration == pytest.approx(4.0, abs=0.2)  # the source's duration is preserved
    levels = video.frames.reshape(video.num_frames, -1).mean(axis=1)
    kept = np.round(np.arange(video.num_frames) * 120 / video.num_frames).astype(int)
    np.testing.assert_allclose(levels, 10 + 15 * (kept % 16), atol=20)


def test_load_video_max_frames_none_keeps_all(tmp_path):
    path = tmp_path / "all.mp4"
    write_test_video(path, "mp4", "libx264", n=40, fps=25, size=(16, 16))
    assert media.load_video(path, max_frames=None).num_frames == 40
    assert media.load_video(path, max_frames=40).num_frames == 40


def test_load_video_validates_in_memory_values():
    video = Video(np.zeros((2, 4, 4, 3), np.uint8), 5)
    assert media.load_video(video).fps == 5.0
    with pytest.raises(MediaError, match="uint8"):
        media.load_video(Video(np.zeros((2, 4, 4, 3), np.float32), 5))
    with pytest.raises(MediaError, match="no frames"):
        media.load_video(Video(np.zeros((0, 4, 4, 3), np.uint8), 5))
    with pytest.raises(MediaError, match="fps"):
        media.load_video(Video(np.zeros((1, 4, 4, 3), np.uint8), 0))


def _zero_frame_mkv(path: Path) -> None:
    """A Matroska file with a video track that holds no frame (only the audio track has data)."""
    with av.open(str(path), "w", format="matroska") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        _mux_silence(container)


def _mux_silence(container) -> None:
    stream = container.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                       layout="mono")
    frame.sample_rate = 16000
    container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _truncated_mp4(path: Path) -> None:
    write_test_video(path, "mp4", "libx264", n=20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _audio_only_mp4(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        _mux_silence(container)


@pytest.mark.parametrize("name,make,fragments", [
    ("missing.mp4", None, ["no such file"]),
    ("empty.mp4", lambda p: p.write_bytes(b""), ["empty"]),
    ("noise.mp4", lambda p: p.write_bytes(os.urandom(4096)), ["not a readable video"]),
    ("cut.mp4", _truncated_mp4, ["corrupt, truncated"]),
    ("zero.mkv", _zero_frame_mkv, ["no decodable frames"]),
    ("voice.mp4", _audio_only_mp4, ["no video stream"]),
    ("image.mp4", lambda p: Image.new("RGB", (8, 8)).save(p, format="PNG"),
     ["unsupported video format"]),
    ("notes.txt", lambda p: p.write_text("hello\n" * 50), ["not a readable video"]),
])
def test_load_video_rejects(tmp_path, name, make, fragments):
    path = tmp_path / name
    if make:
        make(path)
    assert_media_error(media.load_video, path, *fragments)


@pytest.mark.parametrize("seek", [False, True], ids=["sequential", "seeking"])
def test_load_video_rejects_truncated_indexed_mp4(tmp_path, monkeypatch, seek):
    """With its index in front (faststart), a cut MP4 still opens: the missing frames tell."""
    path = tmp_path / "cut_faststart.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(50):
            frame = av.VideoFrame.from_ndarray(noise_image(), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if seek:
        monkeypatch.setattr(media.video, "SEEK_MIN_FRAMES", 10)
    assert_media_error(lambda p: media.load_video(p, max_frames=8), path, "truncated")


def test_load_video_limits(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_test_video(path, "mp4", "libx264", n=30, fps=10)
    monkeypatch.setattr(media.video, "MAX_VIDEO_SECONDS", 2.0)
    assert_media_error(media.load_video, path, "over the limit", "trim")
    monkeypatch.setattr(media.video, "MAX_VIDEO_SECONDS", 3600.0)
    monkeypatch.setattr(media.video, "MAX_VIDEO_FRAME_PIXELS", 1000)
    assert_media_error(media.load_video, path, "64x48", "downscale")


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _torchvision_reference(image: Image.Image) -> torch.Tensor:
    """imagebind.data.load_and_transform_vision_data's transform, built from torchvision."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.48145466, 0.4578275, 0.40821073),
                             std=(0.26862954, 0.26130258, 0.27577711)),
    ])(image.convert("RGB"))


@pytest.mark.parametrize("size", [(300, 500), (640, 256), (100, 90), (224, 224)])
def test_image_to_encoder_input_matches_torchvision(size):
    image = Image.fromarray(noise_image(*size))
    tensor = media.image_to_encoder_input(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, _torchvision_reference(image), rtol=0, atol=1e-6)
    low = (0 - torch.tensor(media.image.CLIP_MEAN)) / torch.tensor(media.image.CLIP_STD)
    high = (1 - torch.tensor(media.image.CLIP_MEAN)) / torch.tensor(media.image.CLIP_STD)
    assert (tensor.amin(dim=(1, 2)) >= low - 1e-5).all()
    assert (tensor.amax(dim=(1, 2)) <= high + 1e-5).all()


def test_image_to_encoder_input_from_path_and_elongated(tmp_path):
    Image.fromarray(noise_image(3, 4000)).save(tmp_path / "strip.png")
    assert media.image_to_encoder_input(tmp_path / "strip.png").shape == (3, 224, 224)


@pytest.mark.parametrize("rate,channels,seconds", [
    (16000, 1, 6.0), (44100, 2, 3.0), (8000, 1, 0.01), (48000, 6, 1.0), (22050, 1, 2.0),
])
def test_audio_to_encoder_input_shape(rate, channels, seconds):
    samples = max(1, int(rate * seconds))
    audio = Audio(RNG.uniform(-0.5, 0.5, (channels, samples)).astype(np.float32).squeeze(), rate)
    tensor = media.audio_to_encoder_input(audio)
    assert tensor.shape == (3, 1, 128, 204) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    assert -5 < tensor.mean() < 5


def test_audio_to_encoder_input_reference():
    """6 s at 16 kHz: clips start at 0, 4/3 and 8/3 s (ConstantClipsPerVideoSampler), each a
    Kaldi fbank of the mean-removed 2 s clip, 198 frames padded with zeros to 204."""
    import torchaudio

    wave = RNG.uniform(-0.5, 0.5, 96000).astype(np.float32)
    tensor = media.audio_to_encoder_input(Audio(wave, 16000))
    for index, start in enumerate((0, 21333, 42666)):
        clip = torch.from_numpy(wave[start : start + 32000]).unsqueeze(0)
        fbank = torchaudio.compliance.kaldi.fbank(
            clip - clip.mean(), htk_compat=True, sample_frequency=16000, use_energy=False,
            window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25,
            frame_shift=10).T
        expected = torch.nn.functional.pad(fbank, (0, 204 - fbank.shape[1]))
        torch.testing.assert_close(tensor[index, 0], (expected + 4.268) / 9.138)


def test_audio_to_encoder_input_short_and_stereo():
    short = media.audio_to_encoder_input(Audio(RNG.uniform(-0.5, 0.5, 8000).astype(np.float32),
                                               16000))
    # Under 2 s every clip is the whole waveform, padded with zeros (normalised: 4.268 / 9.138).
    torch.testing.assert_close(short[0], short[2])
    torch.testing.assert_close(short[0, 0, :, -1], torch.full((128,), 4.268 / 9.138))
    left, right = RNG.uniform(-0.5, 0.5, (2, 20000)).astype(np.float32)
    stereo = media.audio_to_encoder_input(Audio(np.stack([left, right]), 16000))
    mono = media.audio_to_encoder_input(Audio((left + right) / 2, 16000))
    torch.testing.assert_close(stereo, mono)


def test_audio_to_encoder_input_from_path(tmp_path):
    sf.write(tmp_path / "a.flac", tone(44100, 2.5, 2), 44100)
    assert media.audio_to_encoder_input(tmp_path / "a.flac").shape == (3, 1, 128, 204)


def _frame_level(tensor: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation of channel 0 and return grey levels 0..255 per (clip, frame)."""
    pixels = tensor[:, 0].mean(dim=(-1, -2)) * media.image.CLIP_STD[0] + media.image.CLIP_MEAN[0]
    return pixels * 255


def test_video_to_encoder_input_picks_imagebind_frames():
    # 10 s at 10 fps, frame i has grey level i: clips start at 1.6 i s; each clip contributes
    # its first and last frame in [start, start + 2).
    frames = np.stack([np.full((12, 20, 3), i, np.uint8) for i in range(100)])
    tensor = media.video_to_encoder_input(Video(frames, 10.0))
    assert tensor.shape == (5, 3, 2, 224, 224) and tensor.dtype == torch.float32
    expected = torch.tensor([[0, 19], [16, 35], [32, 51], [48, 67], [64, 83]], dtype=torch.float32)
    torch.testing.assert_close(_frame_level(tensor), expected, atol=1e-3, rtol=0)


def test_video_to_encoder_input_crops():
    # Width 448, height 224: no scaling; left/centre/right crops see columns 0, 112, 224.
    column = np.arange(448, dtype=np.float32) * 255 / 447
    frame = np.broadcast_to(column[None, :, None], (224, 448, 3)).round().astype(np.uint8)
    video = Video(np.stack([frame] * 4), 2.0)
    centre = media.video_to_encoder_input(video)
    three = media.video_to_encoder_input(video, spatial_crops=3)
    assert centre.shape == (5, 3, 2, 224, 224) and three.shape == (15, 3, 2, 224, 224)
    torch.testing.assert_close(three[1::3], centre)
    first_column = (three[:3, 0, 0, 0, 0] * media.image.CLIP_STD[0] + media.image.CLIP_MEAN[0]) * 255
    expected = torch.tensor(frame[0, [0, 112, 224], 0], dtype=torch.float32)
    torch.testing.assert_close(first_column, expected, atol=1e-3, rtol=0)


def test_video_to_encoder_input_from_path(tmp_path):
    path = tmp_path / "v.webm"
    write_test_video(path, "webm", "libvpx", n=8, fps=4, size=(40, 30))
    assert media.video_to_encoder_input(path).shape == (5, 3, 2, 224, 224)


# The encoder's arch sets the geometry (ImageBindEncoder.preprocess_options); ImageBind's values
# are only the defaults.


def test_image_size_follows_the_argument_and_other_geometry_is_ignored():
    image = Image.fromarray(noise_image(100, 300))
    assert media.image_to_encoder_input(image, image_size=112).shape == (3, 112, 112)
    # One vision options dict serves images and videos: the video-only key is ignored.
    torch.testing.assert_close(media.image_to_encoder_input(image, image_size=224, frames_per_clip=7),
                               media.image_to_encoder_input(image))


def test_audio_geometry_follows_the_arguments():
    audio = Audio(RNG.uniform(-0.5, 0.5, 48000).astype(np.float32), 16000)  # 3 s: 198 frames a clip
    default = media.audio_to_encoder_input(audio)
    cropped = media.audio_to_encoder_input(audio, mel_bins=128, target_frames=100)
    assert cropped.shape == (3, 1, 128, 100)
    torch.testing.assert_close(cropped, default[..., :100])  # the same fbank, cut at 100 frames
    fewer_bins = get_modality("audio").preprocess(audio, mel_bins=64, target_frames=250, image_size=1)
    assert fewer_bins.shape == (3, 1, 64, 250)
    torch.testing.assert_close(fewer_bins[..., -1], torch.full((3, 1, 64), 4.268 / 9.138))  # padded
    with pytest.raises(ValueError, match="target_frames must be a positive integer"):
        media.audio_to_encoder_input(audio, target_frames=0)


@pytest.mark.parametrize("count,offsets", [(1, [0]), (3, [0, 9, 19]), (4, [0, 6, 12, 19])])
def test_video_frames_per_clip_follows_the_argument(count, offsets):
    # As test_video_to_encoder_input_picks_imagebind_frames: clip i spans frames 16 i .. 16 i + 19.
    frames = np.stack([np.full((12, 20, 3), i, np.uint8) for i in range(100)])
    tensor = media.video_to_encoder_input(Video(frames, 10.0), frames_per_clip=count, image_size=112)
    assert tensor.shape == (5, 3, count, 112, 112)
    expected = torch.tensor([[16 * clip + k for k in offsets] for clip in range(5)], dtype=torch.float32)
    torch.testing.assert_close(_frame_level(tensor), expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="frames_per_clip"):
        media.video_to_encoder_input(Video(frames, 10.0), frames_per_clip=0)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_write_image_png_round_trip(tmp_path):
    pixels = noise_image()
    path = get_modality("image").write(Image.fromarray(pixels), tmp_path / "sub" / "out.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(media.load_image(path)), pixels)
    media.write_image(np.zeros((4, 4, 4), np.uint8), tmp_path / "rgba.png")
    assert Image.open(tmp_path / "rgba.png").mode == "RGBA"


@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2)])
def test_write_audio_wav_round_trip(tmp_path, rate, channels):
    source = tone(rate, 0.75, channels).T.squeeze()
    path = get_modality("audio").write(Audio(source, rate), tmp_path / "out.wav")
    info = sf.info(path)
    assert (info.format, info.subtype) == ("WAV", "PCM_16")
    assert (info.samplerate, info.channels, info.frames) == (rate, channels, int(rate * 0.75))
    np.testing.assert_allclose(media.load_audio(path).waveform, source, atol=1 / 16384)


def test_write_audio_clips_out_of_range(tmp_path):
    loud = Audio(np.array([2.0, -3.0, 0.5], np.float32), 8000)
    path = media.write_audio(loud, tmp_path / "c.wav")
    np.testing.assert_allclose(sf.read(path)[0], [1.0, -1.0, 0.5], atol=1e-4)


@pytest.mark.parametrize("fps,frames,size", [
    (8, 10, (48, 64)), (30000 / 1001, 7, (33, 45)), (24, 1, (32, 32)), (0.5, 3, (16, 16)),
])
def test_write_video_mp4_exact_frames_and_fps(tmp_path, fps, frames, size):
    source = RNG.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    path = get_modality("video").write(Video(source, fps), tmp_path / "out.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == Fraction(fps).limit_denominator(1001)
    assert len(decoded) == frames
    even = (size[0] + size[0] % 2, size[1] + size[1] % 2)  # odd sizes are padded to even
    assert (decoded[0].height, decoded[0].width) == even
    loaded = media.load_video(path, max_frames=None)
    assert loaded.num_frames == frames and loaded.fps == pytest.approx(fps, rel=1e-6)


def test_write_rejects(tmp_path):
    with pytest.raises(UnknownNameError, match="audio, image, video"):
        get_modality("hologram")
    with pytest.raises(MediaError, match="PIL image"):
        get_modality("image").write("not an image", tmp_path / "x.png")
    with pytest.raises(MediaError, match="Audio"):
        get_modality("audio").write(np.zeros(10), tmp_path / "x.wav")
    with pytest.raises(MediaError, match="no frames"):
        get_modality("video").write(Video(np.zeros((0, 4, 4, 3), np.uint8), 5), tmp_path / "x.mp4")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MediaError, match="cannot write"):
        get_modality("image").write(Image.new("RGB", (4, 4)), blocker / "x.png")
    assert not list(tmp_path.glob("x.*"))  # nothing half-written is left behind


def test_save_output_writes_every_modality(tmp_path):
    output = GenerationOutput(segments=[
        TextSegment("here you go"),
        MediaSegment("image", Image.new("RGB", (8, 8), (1, 2, 3))),
        MediaSegment("audio", Audio(np.zeros(800, np.float32), 8000)),
        MediaSegment("video", Video(np.zeros((3, 8, 8, 3), np.uint8), 3.0), forced=True),
    ])
    written = save_output(output, tmp_path / "answer")
    assert [p.name for p in written] == ["image_0.png", "audio_0.wav", "video_0.mp4", "answer.json"]
    assert all(p.parent == tmp_path / "answer" for p in written)
    assert media.load_image(written[0]).size == (8, 8)
    assert media.load_audio(written[1]).duration == pytest.approx(0.1)
    assert media.load_video(written[2]).num_frames == 3
    answer = json.loads(written[3].read_text())
    assert answer == {
        "text": "here you go", "raw_text": "", "num_generated_tokens": 0, "timings": {},
        "segments": [{"type": "text", "text": "here you go"},
                     {"type": "image", "path": "image_0.png", "forced": False},
                     {"type": "audio", "path": "audio_0.wav", "forced": False},
                     {"type": "video", "path": "video_0.mp4", "forced": True}],
    }
    assert not hasattr(output, "save")  # output data types do no file I/O


# ---------------------------------------------------------------------------------------------
# The modality registry
# ---------------------------------------------------------------------------------------------


def test_registry_lists_the_modalities_in_rank_order():
    specs = [get_modality(name) for name in MODALITIES]
    assert [s.name for s in specs] == ["image", "audio", "video"]
    assert [s.rank for s in specs] == [0, 1, 2]
    assert [(s.plural, s.noun, s.signal_prefix, s.default_signal_tokens, s.encoder_input,
             s.output_suffix, s.default_decoder, s.ui_component) for s in specs] == [
        ("images", "an image", "IMG", 4, "vision", ".png", "stable-diffusion", "Image"),
        ("audios", "an audio clip", "AUD", 8, "audio", ".wav", "audioldm", "Audio"),
        ("videos", "a video", "VID", 24, "vision", ".mp4", "text-to-video", "Video"),
    ]
    assert get_modality("audio").signal_tokens() == [f"[AUD{i}]" for i in range(8)]
    assert get_modality("image").signal_tokens(2) == ["[IMG0]", "[IMG1]"]


def test_modality_for_suffix():
    assert modality_for_suffix(".PNG").name == "image"
    assert modality_for_suffix("wave").name == "audio"
    assert modality_for_suffix(".m4v").name == "video"
    assert modality_for_suffix(".txt") is None and modality_for_suffix("") is None
    for name in MODALITIES:
        spec = get_modality(name)
        assert spec.output_suffix in spec.input_suffixes
        assert all(modality_for_suffix(suffix) is spec for suffix in spec.input_suffixes)


def test_load_refuses_a_suffix_the_modality_does_not_accept(tmp_path):
    path = tmp_path / "photo.tiff"
    Image.fromarray(noise_image()).save(path, format="PNG")  # readable content, wrong suffix
    assert_media_error(get_modality("image").load, path, "unsupported image file type .tiff",
                       "accepted: .png, .jpg, .jpeg, .webp, .gif, .bmp", "convert it to png")
    assert_media_error(get_modality("audio").load, tmp_path / "clip.mp4", "unsupported audio file type .mp4",
                       ".wav, .wave, .flac, .ogg, .oga, .opus, .mp3")
    # Upper-case suffixes, suffix-less paths and loaded values reach the loader.
    for name in ("PHOTO.PNG", "photo"):
        (tmp_path / name).write_bytes(path.read_bytes())
        assert get_modality("image").load(tmp_path / name).size == (64, 48)
    assert get_modality("image").load(Image.new("RGB", (4, 4))).size == (4, 4)


def test_load_accepts_every_listed_suffix_not_covered_above(tmp_path):
    Image.fromarray(noise_image()).save(tmp_path / "a.jpeg", format="JPEG")
    assert get_modality("image").load(tmp_path / "a.jpeg").size == (64, 48)
    sf.write(tmp_path / "a.wave", tone(8000, 0.5), 8000, format="WAV")
    sf.write(tmp_path / "a.oga", tone(16000, 0.5), 16000, format="OGG", subtype="VORBIS")
    sf.write(tmp_path / "a.opus", tone(48000, 0.5), 48000, format="OGG", subtype="OPUS")
    for name in ("a.wave", "a.oga", "a.opus"):
        assert get_modality("audio").load(tmp_path / name).duration == pytest.approx(0.5, abs=0.05)
    write_test_video(tmp_path / "a.m4v", "mp4", "libx264", n=6, fps=6)
    assert get_modality("video").load(tmp_path / "a.m4v").num_frames == 6


def _sketch_spec(**overrides) -> ModalitySpec:
    """An input-only toy modality that ranks with audio."""
    fields = dict(name="sketch", plural="sketches", noun="a sketch", signal_prefix="SKT",
                  default_signal_tokens=2, encoder_input="vision", input_suffixes=(".sketch",),
                  ui_component="Image", rank=1, loader=media.load_image,
                  preprocessor=media.image_to_encoder_input)
    return ModalitySpec(**{**fields, **overrides})


def test_register_and_unregister_a_modality(tmp_path):
    spec = register_modality(_sketch_spec())
    try:
        assert list(MODALITIES) == ["image", "audio", "sketch", "video"]  # after equal ranks
        assert modality_for_suffix(".SKETCH") is spec and spec.signal_tokens() == ["[SKT0]", "[SKT1]"]
        with pytest.raises(MediaError, match="input-only"):
            spec.write(Image.new("RGB", (4, 4)), tmp_path / "x.sketch")
        with pytest.raises(ValueError, match="already registered"):
            register_modality(_sketch_spec(rank=5))
    finally:
        assert unregister_modality("sketch") is spec
    assert list(MODALITIES) == ["image", "audio", "video"]
    with pytest.raises(UnknownNameError, match="sketch"):
        unregister_modality("sketch")


def test_a_spec_is_checked_when_built():
    with pytest.raises(ValueError, match="lower case with the dot"):
        _sketch_spec(input_suffixes=(".Sketch",))
    with pytest.raises(ValueError, match="output_suffix and writer"):
        _sketch_spec(output_suffix=".png")


def test_a_new_module_in_the_package_is_a_new_modality(tmp_path, monkeypatch):
    import sys

    import anygpt.modalities as package

    (tmp_path / "sketch.py").write_text(
        "from anygpt.media import image_to_encoder_input, load_image\n"
        "from anygpt.modalities import ModalitySpec, register_modality\n"
        "SPEC = register_modality(ModalitySpec(name='sketch', plural='sketches', noun='a sketch',"
        " signal_prefix='SKT', default_signal_tokens=2, encoder_input='vision',"
        " input_suffixes=('.sketch',), ui_component='Image', rank=9, loader=load_image,"
        " preprocessor=image_to_encoder_input))\n")
    (tmp_path / "_helper.py").write_text("raise AssertionError('private modules are not imported')\n")
    monkeypatch.setattr(package, "__path__", [str(tmp_path)])
    try:
        package._import_spec_modules()
        assert list(MODALITIES)[-1] == "sketch"
    finally:
        sys.modules.pop("anygpt.modalities.sketch", None)
        if "sketch" in MODALITIES:
            unregister_modality("sketch")


def test_import_is_light():
    """Importing anygpt.media adds none of torch, torchaudio, av or soundfile to what
    ``import anygpt`` already imports (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys; heavy = ('torch', 'torchaudio', 'torchvision', 'av', 'soundfile'); "
        "import anygpt; before = {m for m in heavy if m in sys.modules}; "
        "import anygpt.media; print(sorted({m for m in heavy if m in sys.modules} - before))"
    )
    root = str(Path(__file__).parents[1])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert result.stdout.strip() == "[]"


def test_png_signature_with_a_damaged_header_is_a_media_error(tmp_path):
    path = tmp_path / "damaged.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"\x01\x02")
    with pytest.raises(MediaError, match="damaged.png"):
        media.load_image(path)

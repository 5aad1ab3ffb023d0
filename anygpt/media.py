"""Media I/O: load and validate image, audio and video files, preprocess them for ImageBind,
and write generated media as PNG, WAV and MP4.

Loading
    :func:`load_image`, :func:`load_audio` and :func:`load_video` accept a path or an
    already-loaded value and return a validated value of the types in :mod:`anygpt.types`.
    Every problem a user can fix (missing, unreadable, empty, corrupt, truncated, unsupported
    or oversized file) raises :class:`~anygpt.errors.MediaError` whose message starts with the
    file's path and ends with what to do about it.

Preprocessing
    :func:`image_to_encoder_input`, :func:`audio_to_encoder_input` and
    :func:`video_to_encoder_input` reproduce ``imagebind.data``'s transforms with torchvision,
    torchaudio and PyAV only (``imagebind.data`` imports pytorchvideo, which no longer imports
    with current torchvision). Known, deliberate differences are listed in each docstring.

Writing
    :func:`write_media` dispatches on the modality name to :func:`write_image` (PNG),
    :func:`write_audio` (16-bit WAV) and :func:`write_video` (H.264 MP4, yuv420p).

Only numpy and Pillow are imported with this module; soundfile, PyAV, torch, torchvision and
torchaudio are imported by the functions that need them.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anygpt.errors import MediaError, UnknownNameError
from anygpt.types import Audio, Video

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_AUDIO_SECONDS",
    "MAX_AUDIO_CHANNELS",
    "MAX_VIDEO_SECONDS",
    "MAX_VIDEO_FRAME_PIXELS",
    "MAX_VIDEO_FRAMES",
    "load_image",
    "load_audio",
    "load_video",
    "image_to_encoder_input",
    "audio_to_encoder_input",
    "video_to_encoder_input",
    "write_media",
    "write_image",
    "write_audio",
    "write_video",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# ---------------------------------------------------------------------------------------------
# Limits. Module-level so that an application can tighten or relax them in one place.
# ---------------------------------------------------------------------------------------------

#: Largest accepted image, in pixels (8192 x 8192). Checked from the header, before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192
#: Longest accepted audio file, in seconds. Checked from the header, before decoding.
MAX_AUDIO_SECONDS = 600.0
#: Most channels accepted in an audio file (a corrupt header can claim thousands).
MAX_AUDIO_CHANNELS = 32
#: Longest accepted video file, in seconds.
MAX_VIDEO_SECONDS = 3600.0
#: Largest accepted video frame, in pixels (DCI 4K, 4096 x 2160, either orientation).
MAX_VIDEO_FRAME_PIXELS = 4096 * 2160
#: Default of :func:`load_video`'s ``max_frames``: frames kept, evenly spaced over the video.
#: ImageBind looks at 5 clips x 2 frames; 32 frames keep those close to the source's timing
#: while bounding memory (32 x 1080p RGB frames = 200 MB).
MAX_VIDEO_FRAMES = 32
#: Above this many (estimated) frames, :func:`load_video` seeks to each sampled frame instead
#: of decoding straight through: a seek decodes from the previous keyframe (up to ~250 frames
#: with x264's defaults), so for shorter videos one sequential pass is cheaper.
SEEK_MIN_FRAMES = 3000

_FRAME_REFORMATTER = threading.local()

# ---------------------------------------------------------------------------------------------
# Formats.
# ---------------------------------------------------------------------------------------------

#: Pillow format names accepted by :func:`load_image` (identified from content, not suffix).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_NAMEABLE_IMAGE_FORMATS = ("TIFF", "ICO", "ICNS", "PSD", "JPEG2000", "DDS", "PPM", "QOI")
#: libsndfile major formats accepted by :func:`load_audio` (the WAV family, FLAC, Ogg, MP3).
AUDIO_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "OGG", "MP3")
#: FFmpeg demuxer names accepted by :func:`load_video` (MP4/MOV, Matroska/WebM, AVI).
VIDEO_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})

# ---------------------------------------------------------------------------------------------
# ImageBind preprocessing constants (imagebind/data.py).
# ---------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
#: Images more elongated than this are centre-cropped to this aspect ratio before resizing,
#: so that a 100000 x 10 strip does not become a 2.2-gigapixel intermediate.
MAX_PREPROCESS_ASPECT = 16

AUDIO_SAMPLE_RATE = 16_000
AUDIO_CLIPS = 3
AUDIO_CLIP_SECONDS = 2
AUDIO_MEL_BINS = 128
AUDIO_TARGET_FRAMES = 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138
_FBANK_FRAME_MS = 25
_FBANK_SHIFT_MS = 10

VIDEO_CLIPS = 5
VIDEO_CLIP_SECONDS = 2
VIDEO_FRAMES_PER_CLIP = 2


# =============================================================================================
# Shared helpers
# =============================================================================================


def _check_file(path: Any, kind: str) -> Path:
    """Return ``path`` as a :class:`Path` after checking it names a readable, non-empty file.

    Args:
        path: what the caller passed.
        kind: "image", "audio" or "video", for messages.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise MediaError(
            f"cannot load {kind} from a {type(path).__name__}; pass a file path"
            f" or an already-loaded {kind}"
        )
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: no such file; check the path and the current directory")
    if p.is_dir():
        raise MediaError(f"{p}: is a directory, not a file; pass the path of the {kind} file")
    if not p.is_file():
        raise MediaError(f"{p}: is not a regular file (a pipe or device?); save it to a file first")
    try:
        with open(p, "rb") as handle:
            first = handle.read(1)
    except PermissionError as exc:
        raise MediaError(f"{p}: permission denied; make the file readable (chmod +r)") from exc
    except OSError as exc:
        reason = exc.strerror or exc
        raise MediaError(f"{p}: cannot read the file ({reason}); copy it to a local disk") from exc
    if not first:
        raise MediaError(f"{p}: the file is empty (0 bytes); the upload or copy may have failed")
    return p


def _read_head(path: Path, size: int = 64) -> bytes:
    """The first ``size`` bytes of ``path`` (used to name an unrecognised format)."""
    with open(path, "rb") as handle:
        return handle.read(size)


def _suffix(path: Path) -> str:
    """The suffix without the dot, upper case (``HEIC``), or ``unknown``."""
    return path.suffix.lstrip(".").upper() or "unknown"


# =============================================================================================
# Images
# =============================================================================================


def load_image(image: PathLike | Image.Image) -> Image.Image:
    """Load and validate an image; return it as a fully decoded RGB ``PIL.Image.Image``.

    Accepted: PNG, JPEG, WebP, GIF (first frame) and BMP, identified from the file's content
    (a PNG named ``.jpg`` loads; a HEIC named ``.png`` does not). EXIF orientation is applied,
    so photos come out upright as viewers show them. Transparent images are composited onto
    white (what viewers show; dropping alpha would expose arbitrary colours under transparent
    pixels); 16-bit greyscale is scaled to 8 bits; every other mode is converted to RGB.

    Args:
        image: a file path, or an already-loaded PIL image (validated and converted the same
            way; the caller's object is not modified).

    Raises:
        MediaError: missing, unreadable, empty, unsupported, corrupt or truncated file, or an
            image larger than :data:`MAX_IMAGE_PIXELS` (checked before decoding pixel data).
    """
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or "<image>"
        _check_image_size(image.size, name)
        return _decode_to_rgb(image, name)
    path = _check_file(image, "image")
    try:
        handle = Image.open(path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise MediaError(
            f"{path}: image is far larger than the limit of {MAX_IMAGE_PIXELS / 1e6:.0f}"
            f" megapixels ({exc}); downscale it and try again"
        ) from exc
    except UnidentifiedImageError as exc:
        raise MediaError(_unsupported_image_message(path)) from exc
    # A recognised signature followed by a damaged header fails while Pillow parses it.
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: corrupt image header ({exc}); re-export or re-download it") from exc
    with handle:
        _check_image_size(handle.size, str(path))
        return _decode_to_rgb(handle, str(path))


def _check_image_size(size: tuple[int, int], name: str) -> None:
    """Refuse empty images and images over :data:`MAX_IMAGE_PIXELS`."""
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"{name}: image has no pixels ({width}x{height}); use another image")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"{name}: image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the"
            f" limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; downscale it and try again"
        )


def _decode_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Decode all pixel data now (so truncation fails here, not in a later transform), apply
    EXIF orientation and convert to RGB."""
    fmt = image.format or "image"
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return _to_rgb(upright)
    # Decoders of untrusted files raise many types (OSError "image file is truncated",
    # SyntaxError, struct.error, zlib.error, ...): every one means the file is damaged.
    except Exception as exc:
        raise MediaError(
            f"{name}: corrupt or truncated {fmt} image ({exc}); re-export or re-download it"
        ) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see :func:`load_image` for the rules)."""
    if image.mode.startswith("I"):
        # 16-bit greyscale PNGs open as I;16 (or I); Pillow's own conversion clips at 255.
        levels = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(np.clip(levels + 0.5, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _unsupported_image_message(path: Path) -> str:
    """Explain why ``path`` is not a loadable image, naming its real format when known."""
    detected = _detect_format(path)
    supported = "PNG, JPEG, WebP, GIF or BMP"
    if detected:
        return f"{path}: unsupported image format {detected}; convert it to PNG or JPEG"
    suffix = _suffix(path)
    if suffix in ("PNG", "JPG", "JPEG", "WEBP", "GIF", "BMP"):
        return (
            f"{path}: not a valid {suffix} image (the content is not {supported} data; the file"
            " is corrupt or mislabelled); re-export it as PNG or JPEG"
        )
    return (
        f"{path}: unsupported image format {suffix} (need {supported});"
        " convert it to PNG or JPEG"
    )


def _detect_format(path: Path) -> str | None:
    """Name the format of a file that is not a supported image, if it is recognisable."""
    head = _read_head(path)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"hevc"):
            return "HEIC"
        if brand in (b"avif", b"avis"):
            return "AVIF"
    if head.startswith(b"%PDF"):
        return "PDF"
    try:
        # Name formats Pillow knows but we do not accept. Only formats with a distinctive
        # signature: weakly identified ones (TGA, PCX, ...) would misname random bytes.
        with Image.open(path, formats=_NAMEABLE_IMAGE_FORMATS) as other:
            return other.format
    except Exception:  # noqa: BLE001 - any failure just means "not recognisable"
        logger.debug("%s: Pillow does not recognise the content either", path)
        return None


# =============================================================================================
# Audio
# =============================================================================================


def load_audio(audio: PathLike | Audio) -> Audio:
    """Load and validate an audio file; return a float32 :class:`~anygpt.types.Audio`.

    Accepted: WAV (incl. WAVE_FORMAT_EXTENSIBLE, RF64, W64), FLAC, Ogg (Vorbis, Opus) and MP3,
    through libsndfile (``soundfile``), at any sample rate and channel count. The waveform is
    (T,) for mono and (C, T) otherwise, with the file's sample rate, not resampled.

    Args:
        audio: a file path, or an :class:`Audio` to validate (float32 conversion included;
            integer PCM is scaled to [-1, 1]). The duration limit applies to files only.

    Raises:
        MediaError: missing, unreadable, empty, unsupported, corrupt or truncated file; no
            samples; non-finite samples; longer than :data:`MAX_AUDIO_SECONDS` or more than
            :data:`MAX_AUDIO_CHANNELS` channels (both checked before decoding).
    """
    if isinstance(audio, Audio):
        return _validate_audio(audio, "<audio>")
    path = _check_file(audio, "audio")
    data, sample_rate = _read_sound_file(path)
    waveform = data[:, 0] if data.shape[1] == 1 else data.T
    return _validate_audio(Audio(np.ascontiguousarray(waveform), sample_rate), str(path))


def _read_sound_file(path: Path) -> tuple[np.ndarray, int]:
    """Decode ``path`` with libsndfile into a (T, C) float32 array and its sample rate."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as sound:
            _check_audio_header(path, sound.format, sound.samplerate, sound.channels, sound.frames)
            data = sound.read(dtype="float32", always_2d=True)
            fmt, rate, declared = sound.format, sound.samplerate, sound.frames
            log = sound.extra_info
    except MediaError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, OSError) as exc:
        raise MediaError(_audio_open_message(path, exc)) from exc
    _check_audio_complete(path, fmt, declared, len(data), log)
    return data, rate


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


def _check_audio_header(path: Path, fmt: str, rate: int, channels: int, frames: int) -> None:
    """Validate format, rate, channels and duration from the header, before decoding."""
    if fmt not in AUDIO_FORMATS:
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


# =============================================================================================
# Video
# =============================================================================================


def load_video(video: PathLike | Video, max_frames: int | None = MAX_VIDEO_FRAMES) -> Video:
    """Load and validate a video's frames through PyAV; return a :class:`~anygpt.types.Video`.

    Accepted containers: MP4, MOV, WebM, MKV and AVI with any codec the bundled FFmpeg decodes.
    Only the first video stream is read; audio tracks are ignored.

    What is kept: at most ``max_frames`` frames, evenly spaced over the whole video, so memory
    stays bounded however long the video is. Videos with up to ``max_frames`` frames are kept
    whole. Longer ones keep every ``stride``-th frame (decoding straight through), or, above
    :data:`SEEK_MIN_FRAMES` frames, one frame at each of ``max_frames`` evenly spaced times
    (seeking, so a one-hour video costs about as much as a one-minute one). The returned
    ``fps`` is the rate of the *kept* frames, so ``Video.duration`` still equals the source
    duration and frame ``i`` sits at ``i / fps`` seconds, which is what
    :func:`video_to_encoder_input` relies on to place ImageBind's clips.

    Args:
        video: a file path, or a :class:`Video` to validate (returned unchanged in content).
        max_frames: cap on the frames kept; ``None`` keeps every frame (memory then grows with
            the video's length).

    Raises:
        MediaError: missing, unreadable, empty, unsupported, corrupt or truncated file; no video
            stream or no decodable frame; longer than :data:`MAX_VIDEO_SECONDS`; frames larger
            than :data:`MAX_VIDEO_FRAME_PIXELS`.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 or None, got {max_frames}")
    if isinstance(video, Video):
        return _validate_video(video, "<video>")
    path = _check_file(video, "video")
    import av

    try:
        # Undecodable metadata text is no reason to refuse the pictures.
        container = av.open(str(path), mode="r", metadata_errors="replace")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(
            f"{path}: not a readable video ({_ffmpeg_reason(exc)}); the file is corrupt,"
            " truncated or not a video: re-export it as MP4 (H.264)"
        ) from exc
    with container:
        frames, fps = _read_video(container, path, max_frames)
    if not frames:
        raise MediaError(f"{path}: the video has no decodable frames; re-export it as MP4 (H.264)")
    return Video(frames=np.stack(frames), fps=fps)


def _read_video(
    container: Any, path: Path, max_frames: int | None
) -> tuple[list[np.ndarray], float]:
    """Validate the container and its first video stream, then sample frames from it."""
    import av

    _check_container(container, path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads: decoding is the slow part
    fps, duration, estimate = _probe_video(container, stream, path)
    seek = max_frames is not None and duration is not None and (estimate or 0) > SEEK_MIN_FRAMES
    try:
        if seek:
            frames = _decode_by_seeking(container, stream, path, duration, max_frames)
            return frames, len(frames) / duration
        frames, stride, decoded = _decode_sequentially(
            container, stream, path, max_frames, estimate
        )
        _check_frame_count(path, stream.frames, decoded)
        return frames, fps / stride
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(
            f"{path}: the video is corrupt ({_ffmpeg_reason(exc)}); re-export or re-download it"
        ) from exc


def _ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's reason without the file name that PyAV appends (the message already has it)."""
    return getattr(exc, "strerror", None) or str(exc)


def _check_container(container: Any, path: Path) -> None:
    """Refuse containers we do not support (FFmpeg also opens images, GIFs, raw streams...)."""
    names = set(container.format.name.split(","))
    if not names & VIDEO_CONTAINERS:
        raise MediaError(
            f"{path}: unsupported video format {container.format.name!r} (need MP4, MOV, WebM,"
            " MKV or AVI); convert it to MP4 (e.g. ffmpeg -i input output.mp4)"
        )
    if not container.streams.video:
        raise MediaError(
            f"{path}: the file has no video stream (audio only?); load it as audio or use"
            " another video"
        )


def _probe_video(container: Any, stream: Any, path: Path) -> tuple[float, float | None, int | None]:
    """Frame rate, duration (seconds, if known) and frame-count estimate, from the headers."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > MAX_VIDEO_FRAME_PIXELS:
        raise MediaError(
            f"{path}: video frames are {width}x{height}, over the limit of"
            f" {MAX_VIDEO_FRAME_PIXELS / 1e6:.1f} megapixels; downscale it to 1080p"
        )
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise MediaError(f"{path}: the video's frame rate is unknown; re-export it as MP4 (H.264)")
    if stream.duration and stream.time_base:
        duration: float | None = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        duration = None
    if duration is not None and duration > MAX_VIDEO_SECONDS:
        raise MediaError(
            f"{path}: video is {duration:.0f} s long, over the limit of {MAX_VIDEO_SECONDS:.0f} s;"
            f" trim it (e.g. ffmpeg -i in.mp4 -t {MAX_VIDEO_SECONDS:.0f} out.mp4)"
        )
    estimate = stream.frames or (round(duration * float(rate)) if duration else None)
    return float(rate), duration, estimate


def _frame_rgb(frame: Any) -> np.ndarray:
    """A decoded video frame as an (H, W, 3) uint8 RGB array.

    ``frame.to_ndarray(format=...)`` sets up a new pixel-format converter on every call
    (4-8 ms a frame); one reformatter per thread keeps its converter (~0.05 ms a frame).
    """
    import av

    reformatter = getattr(_FRAME_REFORMATTER, "value", None)
    if reformatter is None:
        reformatter = _FRAME_REFORMATTER.value = av.video.reformatter.VideoReformatter()
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


def _decode_sequentially(
    container: Any, stream: Any, path: Path, max_frames: int | None, estimate: int | None
) -> tuple[list[np.ndarray], int, int]:
    """Decode every frame, keeping every ``stride``-th; return the kept frames, the stride and
    the number of frames decoded.

    The stride starts from the header's frame-count estimate. Where the estimate is missing or
    low, the kept list is halved (every other frame dropped, stride doubled) whenever it
    overflows, which keeps the frames evenly spaced with bounded memory.
    """
    stride = 1
    if max_frames is not None and estimate:
        stride = max(1, math.ceil(estimate / max_frames))
    kept: list[np.ndarray] = []
    index = -1
    for index, frame in enumerate(container.decode(stream)):
        if frame.time is not None and frame.time > MAX_VIDEO_SECONDS:
            raise MediaError(
                f"{path}: video runs past the limit of {MAX_VIDEO_SECONDS:.0f} s; trim it"
            )
        if index % stride:
            continue
        kept.append(_frame_rgb(frame))
        if max_frames is not None and len(kept) > max_frames:
            kept, stride = kept[::2], stride * 2
    logger.debug("%s: kept %d of %d frames, stride %d", path, len(kept), index + 1, stride)
    return kept, stride, index + 1


def _check_frame_count(path: Path, declared: int, decoded: int) -> None:
    """Detect a truncated file whose index survived (e.g. an MP4 with its index in front).

    A few frames of slack: edit lists legitimately make the decoder drop a frame or two.
    """
    if declared and 0 < decoded < declared - max(3, declared // 100):
        raise MediaError(
            f"{path}: the video is truncated (the header declares {declared} frames but only"
            f" {decoded} decode); re-export or re-download it"
        )


def _decode_by_seeking(
    container: Any, stream: Any, path: Path, duration: float, count: int
) -> list[np.ndarray]:
    """Keep the first frame at or after each of ``count`` evenly spaced times.

    Every sampled time lies inside the declared duration, so finding no frame there means the
    file ends early: it is truncated.
    """
    time_base = stream.time_base
    start_pts = stream.start_time or 0
    start = float(start_pts * time_base)
    tolerance = 0.5 / float(stream.average_rate or stream.guessed_rate or 25)
    kept: list[np.ndarray] = []
    for i in range(count):
        target = i * duration / count
        container.seek(start_pts + int(target / time_base), stream=stream, backward=True)
        candidates = container.decode(stream)
        frame = next(
            (f for f in candidates if f.time is None or f.time - start >= target - tolerance), None
        )
        if frame is None:
            raise MediaError(
                f"{path}: the video is truncated (no frame at {target:.1f} s of a declared"
                f" {duration:.1f} s); re-export or re-download it"
            )
        kept.append(_frame_rgb(frame))
    logger.debug("%s: seeked to %d sampled times", path, count)
    return kept


def _validate_video(video: Video, name: str) -> Video:
    """Check a :class:`Video` value: uint8 (F, H, W, 3) frames, F >= 1, positive fps."""
    frames = np.asarray(video.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"{name}: frames have shape {frames.shape}; expected (F, H, W, 3)")
    if frames.dtype != np.uint8:
        raise MediaError(
            f"{name}: frames have dtype {frames.dtype}; expected uint8 RGB (convert with"
            " (frames * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise MediaError(f"{name}: the video has no frames (shape {frames.shape})")
    fps = float(video.fps)
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"{name}: fps {video.fps!r} is not a positive number")
    return Video(frames=frames, fps=fps)


# =============================================================================================
# ImageBind preprocessing
# =============================================================================================


def image_to_encoder_input(image: PathLike | Image.Image) -> "torch.Tensor":
    """ImageBind's vision transform for one image: a float32 (3, 224, 224) tensor.

    As ``imagebind.data.load_and_transform_vision_data``: shorter side resized to 224 (bicubic,
    Pillow's antialiased resampling), centre crop 224, scale to [0, 1], CLIP mean/std
    normalisation. Difference: images more elongated than :data:`MAX_PREPROCESS_ASPECT` : 1 are
    centre-cropped to that ratio first (the final crop is the centre square anyway).

    Args:
        image: a path or PIL image (loaded through :func:`load_image`).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    rgb = _limit_aspect(load_image(image))
    rgb = TF.resize(rgb, IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC)
    rgb = TF.center_crop(rgb, IMAGE_SIZE)
    return TF.normalize(TF.to_tensor(rgb), CLIP_MEAN, CLIP_STD)


def _limit_aspect(image: Image.Image) -> Image.Image:
    """Centre-crop the long side to :data:`MAX_PREPROCESS_ASPECT` times the short side."""
    width, height = image.size
    short = min(width, height)
    longest = short * MAX_PREPROCESS_ASPECT
    if max(width, height) <= longest:
        return image
    if width > height:
        left = (width - longest) // 2
        return image.crop((left, 0, left + longest, height))
    top = (height - longest) // 2
    return image.crop((0, top, width, top + longest))


def audio_to_encoder_input(audio: PathLike | Audio, clips: int = AUDIO_CLIPS) -> "torch.Tensor":
    """ImageBind's audio transform: a float32 (clips, 1, 128, 204) tensor of log-mel clips.

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
    """
    import torch
    import torchaudio

    loaded = load_audio(audio)
    mono = loaded.waveform if loaded.waveform.ndim == 1 else loaded.waveform.mean(axis=0)
    waveform = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0)
    if loaded.sample_rate != AUDIO_SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, loaded.sample_rate, AUDIO_SAMPLE_RATE)
    # ImageBind computes the duration as a float and the clip bounds as Fractions: mirror it
    # so that sample boundaries match exactly.
    duration = waveform.shape[1] / AUDIO_SAMPLE_RATE
    specs = [
        _log_mel(waveform[:, int(start * AUDIO_SAMPLE_RATE) : int(end * AUDIO_SAMPLE_RATE)])
        for start, end in _clip_bounds(duration, AUDIO_CLIP_SECONDS, clips)
    ]
    return torch.stack(specs)


def _clip_bounds(
    duration: float, clip_seconds: float, clips: int
) -> list[tuple[Fraction, Fraction]]:
    """Clip (start, end) times of pytorchvideo's ``ConstantClipsPerVideoSampler``."""
    length = Fraction(clip_seconds)
    step = Fraction(max(duration - clip_seconds, 0)) / clips
    return [(step * i, step * i + length) for i in range(clips)]


def _log_mel(clip: "torch.Tensor") -> "torch.Tensor":
    """One (1, T) 16 kHz clip → normalised (1, 128, 204) log-mel spectrogram."""
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
        num_mel_bins=AUDIO_MEL_BINS,
        dither=0.0,
        frame_length=_FBANK_FRAME_MS,
        frame_shift=_FBANK_SHIFT_MS,
    ).transpose(0, 1)
    missing = AUDIO_TARGET_FRAMES - fbank.shape[1]
    if missing > 0:
        fbank = torch.nn.functional.pad(fbank, (0, missing))
    fbank = fbank[:, :AUDIO_TARGET_FRAMES].unsqueeze(0)
    return (fbank - AUDIO_MEAN) / AUDIO_STD


def video_to_encoder_input(
    video: PathLike | Video, clips: int = VIDEO_CLIPS, spatial_crops: int = 1
) -> "torch.Tensor":
    """ImageBind's video transform: a float32 (clips * spatial_crops, 3, 2, 224, 224) tensor.

    As ``imagebind.data.load_and_transform_video_data``: ``clips`` clips of 2 s with starts
    spaced evenly over the video (``ConstantClipsPerVideoSampler``); from each clip, the first
    and last frame in [start, end) (``UniformTemporalSubsample(2)``); scale to [0, 1]; shorter
    side to 224 (bilinear, no antialiasing, pytorchvideo's ``ShortSideScale``); CLIP
    normalisation; 224 x 224 crops (``uniform_crop``).

    Choice: ``spatial_crops=1`` (default) takes the centre crop only, giving 5 clips; ImageBind
    takes 3 crops (left/top, centre, right/bottom) per clip, 15 in all, which
    ``spatial_crops=3`` reproduces (in ImageBind's order) at three times the encoder cost.
    Frames are placed at ``i / fps``; with a video loaded by :func:`load_video` that sampled
    frames, a clip's frames are the nearest kept ones (see there).

    Args:
        video: a path or :class:`Video` (loaded through :func:`load_video`).
        clips: number of temporal clips (ImageBind: 5).
        spatial_crops: 1 (centre) or 3 (ImageBind's three crops).
    """
    import torch

    if spatial_crops not in (1, 3):
        raise ValueError(f"spatial_crops must be 1 or 3, got {spatial_crops}")
    loaded = load_video(video)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    crops = (1,) if spatial_crops == 1 else (0, 1, 2)
    out = []
    for start, end in _clip_bounds(loaded.duration, VIDEO_CLIP_SECONDS, clips):
        indices = _clip_frame_indices(loaded.num_frames, loaded.fps, start, end)
        clip = torch.from_numpy(loaded.frames[indices]).permute(3, 0, 1, 2).float() / 255.0
        clip = (_short_side_scale(clip, IMAGE_SIZE) - mean) / std
        out.extend(_uniform_crop(clip, IMAGE_SIZE, crop) for crop in crops)
    return torch.stack(out)


def _clip_frame_indices(num_frames: int, fps: float, start: Fraction, end: Fraction) -> list[int]:
    """Indices of the first and last frame whose time ``i / fps`` lies in [start, end).

    Where no frame lies in the window (sparsely sampled frames), the frame nearest to
    ``start`` stands in for both.
    """
    first = math.ceil(float(start) * fps - 1e-9)
    last = min(math.ceil(float(end) * fps - 1e-9) - 1, num_frames - 1)
    if last < first:
        first = last = min(round(float(start) * fps), num_frames - 1)
    # UniformTemporalSubsample: linspace(0, n - 1, k) truncated to integers.
    span, count = last - first, VIDEO_FRAMES_PER_CLIP
    return [first + int(span * k / (count - 1)) for k in range(count)]


def _short_side_scale(clip: "torch.Tensor", size: int) -> "torch.Tensor":
    """pytorchvideo's ``short_side_scale`` on a (C, T, H, W) float clip."""
    import torch

    _, _, height, width = clip.shape
    if width < height:
        new_height, new_width = int(math.floor(height / width * size)), size
    else:
        new_height, new_width = size, int(math.floor(width / height * size))
    return torch.nn.functional.interpolate(
        clip, size=(new_height, new_width), mode="bilinear", align_corners=False
    )


def _uniform_crop(clip: "torch.Tensor", size: int, spatial_idx: int) -> "torch.Tensor":
    """imagebind.data's ``uniform_crop``: 0/1/2 = start/centre/end along the long side."""
    height, width = clip.shape[-2:]
    y_offset = math.ceil((height - size) / 2)
    x_offset = math.ceil((width - size) / 2)
    if spatial_idx != 1:
        if height > width:
            y_offset = 0 if spatial_idx == 0 else height - size
        else:
            x_offset = 0 if spatial_idx == 0 else width - size
    return clip[..., y_offset : y_offset + size, x_offset : x_offset + size]


# =============================================================================================
# Writing
# =============================================================================================


def write_media(modality: str, value: Any, path: PathLike) -> Path:
    """Write one media value to ``path``: image → PNG, audio → WAV, video → MP4.

    Raises:
        UnknownNameError: ``modality`` is not image, audio or video.
        MediaError: the value is invalid or the file cannot be written.
    """
    writer = _WRITERS.get(modality)
    if writer is None:
        raise UnknownNameError("modality", modality, list(_WRITERS))
    return writer(value, path)


def write_image(image: Image.Image | np.ndarray, path: PathLike) -> Path:
    """Write an image as PNG (any Pillow mode PNG cannot store is converted to RGB).

    Args:
        image: a PIL image, or a uint8 array (H, W, 3) / (H, W).
        path: destination; parent folders are created.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_as_uint8_image(image))
    if not isinstance(image, Image.Image):
        raise MediaError(
            f"{path}: cannot write a {type(image).__name__} as an image; pass a PIL image"
        )
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        image = image.convert("RGB")
    return _write_file(path, "image", lambda target: image.save(target, format="PNG"))


def _as_uint8_image(array: np.ndarray) -> np.ndarray:
    """Validate an image array for :func:`write_image`."""
    channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype != np.uint8 or not channels_ok:
        raise MediaError(
            f"cannot write an array of shape {array.shape} and dtype {array.dtype} as an image;"
            " expected uint8 (H, W), (H, W, 3) or (H, W, 4)"
        )
    return array


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


def write_video(video: Video, path: PathLike) -> Path:
    """Write a video as MP4: H.264 (libx264, CRF 18) when available, else MPEG-4 part 2.

    Pixel format yuv420p (what browsers and players expect), so odd widths or heights are padded
    by one edge-replicated row/column. The file holds exactly ``video.num_frames`` frames at
    ``video.fps`` (rational approximations with denominators up to 1001, e.g. 30000/1001).
    """
    if not isinstance(video, Video):
        raise MediaError(
            f"{path}: cannot write a {type(video).__name__} as video; pass an anygpt.types.Video"
        )
    video = _validate_video(video, str(path))
    frames = video.frames
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(video.fps).limit_denominator(1001)
    return _write_file(path, "video", lambda target: _encode_mp4(frames, rate, target))


def _encode_mp4(frames: np.ndarray, rate: Fraction, target: Path) -> None:
    """Encode uint8 (F, H, W, 3) frames with even H and W into an MP4 file."""
    import av

    codec = "libx264" if _has_encoder("libx264") else "mpeg4"
    height, width = frames.shape[1:3]
    with av.open(str(target), mode="w", format="mp4") as container:
        # CRF 18 is visually lossless for x264; MPEG-4's default 200 kb/s is visibly blocky.
        bits = max(10**6, int(width * height * float(rate) * 0.3))
        quality = {"crf": "18"} if codec == "libx264" else {"b": str(bits)}
        stream = container.add_stream(codec, rate=rate, options=quality)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed (B-)frames


def _has_encoder(name: str) -> bool:
    """Whether the bundled FFmpeg can encode with ``name``."""
    import av

    try:
        av.Codec(name, "w")
    except (av.FFmpegError, ValueError):  # UnknownCodecError is a ValueError
        return False
    return True


def _write_file(path: PathLike, kind: str, save: Callable[[Path], None]) -> Path:
    """Run ``save`` into ``path`` (parents created); on failure remove the partial file."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save(target)
    except MediaError:
        raise
    except Exception as exc:  # writers raise OSError, RuntimeError, av/soundfile errors
        _remove_partial(target)
        raise MediaError(
            f"{target}: cannot write the {kind} ({exc}); check that the folder is writable"
        ) from exc
    return target


def _remove_partial(target: Path) -> None:
    """Delete what a failed writer left at ``target`` (a half-written file is worse than none)."""
    if target.is_file():
        try:
            target.unlink()
        except OSError as exc:
            logger.warning("%s: could not remove the partially written file: %s", target, exc)


_WRITERS: dict[str, Callable[[Any, PathLike], Path]] = {
    "image": write_image,
    "audio": write_audio,
    "video": write_video,
}

"""Video: load and validate MP4, MOV, WebM, MKV and AVI files through PyAV, ImageBind's video
transform, and writing H.264 MP4.

Only numpy is imported with this module; PyAV and torch are imported by the functions that
need them.
"""

from __future__ import annotations

import logging
import math
import threading
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anygpt.errors import MediaError
from anygpt.media.files import PathLike, _check_file, _write_file
from anygpt.media.image import CLIP_MEAN, CLIP_STD, IMAGE_SIZE
from anygpt.media.preprocessing import _check_sizes, _clip_bounds
from anygpt.types import Video

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_VIDEO_SECONDS", "MAX_VIDEO_FRAME_PIXELS", "MAX_VIDEO_FRAMES", "load_video",
           "video_to_encoder_input", "write_video"]

logger = logging.getLogger(__name__)

# The limits are module-level, and read at call time, so that an application can tighten or
# relax them in one place: ``anygpt.media.video.MAX_VIDEO_SECONDS``.

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

#: FFmpeg demuxer names accepted by :func:`load_video` (MP4/MOV, Matroska/WebM, AVI).
VIDEO_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})

# ImageBind preprocessing constants (imagebind/data.py).
VIDEO_CLIPS = 5
VIDEO_CLIP_SECONDS = 2
#: Default of the preprocessing's ``frames_per_clip`` (ImageBind's); the encoder passes its own
#: (``video_frames``).
VIDEO_FRAMES_PER_CLIP = 2


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


# ---------------------------------------------------------------------------------------------
# ImageBind preprocessing
# ---------------------------------------------------------------------------------------------


def video_to_encoder_input(
    video: PathLike | Video,
    clips: int = VIDEO_CLIPS,
    spatial_crops: int = 1,
    *,
    image_size: int = IMAGE_SIZE,
    frames_per_clip: int = VIDEO_FRAMES_PER_CLIP,
    **other_geometry: Any,
) -> "torch.Tensor":
    """ImageBind's video transform: a float32
    (clips * spatial_crops, 3, frames_per_clip, image_size, image_size) tensor
    ((5, 3, 2, 224, 224) with ImageBind's values).

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
        image_size: side of the square crops (ImageBind: 224).
        frames_per_clip: frames taken evenly from each clip (ImageBind: 2, the first and the
            last; the encoder's ``video_frames``).
        other_geometry: ignored, so that any encoder's options dict can be passed whole.
    """
    import torch

    if spatial_crops not in (1, 3):
        raise ValueError(f"spatial_crops must be 1 or 3, got {spatial_crops}")
    _check_sizes(image_size=image_size, frames_per_clip=frames_per_clip)
    loaded = load_video(video)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    crops = (1,) if spatial_crops == 1 else (0, 1, 2)
    out = []
    for start, end in _clip_bounds(loaded.duration, VIDEO_CLIP_SECONDS, clips):
        indices = _clip_frame_indices(loaded.num_frames, loaded.fps, start, end, frames_per_clip)
        clip = torch.from_numpy(loaded.frames[indices]).permute(3, 0, 1, 2).float() / 255.0
        clip = (_short_side_scale(clip, image_size) - mean) / std
        out.extend(_uniform_crop(clip, image_size, crop) for crop in crops)
    return torch.stack(out)


def _clip_frame_indices(
    num_frames: int, fps: float, start: Fraction, end: Fraction, count: int
) -> list[int]:
    """Indices of ``count`` frames spread evenly from the first to the last frame whose time
    ``i / fps`` lies in [start, end) (the first and the last for ``count=2``).

    Where no frame lies in the window (sparsely sampled frames), the frame nearest to
    ``start`` stands in for all.
    """
    first = math.ceil(float(start) * fps - 1e-9)
    last = min(math.ceil(float(end) * fps - 1e-9) - 1, num_frames - 1)
    if last < first:
        first = last = min(round(float(start) * fps), num_frames - 1)
    if count == 1:  # linspace(0, n - 1, 1) is [0]
        return [first]
    # UniformTemporalSubsample: linspace(0, n - 1, k) truncated to integers.
    span = last - first
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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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


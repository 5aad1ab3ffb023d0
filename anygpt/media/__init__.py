"""Media I/O: load and validate image, audio and video files, preprocess them for ImageBind,
and write generated media as PNG, WAV and MP4.

One module per modality (:mod:`~anygpt.media.image`, :mod:`~anygpt.media.audio`,
:mod:`~anygpt.media.video`) holds that modality's limits, loader, ImageBind preprocessing and
writer; :mod:`~anygpt.media.files` holds the file checks and the safe writer they share. The
modality registry (:mod:`anygpt.modalities`) maps each modality's name to these functions;
write media through it (``get_modality("image").write(value, path)``).

Loading
    :func:`load_image`, :func:`load_audio` and :func:`load_video` accept a path or an
    already-loaded value and return a validated value of the types in :mod:`anygpt.types`.
    Every problem a user can fix (missing, unreadable, empty, corrupt, truncated, unsupported
    or oversized file; a directory, FIFO, socket or device node instead of a file, refused from
    its ``os.stat`` without opening it) raises :class:`~anygpt.errors.MediaError` whose message starts with the
    file's path and ends with what to do about it.

Preprocessing
    :func:`image_to_encoder_input`, :func:`audio_to_encoder_input` and
    :func:`video_to_encoder_input` reproduce ``imagebind.data``'s transforms with torchvision,
    torchaudio and PyAV only (``imagebind.data`` imports pytorchvideo, which no longer imports
    with current torchvision). Known, deliberate differences are listed in each docstring.
    Their geometry (image size, mel bins, target frames, frames per clip) is keyword arguments
    whose defaults are ImageBind's; an encoder passes its own
    (:meth:`anygpt.encoders.ImageBindEncoder.preprocess_options`).

Writing
    :func:`write_image` (PNG), :func:`write_audio` (16-bit WAV) and :func:`write_video`
    (H.264 MP4, yuv420p).

Limits
    The ``MAX_*`` values re-exported here are copies; the loaders read them from their own
    module at call time, so tighten or relax them there (``anygpt.media.audio.MAX_AUDIO_SECONDS
    = 60``).

Only numpy and Pillow are imported with this package; soundfile, PyAV, torch, torchvision and
torchaudio are imported by the functions that need them.
"""

from __future__ import annotations

from anygpt.media.audio import (
    MAX_AUDIO_CHANNELS,
    MAX_AUDIO_SECONDS,
    audio_to_encoder_input,
    load_audio,
    write_audio,
)
from anygpt.media.image import MAX_IMAGE_PIXELS, image_to_encoder_input, load_image, write_image
from anygpt.media.video import (
    MAX_VIDEO_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
    MAX_VIDEO_SECONDS,
    load_video,
    video_to_encoder_input,
    write_video,
)

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
    "write_image",
    "write_audio",
    "write_video",
]

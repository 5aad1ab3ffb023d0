"""Images: load and validate PNG, JPEG, WebP, GIF and BMP files, ImageBind's vision transform,
and writing PNG.

Only numpy and Pillow are imported with this module; torch and torchvision are imported by
:func:`image_to_encoder_input`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anygpt.errors import MediaError
from anygpt.media.files import PathLike, _check_file, _read_head, _suffix, _write_file
from anygpt.media.preprocessing import _check_sizes

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_IMAGE_PIXELS", "load_image", "image_to_encoder_input", "write_image"]

logger = logging.getLogger(__name__)

# The limit is module-level, and read at call time, so that an application can tighten or relax
# it in one place: ``anygpt.media.image.MAX_IMAGE_PIXELS``.

#: Largest accepted image, in pixels (8192 x 8192). Checked from the header, before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192

#: Pillow format names accepted by :func:`load_image` (identified from content, not suffix).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_NAMEABLE_IMAGE_FORMATS = ("TIFF", "ICO", "ICNS", "PSD", "JPEG2000", "DDS", "PPM", "QOI")

# ImageBind preprocessing constants (imagebind/data.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Default of the preprocessing's ``image_size`` (ImageBind's); the encoder passes its own.
IMAGE_SIZE = 224
#: Images more elongated than this are centre-cropped to this aspect ratio before resizing,
#: so that a 100000 x 10 strip does not become a 2.2-gigapixel intermediate.
MAX_PREPROCESS_ASPECT = 16


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


# ---------------------------------------------------------------------------------------------
# ImageBind preprocessing
# ---------------------------------------------------------------------------------------------


def image_to_encoder_input(
    image: PathLike | Image.Image, *, image_size: int = IMAGE_SIZE, **other_geometry: Any
) -> "torch.Tensor":
    """ImageBind's vision transform for one image: a float32 (3, image_size, image_size) tensor.

    As ``imagebind.data.load_and_transform_vision_data``: shorter side resized to 224 (bicubic,
    Pillow's antialiased resampling), centre crop 224, scale to [0, 1], CLIP mean/std
    normalisation. Difference: images more elongated than :data:`MAX_PREPROCESS_ASPECT` : 1 are
    centre-cropped to that ratio first (the final crop is the centre square anyway).

    Args:
        image: a path or PIL image (loaded through :func:`load_image`).
        image_size: side of the square crop (ImageBind: 224).
        other_geometry: ignored. Images and videos share the encoder's ``vision`` input, so
            :meth:`~anygpt.encoders.ImageBindEncoder.preprocess_options` also names video-only
            sizes (``frames_per_clip``); accepting them lets one options dict serve both.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    _check_sizes(image_size=image_size)
    rgb = _limit_aspect(load_image(image))
    rgb = TF.resize(rgb, image_size, interpolation=InterpolationMode.BICUBIC)
    rgb = TF.center_crop(rgb, image_size)
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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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


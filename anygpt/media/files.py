"""File checks shared by the loaders, and the writer that never leaves a partial file behind."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Union

from anygpt.errors import MediaError

__all__ = ["PathLike"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


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

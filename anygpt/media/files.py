"""File checks shared by the loaders, and the writer that never leaves a partial file behind."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, Callable, Union

from anygpt.errors import MediaError

__all__ = ["PathLike", "check_media_file"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def _check_file(path: Any, kind: str) -> Path:
    """Return ``path`` as a :class:`Path` after checking it names a readable, non-empty file.

    The one check every loader (image, audio, video) and the conversation's content hash go
    through. The kind of file system object is taken from :func:`os.stat` before anything is
    opened, so a directory, FIFO, socket or device node gets its own message and a FIFO is
    never opened (opening one for reading blocks until a writer appears).

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
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        if os.path.islink(p):
            raise MediaError(
                f"{p}: is a broken symbolic link (its target {os.readlink(p)!r} does not exist);"
                " fix the link or pass the file itself"
            ) from None
        raise MediaError(f"{p}: no such file; check the path and the current directory") from None
    except NotADirectoryError:
        raise MediaError(
            f"{p}: no such file (a folder on the path is a file); check the path"
        ) from None
    except PermissionError as exc:
        raise MediaError(
            f"{p}: permission denied (a folder on the path cannot be searched); fix the"
            " folder's permissions (chmod +x)"
        ) from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = getattr(exc, "strerror", None) or exc
        raise MediaError(f"{p}: cannot access the file ({reason}); check the path") from exc
    not_regular = _describe_non_regular(mode, kind)
    if not_regular:
        raise MediaError(f"{p}: {not_regular}")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, opening it must
        # not hang; the fstat below then refuses it.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except PermissionError as exc:
        raise MediaError(f"{p}: permission denied; make the file readable (chmod +r)") from exc
    except OSError as exc:
        reason = exc.strerror or exc
        raise MediaError(f"{p}: cannot read the file ({reason}); copy it to a local disk") from exc
    try:
        not_regular = _describe_non_regular(os.fstat(fd).st_mode, kind)
        if not_regular:
            raise MediaError(f"{p}: {not_regular}")
        first = os.read(fd, 1)
    except OSError as exc:
        reason = exc.strerror or exc
        raise MediaError(f"{p}: cannot read the file ({reason}); copy it to a local disk") from exc
    finally:
        os.close(fd)
    if not first:
        raise MediaError(f"{p}: the file is empty (0 bytes); the upload or copy may have failed")
    return p


def check_media_file(path: Any, kind: str) -> Path:
    """Public name of the shared file check (see :func:`_check_file`): a :class:`Path` naming a
    readable, non-empty regular file, or :class:`~anygpt.errors.MediaError`."""
    return _check_file(path, kind)


def _describe_non_regular(mode: int, kind: str) -> str | None:
    """What is wrong with a file system object of ``mode`` as a media file (None: a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"is a directory, not a file; pass the path of the {kind} file inside it"
    if stat.S_ISFIFO(mode):
        return (
            f"is a FIFO (named pipe), not a file; pass a regular file (save the {kind} from"
            " the pipe to a file first)"
        )
    if stat.S_ISSOCK(mode):
        return f"is a socket, not a file; pass a regular file (save the {kind} to a file first)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        device = "character" if stat.S_ISCHR(mode) else "block"
        return (
            f"is a {device} device node, not a file; pass a regular file (save the {kind} to a"
            " file first)"
        )
    return f"is not a regular file; pass the path of a {kind} file"


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

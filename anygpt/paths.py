"""Where things live: the cache folder, and how relative paths in a file are resolved.

Two rules, used everywhere:

* the cache is ``$ANYGPT_CACHE``, else ``$XDG_CACHE_HOME/anygpt``, else ``~/.cache/anygpt``; an
  empty or relative value of either variable is ignored (as the XDG spec says), so the cache is
  never the current directory;
* a relative path written in a file (a model config, a training config, a manifest) is relative
  to that file's folder, never to the current directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["cache_dir", "resolve_path", "looks_like_path", "CACHE_PLACEHOLDER"]

logger = logging.getLogger(__name__)

#: Written at the start of a path in a config, it stands for :func:`cache_dir`
#: (``{cache}/weights/vicuna-7b-v0``).
CACHE_PLACEHOLDER = "{cache}"


def _absolute_env(name: str) -> Path | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        logger.warning("ignoring %s=%r: it must be an absolute path", name, value)
        return None
    return path


def cache_dir() -> Path:
    """The AnyGPT cache folder (not created here)."""
    root = _absolute_env("ANYGPT_CACHE")
    if root is not None:
        return root
    xdg = _absolute_env("XDG_CACHE_HOME")
    return (xdg if xdg is not None else Path.home() / ".cache") / "anygpt"


def looks_like_path(value: str) -> bool:
    """True for what can only be a filesystem path: a hub id is ``name`` or ``namespace/name``."""
    return value.startswith(("/", ".", "~", CACHE_PLACEHOLDER)) or "\\" in value or value.count("/") > 1


def resolve_path(value: str, base_dir: str | os.PathLike | None) -> str:
    """A path named in a file, made absolute; anything else (a hub id) unchanged.

    ``{cache}`` expands to :func:`cache_dir` and ``~`` to the home folder. A relative value is
    taken relative to ``base_dir`` (the folder of the file that names it) when it exists there or
    can only be a path (:func:`looks_like_path`); otherwise it is returned unchanged, as a hub id.
    With no ``base_dir`` a relative value is returned unchanged.
    """
    if value.startswith(CACHE_PLACEHOLDER):
        value = str(cache_dir()) + value[len(CACHE_PLACEHOLDER):]
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded) or base_dir is None:
        return expanded
    candidate = Path(base_dir) / expanded
    if candidate.exists() or looks_like_path(value):
        return str(candidate.resolve())
    return value

"""Chat turns and the media items they carry, as the LLM's prompt renderer reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["MediaRef", "Turn"]


@dataclass(frozen=True)
class MediaRef:
    """One media item of a turn.

    Attributes:
        modality: its modality name (``image``).
        key: the key of its encoder embedding in whatever cache holds it: a content hash in a
            :class:`~anygpt.conversation.Conversation`, the resolved file path in a training
            dataset. Equal keys mean the same embedding.
        source: where the item came from (a file path), when it came from a file; for messages
            and logs, never used to look the embedding up.
    """

    modality: str
    key: str
    source: Optional[str] = None


@dataclass
class Turn:
    """One chat turn. ``text`` may hold ``<image>``/``<audio>``/``<video>`` markers that fix where
    the turn's media go; media without a marker are placed before the text."""

    role: str
    text: str
    media: list[MediaRef] = field(default_factory=list)

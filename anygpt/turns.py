"""Chat turns and the media items they carry, as the LLM's prompt renderer reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["MediaRef", "SignalMark", "Turn"]


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


@dataclass(frozen=True)
class SignalMark:
    """Where an assistant turn's signal run goes (in :attr:`Turn.parts`): the renderer puts the
    ``modality``'s signal tokens there, and nothing else can."""

    modality: str


@dataclass
class Turn:
    """One chat turn. ``text`` is plain text: typed control tokens (``[IMG0]``, ``<Img>``,
    ``<|im_start|>``) stay text. A user turn's ``<image>``/``<audio>``/``<video>`` tags fix
    where its media go; media without a tag are placed before the text. In an assistant turn a
    complete signal run written in ``text`` (``[IMG0][IMG1][IMG2][IMG3]``, as the model emits
    it) is the real run, unless ``parts`` is given.

    Attributes:
        parts: an assistant turn's content as plain strings and :class:`SignalMark` s; when set,
            it replaces ``text`` for the prompt, so that text around a run (a caption) is never
            read as a run, whatever it contains.
    """

    role: str
    text: str
    media: list[MediaRef] = field(default_factory=list)
    parts: Optional[tuple[Union[str, SignalMark], ...]] = None

"""Multi-turn conversation state: the turns, and each media item's encoding, computed once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from anygpt.errors import MediaError
from anygpt.llm import MediaRef, Turn
from anygpt.modalities import get_modality

__all__ = ["Conversation", "MediaInputs"]

MediaInputs = Mapping[str, Iterable[Any]]


def _content_key(modality: str, item: Any) -> str:
    """A key that is equal for equal media: the hash of the file's bytes or of the decoded values."""
    digest = hashlib.sha1(modality.encode())
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise MediaError(f"{path}: no such file; check the path")
        digest.update(path.read_bytes())
    elif hasattr(item, "tobytes") and hasattr(item, "size") and hasattr(item, "mode"):  # PIL image
        digest.update(f"{item.mode}{item.size}".encode())
        digest.update(item.tobytes())
    else:
        array = getattr(item, "waveform", getattr(item, "frames", item))
        digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(str(getattr(item, "sample_rate", getattr(item, "fps", ""))).encode())
    return digest.hexdigest()


@dataclass
class Conversation:
    """The turns of a chat and the encoder embeddings of every media item in it.

    Media are loaded and validated when a turn is added (a bad file fails there and then, and
    the conversation is left unchanged); they are encoded on first use and never again: later
    turns reuse the cached embedding.
    """

    turns: list[Turn] = field(default_factory=list)
    encodings: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, tuple[str, Any]] = field(default_factory=dict)

    def add_user(self, text: str, media: MediaInputs | None = None) -> Turn:
        """Append a user turn with media by modality (``{"image": [path, ...]}``).

        Raises:
            MediaError: a file is missing, corrupt, empty or of an unsupported format.
            UnknownNameError: an unknown modality.
        """
        refs, loaded = [], {}
        for modality, items in (media or {}).items():
            spec = get_modality(modality)
            for item in items:
                key = _content_key(modality, item)
                if key not in self.encodings and key not in self.pending and key not in loaded:
                    loaded[key] = (modality, spec.load(item))
                refs.append(MediaRef(modality, key))
        self.pending.update(loaded)
        turn = Turn("user", text, refs)
        self.turns.append(turn)
        return turn

    def add_assistant(self, text: str) -> Turn:
        """Append an assistant turn (its raw text, signal tokens included)."""
        turn = Turn("assistant", text)
        self.turns.append(turn)
        return turn

    def set_system(self, text: str) -> Turn:
        """Set (or replace) the system message at the start of the conversation."""
        turn = Turn("system", text)
        if self.turns and self.turns[0].role == "system":
            self.turns[0] = turn
        else:
            self.turns.insert(0, turn)
        return turn

    def undo(self) -> None:
        """Drop the last user turn and everything after it."""
        for i in range(len(self.turns) - 1, -1, -1):
            if self.turns[i].role == "user":
                del self.turns[i:]
                return

    @property
    def num_encoded(self) -> int:
        return len(self.encodings)

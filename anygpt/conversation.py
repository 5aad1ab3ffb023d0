"""Multi-turn conversation state: the turns, and each media item's encoding, computed once.

A :class:`Conversation` owns its state. Callers add turns and record encodings through its
methods, and undo a failed turn with :meth:`Conversation.mark` / :meth:`Conversation.rollback`
(or the :meth:`Conversation.atomic` block), never by editing its fields.

It also holds the LLM's KV cache from the last answer, so that the next turn prefills only its
new tokens. The cache says which token or media slot each of its positions holds, and it is
used only up to where the next prompt first differs; a failed turn drops it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np

from anygpt.media.files import check_media_file
from anygpt.modalities import get_modality
from anygpt.turns import MediaRef, Turn

if TYPE_CHECKING:
    import torch

    from anygpt.generation import PromptCache

__all__ = ["Conversation", "ConversationMark", "MediaInputs", "PendingMedia"]

#: Media of one message by modality: ``{"image": [path_or_value, ...], ...}``.
MediaInputs = Mapping[str, Iterable[Any]]


def _content_key(modality: str, item: Any) -> str:
    """A key that is equal for equal media: the hash of the file's bytes or of the decoded values."""
    digest = hashlib.sha1(modality.encode())
    if isinstance(item, (str, os.PathLike)):
        # The loaders' shared check: a directory, FIFO or device gets its own message, and a
        # FIFO is never opened (reading one would block).
        path = check_media_file(item, modality)
        digest.update(path.read_bytes())
    elif hasattr(item, "tobytes") and hasattr(item, "size") and hasattr(item, "mode"):  # PIL image
        digest.update(f"{item.mode}{item.size}".encode())
        digest.update(item.tobytes())
    else:
        array = getattr(item, "waveform", getattr(item, "frames", item))
        digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(str(getattr(item, "sample_rate", getattr(item, "fps", ""))).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PendingMedia:
    """A loaded media item that has not been encoded yet."""

    key: str
    modality: str
    value: Any


@dataclass(frozen=True)
class ConversationMark:
    """A point to roll a conversation back to (see :meth:`Conversation.mark`)."""

    turns: tuple[Turn, ...]
    pending: frozenset[str]


class Conversation:
    """The turns of a chat and the encoder embeddings of every media item in it.

    Media are loaded and validated when a turn is added (a bad file fails there and then, and
    the conversation is left unchanged); they are encoded on first use and never again: later
    turns reuse the recorded embedding.
    """

    def __init__(self, *, keep_cache: bool = True) -> None:
        """``keep_cache=False`` never keeps the LLM's KV cache between turns (each turn is
        prefilled from scratch, and no cache memory stays held by the conversation)."""
        self._turns: list[Turn] = []
        self._encodings: dict[str, "torch.Tensor"] = {}
        self._pending: dict[str, PendingMedia] = {}
        self.keep_cache = keep_cache
        self._cache: PromptCache | None = None

    def __repr__(self) -> str:
        return (f"Conversation({len(self._turns)} turns, {len(self._encodings)} encoded, "
                f"{len(self._pending)} pending media, {self.cached_tokens} cached tokens)")

    # Turns -------------------------------------------------------------------------------------
    @property
    def turns(self) -> tuple[Turn, ...]:
        """The turns, oldest first (a read-only view)."""
        return tuple(self._turns)

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
                if key not in self._encodings and key not in self._pending and key not in loaded:
                    loaded[key] = PendingMedia(key, modality, spec.load(item))
                source = str(item) if isinstance(item, (str, os.PathLike)) else None
                refs.append(MediaRef(modality, key, source))
        self._pending.update(loaded)
        turn = Turn("user", text, refs)
        self._turns.append(turn)
        return turn

    def add_assistant(self, text: str) -> Turn:
        """Append an assistant turn (its raw text, signal tokens included)."""
        turn = Turn("assistant", text)
        self._turns.append(turn)
        return turn

    def set_system(self, text: str) -> Turn:
        """Set (or replace) the system message at the start of the conversation."""
        turn = Turn("system", text)
        if self._turns and self._turns[0].role == "system":
            self._turns[0] = turn
        else:
            self._turns.insert(0, turn)
        return turn

    def undo(self) -> None:
        """Drop the last user turn and everything after it."""
        for i in range(len(self._turns) - 1, -1, -1):
            if self._turns[i].role == "user":
                del self._turns[i:]
                break
        self._forget_unused_pending()

    # Rolling back ------------------------------------------------------------------------------
    def mark(self) -> ConversationMark:
        """The current state, to :meth:`rollback` to if a turn fails."""
        return ConversationMark(tuple(self._turns), frozenset(self._pending))

    def rollback(self, mark: ConversationMark) -> None:
        """Return to ``mark``: later turns are dropped, media they brought that were never
        encoded are forgotten (encodings already computed stay cached), and so is the KV cache."""
        self._turns[:] = mark.turns
        self._cache = None
        for key in set(self._pending) - mark.pending:
            del self._pending[key]

    @contextlib.contextmanager
    def atomic(self) -> Iterator["Conversation"]:
        """A block whose changes to the conversation are rolled back if it raises."""
        mark = self.mark()
        try:
            yield self
        except BaseException:
            self.rollback(mark)
            raise

    # The KV cache ------------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> int:
        """How many positions the kept KV cache holds (0 without one)."""
        return len(self._cache) if self._cache is not None else 0

    def take_cache(self) -> "PromptCache | None":
        """Hand the kept KV cache to the turn being answered; the conversation no longer holds
        it (reusing it changes it in place), so a turn that fails leaves none behind."""
        cache, self._cache = self._cache, None
        return cache

    def keep(self, cache: "PromptCache | None") -> None:
        """Keep the KV cache of the answer just generated, for the next turn (unless
        ``keep_cache`` is off)."""
        self._cache = cache if self.keep_cache else None

    def clear_cache(self) -> None:
        """Drop the kept KV cache, e.g. after changing the model's weights in place."""
        self._cache = None

    # Encodings ---------------------------------------------------------------------------------
    def pending(self) -> list[PendingMedia]:
        """Media added but not encoded yet, in the order they were added."""
        return list(self._pending.values())

    def record_encoding(self, key: str, embedding: "torch.Tensor") -> None:
        """Store the encoder embedding of the pending item ``key``."""
        if key not in self._pending and key not in self._encodings:
            raise KeyError(f"no media item with key {key!r} in this conversation")
        self._encodings[key] = embedding
        self._pending.pop(key, None)

    def encoding(self, key: str) -> "torch.Tensor":
        """The recorded embedding of ``key``.

        Raises:
            KeyError: the item was never encoded (encode :meth:`pending` items first).
        """
        try:
            return self._encodings[key]
        except KeyError:
            raise KeyError(f"media item {key!r} has not been encoded; encode the conversation's "
                           f"pending media first") from None

    @property
    def num_encoded(self) -> int:
        """How many media items have an embedding."""
        return len(self._encodings)

    def _forget_unused_pending(self) -> None:
        used = {ref.key for turn in self._turns for ref in turn.media}
        for key in set(self._pending) - used:
            del self._pending[key]

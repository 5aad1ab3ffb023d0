"""Per-browser-session chat state and upload checks (no Gradio imports here)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from anygpt.conversation import Conversation
from anygpt.errors import MediaError
from anygpt.modalities import MODALITIES, get_modality, modality_for_suffix

logger = logging.getLogger(__name__)

__all__ = ["ChatSession", "UserMessage", "classify_uploads", "upload_suffixes", "describe_modalities"]


def upload_suffixes(modalities: Sequence[str]) -> list[str]:
    """The file suffixes the registry accepts for ``modalities``, in their order."""
    return [suffix for name in modalities for suffix in get_modality(name).input_suffixes]


def describe_modalities(modalities: Sequence[str]) -> str:
    """``"an image, an audio clip or a video"``: the registry's nouns, joined for a sentence."""
    nouns = [get_modality(name).noun for name in modalities]
    return "".join(nouns) if len(nouns) < 2 else f"{', '.join(nouns[:-1])} or {nouns[-1]}"


@dataclass
class UserMessage:
    """What the user sent in one turn: text and uploaded file paths."""

    text: str
    files: list[str] = field(default_factory=list)


@dataclass
class ChatSession:
    """One browser (or API client) session: its conversation and the turns shown.

    Attributes:
        conversation: the model-side conversation; it keeps each upload's encoding, so a turn
            never re-encodes media of earlier turns.
        session_id: names the session's output folder.
        turns: one ``(UserMessage, TurnState)`` per displayed turn; a turn is in
            ``conversation`` when its state is ``done`` (rejected or failed turns are not).
        turn_counter: numbers the per-turn output folders (never reused, so retry does not
            overwrite files a browser may still show).
    """

    conversation: Conversation = field(default_factory=Conversation)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    turns: list[tuple[UserMessage, Any]] = field(default_factory=list)
    turn_counter: int = 0

    def next_turn_dir(self, output_dir: Path) -> Path:
        path = Path(output_dir) / self.session_id / f"{self.turn_counter:03d}"
        self.turn_counter += 1
        return path

    def undo(self) -> UserMessage | None:
        """Drop the last displayed turn (and its conversation turn, if it had one)."""
        if not self.turns:
            return None
        message, state = self.turns.pop()
        if state.done:
            self.conversation.undo()
        return message


def classify_uploads(files: Sequence[Any], max_upload_mb: float,
                     accepted: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Sort uploaded files by modality from their suffix and enforce the size limit.

    Args:
        files: paths (or Gradio file dicts with a ``path``).
        max_upload_mb: the size limit of one file.
        accepted: the modalities the model reads (default: every registered modality).

    Raises:
        MediaError: an unsupported file type, a modality the model does not read, or a file
            over ``max_upload_mb``.
    """
    accepted = list(MODALITIES) if accepted is None else list(accepted)
    media: dict[str, list[str]] = {}
    for item in files:
        path = Path(item if isinstance(item, (str, Path)) else item.get("path", ""))
        suffix = path.suffix.lower()
        spec = modality_for_suffix(suffix) if suffix else None
        if spec is None or spec.name not in accepted:
            what = (f"unsupported file type {suffix or '(none)'}" if spec is None
                    else f"this model does not read {spec.name} input ({suffix})")
            hint = (f"attach {describe_modalities(accepted)} ({', '.join(upload_suffixes(accepted))})"
                    if accepted else "this model reads text only")
            raise MediaError(f"{path.name}: {what}; {hint}")
        if not path.is_file():
            raise MediaError(f"{path.name}: the upload is missing; attach it again")
        size_mb = path.stat().st_size / 2**20
        if size_mb > max_upload_mb:
            raise MediaError(f"{path.name}: the file is {size_mb:.1f} MB, over the upload limit of "
                             f"{max_upload_mb:g} MB")
        media.setdefault(spec.name, []).append(str(path))
    return media

"""Per-browser-session chat state and upload checks (no Gradio imports here)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from anygpt.conversation import Conversation
from anygpt.errors import MediaError

logger = logging.getLogger(__name__)

__all__ = ["ChatSession", "UserMessage", "classify_uploads", "MODALITY_SUFFIXES"]

#: File suffixes accepted per input modality (the content is validated again when loaded).
MODALITY_SUFFIXES: dict[str, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"),
    "audio": (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3"),
    "video": (".mp4", ".mov", ".m4v", ".webm", ".avi", ".mkv"),
}


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


def classify_uploads(files: Sequence[Any], max_upload_mb: float) -> dict[str, list[str]]:
    """Sort uploaded files by modality from their suffix and enforce the size limit.

    Raises:
        MediaError: an unsupported file type or a file over ``max_upload_mb``.
    """
    media: dict[str, list[str]] = {}
    for item in files:
        path = Path(item if isinstance(item, (str, Path)) else item.get("path", ""))
        suffix = path.suffix.lower()
        modality = next((m for m, sufs in MODALITY_SUFFIXES.items() if suffix in sufs), None)
        if modality is None:
            accepted = ", ".join(s for sufs in MODALITY_SUFFIXES.values() for s in sufs)
            raise MediaError(f"{path.name}: unsupported file type {suffix or '(none)'}; "
                             f"attach an image, audio or video file ({accepted})")
        if not path.is_file():
            raise MediaError(f"{path.name}: the upload is missing; attach it again")
        size_mb = path.stat().st_size / 2**20
        if size_mb > max_upload_mb:
            raise MediaError(f"{path.name}: the file is {size_mb:.1f} MB, over the upload limit of "
                             f"{max_upload_mb:g} MB")
        media.setdefault(modality, []).append(str(path))
    return media

"""One chat turn: validate the upload, stream the pipeline, write media as they arrive.

This module knows nothing about Gradio; :mod:`app.chat` renders its :class:`TurnState`s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from anygpt.errors import AnyGPTError, MediaError
from anygpt.types import MODALITY_EXTENSIONS, GenerationOutput, MediaSegment, MediaStarted, TextDelta

from anygpt.app.session import ChatSession, UserMessage, classify_uploads

logger = logging.getLogger(__name__)

__all__ = ["Part", "TurnState", "run_turn", "OUTPUT_CHOICES"]

OUTPUT_CHOICES = ("auto", "image", "audio", "video")


@dataclass
class Part:
    """A piece of an answer, in the order the model wrote it.

    ``kind`` is "text" (``value`` is the text), "image"/"audio"/"video" (``value`` is the
    written file) or "pending" (``value`` names the modality whose decoder is running).
    """

    kind: str
    value: str


@dataclass
class TurnState:
    """The answer so far; the last state of a turn has ``done`` or ``error`` set."""

    parts: list[Part] = field(default_factory=list)
    error: str | None = None
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(p.value for p in self.parts if p.kind == "text").strip()

    @property
    def files(self) -> list[str]:
        return [p.value for p in self.parts if p.kind in MODALITY_EXTENSIONS]


def _clean(message: str, files: list[str]) -> str:
    """Error text without server-side temp paths: a file is named by its base name."""
    for f in files:
        message = message.replace(str(f), Path(f).name)
    return message


def run_turn(pipe: Any, session: ChatSession, message: UserMessage, *, output_dir: Path,
             output: str = "auto", settings: Mapping[str, Any] | None = None,
             max_upload_mb: float = 50.0) -> Iterator[TurnState]:
    """Answer ``message`` in ``session``; yield the growing answer.

    Bad input and generation failures end in a state with ``error`` set; the session is then
    as it was before the turn (apart from cached encodings), and the turn is recorded as failed.
    """
    state = TurnState()
    session.turns.append((message, state))
    conversation = session.conversation
    pending_before = set(conversation.pending)
    added = False
    try:
        if not message.text.strip() and not message.files:
            raise MediaError("empty message: type some text or attach a file")
        if output not in OUTPUT_CHOICES:
            raise MediaError(f"unknown output choice {output!r}; choose one of {', '.join(OUTPUT_CHOICES)}")
        media = classify_uploads(message.files, max_upload_mb)
        conversation.add_user(message.text, media)
        added = True
        turn_dir = session.next_turn_dir(output_dir)
        outputs = () if output == "auto" else (output,)
        kwargs = {k: v for k, v in (settings or {}).items() if v is not None}
        result = None
        for event in pipe.stream(conversation, outputs=outputs, **kwargs):
            if isinstance(event, TextDelta):
                if state.parts and state.parts[-1].kind == "text":
                    state.parts[-1].value += event.text
                else:
                    state.parts.append(Part("text", event.text))
            elif isinstance(event, MediaStarted):
                state.parts.append(Part("pending", event.modality))
            elif isinstance(event, MediaSegment):
                path = _write(event, turn_dir, state)
                for i in range(len(state.parts) - 1, -1, -1):
                    if state.parts[i].kind == "pending":
                        state.parts[i] = Part(event.modality, path)
                        break
                else:
                    state.parts.append(Part(event.modality, path))
            elif isinstance(event, GenerationOutput):
                result = event
                continue
            yield state
        if result is None:
            raise RuntimeError("the pipeline ended without an answer")
        state.done = True
        yield state
    except Exception as exc:  # noqa: BLE001 - every failure is shown in the chat; the app keeps serving
        if isinstance(exc, AnyGPTError):
            logger.info("turn rejected: %s", exc)
            text = str(exc)
        else:
            logger.exception("generation failed")
            text = f"generation failed ({type(exc).__name__}: {exc})"
        if added:
            conversation.undo()
            for key in set(conversation.pending) - pending_before:
                del conversation.pending[key]
        state.parts = [p for p in state.parts if p.kind != "pending"]
        state.error = _clean(text, message.files)
        yield state


def _write(segment: MediaSegment, turn_dir: Path, state: TurnState) -> str:
    from anygpt.media import write_media

    index = sum(1 for p in state.parts if p.kind == segment.modality)
    turn_dir.mkdir(parents=True, exist_ok=True)
    path = turn_dir / f"{segment.modality}_{index}{MODALITY_EXTENSIONS[segment.modality]}"
    write_media(segment.modality, segment.value, path)
    return str(path)

"""One chat turn: validate the upload, stream the pipeline, write media as they arrive.

This module knows nothing about Gradio; :mod:`app.chat` renders its :class:`TurnState`s.
"""

from __future__ import annotations

import logging
import threading
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from anygpt.errors import AnyGPTError, Cancelled, ConfigError
from anygpt.modalities import MODALITIES, get_modality
from anygpt.types import DecodeProgress, GenerationOutput, MediaSegment, MediaStarted, TextDelta

from anygpt.app.session import ChatSession, UserMessage, classify_uploads

logger = logging.getLogger(__name__)

__all__ = ["Part", "TurnState", "run_turn", "output_choices", "AUTO"]

#: The output choice that lets the model decide which media to generate.
AUTO = "auto"


def output_choices(pipe: Any) -> tuple[str, ...]:
    """What the user may require of an answer: ``auto`` or one of the model's output modalities."""
    return (AUTO, *pipe.config.output_modalities)


@dataclass
class Part:
    """A piece of an answer, in the order the model wrote it.

    ``kind`` is "text" (``value`` is the text), "pending" (``value`` names the modality whose
    decoder is running) or a modality name (``value`` is the written file).
    """

    kind: str
    value: str


@dataclass
class TurnState:
    """The answer so far; the last state of a turn has ``done``, ``stopped`` or ``error`` set.

    Attributes:
        stopped: the user stopped the turn; ``parts`` keep what was answered until then (the
            conversation does not: the pipeline rolled the turn back).
        progress: the latest decoder step report of each modality being decoded.
    """

    parts: list[Part] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    stopped: bool = False
    progress: dict[str, DecodeProgress] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(p.value for p in self.parts if p.kind == "text").strip()

    @property
    def files(self) -> list[str]:
        return [p.value for p in self.parts if p.kind in MODALITIES]


def _clean(message: str, files: list[str]) -> str:
    """Error text without server-side temp paths: a file is named by its base name."""
    for f in files:
        message = message.replace(str(f), Path(f).name)
    return message


def run_turn(pipe: Any, session: ChatSession, message: UserMessage, *, output_dir: Path,
             output: str = AUTO, settings: Mapping[str, Any] | None = None,
             max_upload_mb: float = 50.0, cancel: threading.Event | None = None,
             on_update: Callable[[TurnState], None] | None = None) -> Iterator[TurnState]:
    """Answer ``message`` in ``session``; yield the growing answer.

    Bad input (``ConfigError`` for the message or the output choice, ``MediaError`` for the
    uploads) and generation failures end in a state with ``error`` set. The pipeline adds the
    message to the conversation and rolls it back when the turn fails or is stopped, so the
    conversation is then as it was before the turn (apart from cached encodings) and the turn is
    shown as failed. ``settings`` are the pipeline's keyword arguments (None: the preset's value).

    ``cancel`` (set from another thread) stops the turn at the pipeline's next token or
    denoising step; the last state then has ``stopped`` set and keeps the answer so far.
    ``on_update(state)`` is called when the state changes between two yields: after each
    denoising step, from inside the pipeline call (``state.progress`` has the step).
    """
    state = TurnState()
    session.turns.append((message, state))
    try:
        if not message.text.strip() and not message.files:
            raise ConfigError("empty message: type some text or attach a file")
        choices = output_choices(pipe)
        if output not in choices:
            raise ConfigError(f"unknown output choice {output!r}; this model offers {', '.join(choices)}")
        media = classify_uploads(message.files, max_upload_mb, pipe.config.input_modalities)
        turn_dir = session.next_turn_dir(output_dir)
        outputs = () if output == AUTO else (output,)
        kwargs = {k: v for k, v in (settings or {}).items() if v is not None}
        if cancel is not None:
            kwargs["cancel"] = cancel
        if on_update is not None:
            def on_progress(step: DecodeProgress) -> None:
                state.progress[step.modality] = step
                on_update(state)

            kwargs["on_progress"] = on_progress
        result = None
        events = pipe.stream(session.conversation, message.text, media=media, outputs=outputs, **kwargs)
        # closing(): when this loop fails (or our consumer stops), the pipeline's stream ends
        # here and now, and with it the turn, which the pipeline rolls back.
        with closing(events):
            for event in events:
                if isinstance(event, TextDelta):
                    if state.parts and state.parts[-1].kind == "text":
                        state.parts[-1].value += event.text
                    else:
                        state.parts.append(Part("text", event.text))
                elif isinstance(event, MediaStarted):
                    state.parts.append(Part("pending", event.modality))
                elif isinstance(event, MediaSegment):
                    path = _write(event, turn_dir, state)
                    # A modality's items are decoded together and arrive in answer order, so each
                    # fills the first placeholder of its modality.
                    for i, part in enumerate(state.parts):
                        if part.kind == "pending" and part.value == event.modality:
                            state.parts[i] = Part(event.modality, path)
                            break
                    else:
                        state.parts.append(Part(event.modality, path))
                    if not any(p.kind == "pending" and p.value == event.modality for p in state.parts):
                        state.progress.pop(event.modality, None)
                elif isinstance(event, GenerationOutput):
                    result = event
                    continue
                yield state
        if result is None:
            raise RuntimeError("the pipeline ended without an answer")
        state.done = True
        yield state
    except GeneratorExit:  # our consumer stopped mid-turn: the pipeline has rolled it back
        if not state.done:
            _stop(state)
        raise
    except Cancelled as exc:  # the user stopped the turn: the pipeline has rolled it back
        logger.info("turn stopped: %s", exc)
        _stop(state)
        yield state
    except Exception as exc:  # noqa: BLE001 - every failure is shown in the chat; the app keeps serving
        if isinstance(exc, AnyGPTError):
            logger.info("turn rejected (%s): %s", type(exc).__name__, exc)
            text = str(exc)
        else:
            logger.exception("generation failed")
            text = f"generation failed ({type(exc).__name__}: {exc})"
        state.parts = [p for p in state.parts if p.kind != "pending"]
        state.progress.clear()
        state.error = _clean(text, message.files)
        yield state


def _stop(state: TurnState) -> None:
    """Mark ``state`` stopped: what was answered stays, unfinished media go."""
    state.parts = [p for p in state.parts if p.kind != "pending"]
    state.progress.clear()
    state.stopped = True


def _write(segment: MediaSegment, turn_dir: Path, state: TurnState) -> str:
    """Write one generated item as ``<modality>_<n><suffix>`` with the registry's writer."""
    spec = get_modality(segment.modality)
    index = sum(1 for p in state.parts if p.kind == segment.modality)
    return str(spec.write(segment.value, turn_dir / f"{spec.name}_{index}{spec.output_suffix}"))

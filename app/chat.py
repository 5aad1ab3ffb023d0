"""The Gradio Blocks chat app: :func:`build_app` takes a pipeline and returns ``gr.Blocks``.

The app loads no model: it takes anything with the pipeline's call shape (``stream``,
``config``, ``device``), so tests drive it with the ``tiny`` preset or a stub.

Nothing here names a modality or a setting: what can be uploaded, generated and shown comes from
the modality registry (:mod:`anygpt.modalities`) and the model's config, and the settings
controls from the declared options (:data:`~anygpt.config.SAMPLING_OPTIONS`,
:data:`~anygpt.config.DECODE_OPTIONS`).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import gradio as gr

from anygpt.config import DECODE_OPTIONS, SAMPLING_OPTIONS
from anygpt.modalities import get_modality
from anygpt.options import Option
from anygpt.paths import resolve_path

from anygpt.app.engine import AUTO, TurnState, output_choices, run_turn
from anygpt.app.gate import ModelGate
from anygpt.app.session import ChatSession, UserMessage, describe_modalities, upload_suffixes
from anygpt.app.threaded import ThreadedIterator

logger = logging.getLogger(__name__)

__all__ = ["build_app", "API_NAME", "SEED", "APP_CSS", "control_options", "ui_settings", "decode_defaults"]

#: The named endpoint for ``gradio_client``: ``client.predict(..., api_name="/chat")``.
API_NAME = "chat"

#: The option shown as a number box rather than a slider; -1 there means random (None).
SEED = "seed"

#: The API endpoint streams text at most this often (seconds); media and the end always go out.
_API_UPDATE_S = 0.05

#: Media in the chat at a sensible size: small ones (a 64-px image or video) are shown at
#: 192 px rather than stretched to the chat's width, large ones shrink to at most 512 px.
APP_CSS = """
#chatbot .message img, #chatbot .message video {
  width: auto !important; height: auto !important; min-width: 192px;
  max-width: min(100%, 512px) !important; max-height: 512px !important; object-fit: contain;
}
"""

#: What the stop button's turn shows at its end.
STOPPED = "*■ Stopped.*"


# Settings: one control per declared option ---------------------------------------------------
def control_options() -> tuple[Option, ...]:
    """The settings the app shows, in declaration order: every option with ``ui``, and the seed.

    These are also the settings parameters of the ``/chat`` API endpoint, named as the options
    (so as the pipeline's keyword arguments).
    """
    return tuple(opt for opt in (*SAMPLING_OPTIONS, *DECODE_OPTIONS) if opt.ui is not None or opt.name == SEED)


def _is_decode(opt: Option) -> bool:
    """A decoder option: its control's 0 means the preset's (the decoders') own value."""
    return opt.name in {o.name for o in DECODE_OPTIONS}


def decode_defaults(config: Any) -> dict[str, dict[str, Any]]:
    """Each decode option's preset value per output modality: ``{"steps": {"image": 25, ...}}``.

    Read from the decoders' configs (nothing is loaded); a modality whose decoder leaves an
    option unset (its native size, its own frame rate) is not listed for it.
    """
    modalities = getattr(config, "modalities", None) or {}
    defaults: dict[str, dict[str, Any]] = {opt.name: {} for opt in DECODE_OPTIONS}
    for modality in getattr(config, "output_modalities", ()):
        decoder = getattr(modalities.get(modality), "decoder", None)
        for opt in DECODE_OPTIONS:
            value = getattr(decoder, opt.name, None)
            if value is not None:
                defaults[opt.name][modality] = value
    return defaults


def _preset_value(per_modality: dict[str, Any]) -> Any:
    """The one value the output modalities share, or None where they differ or none is set."""
    values = set(per_modality.values())
    return values.pop() if len(values) == 1 else None


def _label(opt: Option) -> str:
    return opt.name.replace("_", " ").capitalize()


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _control(opt: Option, generation: Any, defaults: dict[str, dict[str, Any]] | None = None) -> gr.components.Component:
    """The control of one option: a slider, or for the seed a number box.

    A decode slider starts at the preset's value where the output modalities share one (its
    label says so); where they differ it starts at 0, and its label names each modality's value.
    Left there (or at 0), each decoder keeps its preset value.
    """
    if opt.name == SEED:
        return gr.Number(value=-1, precision=0, label=f"{_label(opt)} (-1: random)", info=opt.help)
    low, high, step = opt.ui
    if _is_decode(opt):
        per_modality = (defaults or {}).get(opt.name, {})
        shared = _preset_value(per_modality)
        if shared is not None:
            preset = _number(shared)
        elif per_modality:
            preset = ", ".join(f"{m} {_number(v)}" for m, v in per_modality.items())
        else:
            preset = "native"
        value = 0 if shared is None else shared
        return gr.Slider(min(low, 0), max(high, value), value=value, step=step,
                         label=f"{_label(opt)} (preset: {preset})",
                         info=f"{opt.help}; 0 or the preset value: each decoder's own", elem_classes=["decode-option"])
    value = getattr(generation, opt.name, opt.default)
    value = low if value is None else value
    return gr.Slider(min(low, value), max(high, value), value=value, step=step, label=_label(opt), info=opt.help)


def _setting(opt: Option, value: Any, preset: Any = None) -> Any:
    """One control's value → the pipeline's keyword argument (None: the preset's value)."""
    if value is None:
        return None
    if opt.name == SEED:
        return None if value < 0 else int(value)
    if _is_decode(opt) and (value == 0 or (preset is not None and value == preset)):
        return None
    return opt.type(value)


def ui_settings(values: Sequence[Any], options: Sequence[Option] | None = None,
                defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Control values, in :func:`control_options` order → the pipeline's keyword arguments.

    ``defaults`` (:func:`decode_defaults`) gives the preset values the decode sliders start at:
    a slider left at its preset value, like one at 0, leaves each decoder its own value.
    """
    options = control_options() if options is None else options
    if len(values) != len(options):
        raise ValueError(f"expected {len(options)} setting values ({', '.join(o.name for o in options)}), "
                         f"got {len(values)}")
    defaults = defaults or {}
    return {opt.name: _setting(opt, value, _preset_value(defaults.get(opt.name, {})))
            for opt, value in zip(options, values)}


def _with_signature(fn: Callable, names: Sequence[str]) -> Callable:
    """Give ``fn(*args)`` the parameter names ``names``: Gradio names an endpoint's API
    parameters after its function's signature (``gradio.utils.get_function_params``)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature([inspect.Parameter(name, kind) for name in names])
    return fn


# Rendering ----------------------------------------------------------------------------------------
def _user_message(value: Any, extra_files: Sequence[str] = ()) -> UserMessage:
    value = value or {}
    files = []
    for f in list(value.get("files") or []) + [f for f in extra_files if f]:
        files.append(f if isinstance(f, str) else f.get("path"))
    return UserMessage(str(value.get("text") or ""), files)


def _media_component(modality: str, path: str) -> gr.components.Component:
    """The Gradio component the registry names for ``modality`` (a file link if there is none)."""
    return getattr(gr, get_modality(modality).ui_component, gr.File)(path)


def _render_turn(message: UserMessage, state: TurnState) -> list[dict]:
    user: list[Any] = [message.text] if message.text else []
    user += [{"path": f} for f in message.files if Path(f).is_file()]
    messages = [{"role": "user", "content": user or "(empty message)"}]
    content: list[Any] = []
    for part in state.parts:
        if part.kind == "text":
            if part.value.strip():
                content.append(part.value)
        elif part.kind == "pending":
            step = state.progress.get(part.value)
            what = f"{step.describe()}" if step else f"{get_modality(part.value).noun}…"
            content.append(f"*⏳ making {what}*")
        else:
            content.append(_media_component(part.kind, part.value))
    if state.stopped:
        content.append(STOPPED)
    if content:
        messages.append({"role": "assistant", "content": content})
    elif not state.done and not state.error:
        messages.append({"role": "assistant", "content": "*…*"})
    if state.error:
        messages.append({"role": "assistant", "content": f"⚠️ **Error:** {state.error}"})
    elif state.done and not content:
        messages.append({"role": "assistant", "content": "*(empty answer)*"})
    return messages


def _history(session: ChatSession) -> list[dict]:
    return [m for message, state in session.turns for m in _render_turn(message, state)]


def _write_examples(folder: Path) -> dict[str, str]:
    """Small example media under the served output folder (the examples must work on `mini`)."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image, audio = folder / "red_square.png", folder / "tone_440hz.wav"
    if not image.is_file():
        pixels = np.full((128, 128, 3), 245, dtype=np.uint8)
        pixels[32:96, 32:96] = (220, 30, 30)
        Image.fromarray(pixels).save(image)
    if not audio.is_file():
        t = np.arange(16000) / 16000.0
        sf.write(audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return {"image": str(image), "audio": str(audio)}


def _examples(pipe: Any, folder: Path, inputs: Sequence[str]) -> list[list[dict]]:
    """The example messages: the model's own (``config.examples``, e.g. inside the world the
    miniature knows), else general ones; those attaching a modality the model does not read are
    left out."""
    own = getattr(pipe.config, "examples", None)
    if own:
        base = getattr(pipe, "base_dir", None)
        return [[{"text": example.text,
                  "files": [resolve_path(p, base) for paths in example.media.values() for p in paths]}]
                for example in own]
    files = _write_examples(folder)
    examples = [("Hello! Who are you?", None),
                ("What is in this picture? Draw a similar one.", "image"),
                ("Describe this sound, then make a short tune.", "audio"),
                ("Show me a short video of waves on a beach.", None)]
    return [[{"text": text, "files": [files[modality]] if modality else []}]
            for text, modality in examples if modality is None or modality in inputs]


# The app ------------------------------------------------------------------------------------------
def build_app(pipe: Any, *, output_dir: str | Path = "outputs/app", max_upload_mb: float = 50.0,
              concurrency: int = 1, title: str = "AnyGPT", gate: ModelGate | None = None) -> gr.Blocks:
    """Build the chat app around ``pipe``.

    Args:
        pipe: an :class:`~anygpt.AnyGPTPipeline` or any object with its ``stream(conversation,
            message, media=..., outputs=..., **settings)``, ``config`` (``input_modalities``,
            ``output_modalities``, ``generation``, ``name``) and ``device``.
        output_dir: generated media are written to ``output_dir/<session>/<turn>/``; launch with
            :func:`app.server.launch` so that only this folder is served.
        max_upload_mb: larger uploads are refused with an error in the chat.
        concurrency: model calls running at once (the queue holds the rest).
        gate: a model-call budget shared with other front ends of the same process (the
            OpenAI-compatible API of ``anygpt serve``); each turn holds one of its slots.
    """
    gate = gate or ModelGate(concurrency)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    config = pipe.config
    inputs = list(config.input_modalities)
    options = control_options()
    defaults = decode_defaults(config)
    preset = getattr(config, "name", "custom")
    device = getattr(pipe, "device", "cpu")
    examples = _examples(pipe, output_dir / "examples", inputs)
    model_events = dict(concurrency_limit=concurrency, concurrency_id="model")
    attach = f"attach {describe_modalities(inputs)}, and " if inputs else ""

    with gr.Blocks(title=title) as demo:
        about = f"\n\n{config.description}" if getattr(config, "description", "") else ""
        gr.Markdown(f"## {title}\nPreset **`{preset}`** on device **`{device}`** — {attach}"
                    f"choose what the answer must contain.{about}", elem_id="header")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy", "copy_all"],
                                     elem_id="chatbot", feedback_options=None)
                textbox = gr.MultimodalTextbox(
                    file_types=upload_suffixes(inputs), file_count="multiple",
                    sources=["upload", "microphone"], placeholder="Type a message, attach media…",
                    show_label=False, elem_id="message")
                # Enabled while a turn runs; the turn then ends at its next token or denoising step.
                stop_button = gr.Button("■ Stop", variant="stop", size="sm", interactive=False, elem_id="stop")
                with gr.Accordion("Webcam", open=False):
                    webcam = gr.Image(sources=["webcam"], type="filepath", label="Snapshot (sent with the next message)")
            with gr.Column(scale=1, min_width=240):
                output = gr.Radio(list(output_choices(pipe)), value=AUTO, label="Answer must contain",
                                  elem_id="output")
                with gr.Accordion("Settings", open=False):
                    controls = [_control(opt, config.generation, defaults) for opt in options]
        gr.Examples(examples=examples, inputs=[textbox], label="Examples")
        settings = [output, *controls]

        # The turns running now, by browser session: the stop button sets the turn's event.
        running: dict[str, threading.Event] = {}

        def stream_turn(key: str, session: ChatSession, message: UserMessage, output_choice, *values):
            """Run the turn in a worker thread and stream its renderings.

            A worker, because decoder steps are reported from inside the pipeline call (no event
            is yielded between them); the worker renders each state itself, so the session is
            only ever touched by one thread. The worker holds the model slot, and ends at the
            pipeline's next token or denoising step once ``cancel`` is set: by the stop button,
            or here when our consumer goes away (a closed tab), so no thread is left running.
            """
            cancel = running[key] = threading.Event()
            updates: queue.SimpleQueue = queue.SimpleQueue()

            def work() -> None:
                try:
                    with gate.slot():
                        for _ in run_turn(pipe, session, message, output_dir=output_dir, output=output_choice,
                                          settings=ui_settings(values, options, defaults),
                                          max_upload_mb=max_upload_mb, cancel=cancel,
                                          on_update=lambda _: updates.put(_history(session))):
                            updates.put(_history(session))
                except Exception as exc:  # noqa: BLE001 - raised again in the Gradio handler
                    updates.put(exc)
                finally:
                    updates.put(None)

            worker = threading.Thread(target=work, name=f"anygpt-turn-{session.session_id}", daemon=True)
            busy = gr.MultimodalTextbox(value=None, interactive=False)
            worker.start()
            try:
                while True:
                    item = updates.get()
                    while isinstance(item, list) and not updates.empty():
                        item = updates.get()  # only the newest rendering is worth sending
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        raise item
                    yield item, busy, gr.Button(interactive=True), session
            finally:
                cancel.set()
                worker.join()
                if running.get(key) is cancel:
                    del running[key]
            yield _history(session), gr.MultimodalTextbox(interactive=True), gr.Button(interactive=False), session

        def respond(request: gr.Request, value, snapshot, session, output_choice, *values):
            session = session or ChatSession()
            message = _user_message(value, [snapshot] if snapshot else [])
            if not message.text.strip() and not message.files:
                # Refused in place: no bubble, the box stays as it is, a notice says why.
                gr.Warning("Type a message or attach a file first.")
                yield _history(session), gr.MultimodalTextbox(), gr.Button(), snapshot, session
                return
            for history, box, stop, session in stream_turn(_key(request, session), session, message,
                                                           output_choice, *values):
                yield history, box, stop, None, session

        def retry(request: gr.Request, session, output_choice, *values):
            session = session or ChatSession()
            message = session.undo()
            if message is None:
                yield _history(session), gr.MultimodalTextbox(), gr.Button(), session
                return
            yield from stream_turn(_key(request, session), session, message, output_choice, *values)

        def stop(request: gr.Request, session):
            cancel = running.get(_key(request, session))
            if cancel is not None:
                cancel.set()  # the turn's own handler shows the end and frees the box

        def undo(session):
            session = session or ChatSession()
            message = session.undo()
            box = {"text": message.text, "files": message.files} if message else None
            return _history(session), box, session

        def clear():
            return [], None, ChatSession()

        async def api_chat(message, output, *rest):
            """One turn for the named API, streamed as ``(text so far, media files so far, session)``.

            An async generator run as the app's turns are, in a worker thread holding the model
            slot: Gradio cancels a job (``gradio_client``'s ``job.cancel()``, or a client that
            leaves) by cancelling the task iterating this generator, which raises
            ``CancelledError`` at its ``await``; the turn's ``cancel`` is then set, and the
            pipeline stops at its next token or denoising step. A sync generator could only be
            closed after its current step, which is a whole decoder call.
            """
            *values, session = rest
            session = session or ChatSession()
            turn = _ApiTurn(lambda cancel: run_turn(
                pipe, session, _user_message(message), output_dir=output_dir, output=output,
                settings=ui_settings(values, options, defaults), max_upload_mb=max_upload_mb, cancel=cancel), gate)
            final, last, sent_files = None, 0.0, 0
            # Text updates are coalesced (every update costs Gradio a serialise-and-send); new
            # media and the final state are always sent.
            async with turn:
                async for final in turn.states():
                    now = time.monotonic()
                    if final.error or not (final.done or len(final.files) > sent_files
                                           or now - last >= _API_UPDATE_S):
                        continue
                    last, sent_files = now, len(final.files)
                    yield final.text, final.files, session
            if final is None or final.error:
                raise gr.Error(final.error if final else "no answer", print_exception=False)

        # The API's parameter names are the options' names (and so the pipeline's keywords).
        _with_signature(api_chat, ["message", "output", *(opt.name for opt in options), "session"])

        textbox.submit(respond, [textbox, webcam, state, *settings], [chatbot, textbox, stop_button, webcam, state],
                       api_visibility="private", **model_events)
        chatbot.retry(retry, [state, *settings], [chatbot, textbox, stop_button, state], api_visibility="private",
                      **model_events)
        # Not a model event: it must run while the turn holds the model's queue slot.
        stop_button.click(stop, [state], None, api_visibility="private", concurrency_limit=None)
        chatbot.undo(undo, [state], [chatbot, textbox, state], api_visibility="private")
        chatbot.clear(clear, None, [chatbot, textbox, state], api_visibility="private")

        # The named API endpoint: text + file paths of the generated media, one turn per call;
        # a gradio_client.Client keeps its conversation between calls (server-side session state).
        with gr.Column(visible=False):
            # No file_types here: the turn itself refuses unsupported files with a clear message.
            api_message = gr.MultimodalTextbox(file_count="multiple", label="message")
            api_text = gr.Textbox(label="text")
            api_files = gr.File(file_count="multiple", label="files")
            api_button = gr.Button("chat")
        api_button.click(api_chat, [api_message, *settings, state], [api_text, api_files, state],
                         api_name=API_NAME, **model_events)

    demo.anygpt_output_dir = output_dir
    demo.anygpt_max_upload_mb = max_upload_mb
    demo.anygpt_css = APP_CSS  # Gradio 6 takes CSS at launch (app.server.launch passes it)
    return demo


@dataclass(frozen=True)
class _Snapshot:
    """What the API sends of a turn's state, copied in the worker (which goes on changing it)."""

    text: str
    files: list[str]
    done: bool
    error: str | None


class _ApiTurn:
    """A turn of the named API: run in a worker thread that holds a model slot, read from the
    event loop (:class:`ThreadedIterator`); leaving the ``async with`` early (a cancelled job)
    cancels the turn and waits for the worker, so the slot is free when the job is."""

    def __init__(self, turn: Callable[[threading.Event], Any], gate: ModelGate):
        self._turn, self._gate = turn, gate
        self.cancel = threading.Event()

    def _snapshots(self) -> Iterator[_Snapshot]:
        with self._gate.slot():
            for state in self._turn(self.cancel):
                yield _Snapshot(state.text, list(state.files), state.done, state.error)

    async def __aenter__(self) -> "_ApiTurn":
        self._reader = ThreadedIterator(self._snapshots, self.cancel, name="anygpt-api-turn")
        return self

    def states(self) -> AsyncIterator[_Snapshot]:
        """The turn's states, in order; an error of the worker is raised here."""
        return self._reader.items()

    async def __aexit__(self, *exc_info: Any) -> None:
        if not self._reader.ended:
            logger.info("API turn cancelled by its client; stopping it")
        await self._reader.close()


def _key(request: Any, session: ChatSession | None) -> str:
    """Which running turn a browser's stop button means: its Gradio session (the chat session's
    id where there is no request, as for a direct call)."""
    return getattr(request, "session_hash", None) or (session.session_id if session else "")

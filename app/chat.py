"""The Gradio Blocks chat app: :func:`build_app` takes a pipeline and returns ``gr.Blocks``.

The app loads no model: it takes anything with the pipeline's call shape (``stream``,
``config``, ``device``), so tests drive it with the ``tiny`` preset or a stub.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr

from anygpt.app.engine import OUTPUT_CHOICES, TurnState, run_turn
from anygpt.app.session import MODALITY_SUFFIXES, ChatSession, UserMessage

logger = logging.getLogger(__name__)

__all__ = ["build_app", "API_NAME"]

#: The named endpoint for ``gradio_client``: ``client.predict(..., api_name="/chat")``.
API_NAME = "chat"

#: The API endpoint streams text at most this often (seconds); media and the end always go out.
_API_UPDATE_S = 0.05

_PENDING = {"image": "🖼️ drawing the image…", "audio": "🔊 making the sound…", "video": "🎬 rendering the video…"}
_COMPONENTS = {"image": gr.Image, "audio": gr.Audio, "video": gr.Video}


def _defaults(pipe: Any) -> dict[str, Any]:
    """Slider defaults from the preset's generation config (tolerant of stubs)."""
    gen = getattr(getattr(pipe, "config", None), "generation", None)
    return {"max_new_tokens": int(getattr(gen, "max_new_tokens", 256) or 256),
            "temperature": float(getattr(gen, "temperature", 0.7)),
            "top_p": float(getattr(gen, "top_p", 0.9))}


def _settings(max_new_tokens, temperature, top_p, seed, steps, guidance, image_size, video_frames,
              audio_length) -> dict[str, Any]:
    """UI values → pipeline keyword arguments; 0 (or seed -1) means the preset's default."""
    def positive(value, cast):
        return cast(value) if value is not None and value > 0 else None

    size = positive(image_size, int)
    return {"max_new_tokens": positive(max_new_tokens, int), "temperature": temperature,
            "top_p": top_p, "seed": None if seed is None or seed < 0 else int(seed),
            "steps": positive(steps, int), "guidance": positive(guidance, float),
            "height": size, "width": size, "num_frames": positive(video_frames, int),
            "audio_length_s": positive(audio_length, float)}


def _user_message(value: Any, extra_files: list[str] = ()) -> UserMessage:
    value = value or {}
    files = []
    for f in list(value.get("files") or []) + [f for f in extra_files if f]:
        files.append(f if isinstance(f, str) else f.get("path"))
    return UserMessage(str(value.get("text") or ""), files)


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
            content.append(f"*{_PENDING.get(part.value, 'decoding ' + part.value + '…')}*")
        else:
            content.append(_COMPONENTS[part.kind](part.value))
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


def build_app(pipe: Any, *, output_dir: str | Path = "outputs/app", max_upload_mb: float = 50.0,
              concurrency: int = 1, title: str = "AnyGPT") -> gr.Blocks:
    """Build the chat app around ``pipe``.

    Args:
        pipe: an :class:`~anygpt.AnyGPTPipeline` or any object with its ``stream(conversation,
            outputs=..., **settings)``, ``config`` and ``device``.
        output_dir: generated media are written to ``output_dir/<session>/<turn>/``; launch with
            :func:`app.server.launch` so that only this folder is served.
        max_upload_mb: larger uploads are refused with an error in the chat.
        concurrency: model calls running at once (the queue holds the rest).
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    defaults = _defaults(pipe)
    preset = getattr(getattr(pipe, "config", None), "name", "custom")
    device = getattr(pipe, "device", "cpu")
    examples = _write_examples(output_dir / "examples")
    model_events = dict(concurrency_limit=concurrency, concurrency_id="model")

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nPreset **`{preset}`** on device **`{device}`** — attach images, "
                    f"audio or video, and choose what the answer must contain.", elem_id="header")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy", "copy_all"],
                                     elem_id="chatbot", feedback_options=None)
                textbox = gr.MultimodalTextbox(
                    file_types=["image", "audio", "video"], file_count="multiple",
                    sources=["upload", "microphone"], placeholder="Type a message, attach media…",
                    show_label=False, elem_id="message")
                with gr.Accordion("Webcam", open=False):
                    webcam = gr.Image(sources=["webcam"], type="filepath", label="Snapshot (sent with the next message)")
            with gr.Column(scale=1, min_width=240):
                output = gr.Radio(list(OUTPUT_CHOICES), value="auto", label="Answer must contain")
                with gr.Accordion("Settings", open=False):
                    max_new_tokens = gr.Slider(1, 1024, value=defaults["max_new_tokens"], step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                    steps = gr.Slider(0, 100, value=0, step=1, label="Diffusion steps (0: preset default)")
                    guidance = gr.Slider(0.0, 20.0, value=0.0, step=0.5, label="Guidance (0: preset default)")
                    image_size = gr.Slider(0, 1024, value=0, step=64, label="Image size (0: preset default)")
                    video_frames = gr.Slider(0, 64, value=0, step=1, label="Video frames (0: preset default)")
                    audio_length = gr.Slider(0.0, 30.0, value=0.0, step=0.5, label="Audio length s (0: preset default)")
        gr.Examples(
            examples=[[{"text": "Hello! Who are you?", "files": []}],
                      [{"text": "What is in this picture? Draw a similar one.", "files": [examples["image"]]}],
                      [{"text": "Describe this sound, then make a short tune.", "files": [examples["audio"]]}],
                      [{"text": "Show me a short video of waves on a beach.", "files": []}]],
            inputs=[textbox], label="Examples")
        settings = [output, max_new_tokens, temperature, top_p, seed, steps, guidance, image_size,
                    video_frames, audio_length]

        def stream_turn(session: ChatSession, message: UserMessage, output_choice, *values):
            busy = gr.MultimodalTextbox(value=None, interactive=False)
            for _ in run_turn(pipe, session, message, output_dir=output_dir, output=output_choice,
                              settings=_settings(*values), max_upload_mb=max_upload_mb):
                yield _history(session), busy, session
            yield _history(session), gr.MultimodalTextbox(interactive=True), session

        def respond(value, snapshot, session, output_choice, *values):
            session = session or ChatSession()
            message = _user_message(value, [snapshot] if snapshot else [])
            for history, box, session in stream_turn(session, message, output_choice, *values):
                yield history, box, None, session

        def retry(session, output_choice, *values):
            session = session or ChatSession()
            message = session.undo()
            if message is None:
                yield _history(session), gr.MultimodalTextbox(), session
                return
            yield from stream_turn(session, message, output_choice, *values)

        def undo(session):
            session = session or ChatSession()
            message = session.undo()
            box = {"text": message.text, "files": message.files} if message else None
            return _history(session), box, session

        def clear():
            return [], None, ChatSession()

        def api_chat(message, output, max_new_tokens, temperature, top_p, seed, steps, guidance,
                     image_size, video_frames, audio_length, session):
            session = session or ChatSession()
            values = _settings(max_new_tokens, temperature, top_p, seed, steps, guidance, image_size,
                               video_frames, audio_length)
            final, last, sent_files = None, 0.0, 0
            # A generator, so gradio_client's submit() can stream the answer (predict() returns
            # the last value): each update is the text so far and the media written so far.
            # Text updates are coalesced (every update costs Gradio a serialise-and-send);
            # new media and the final state are always sent.
            for final in run_turn(pipe, session, _user_message(message), output_dir=output_dir,
                                  output=output, settings=values, max_upload_mb=max_upload_mb):
                now = time.monotonic()
                if final.error or not (final.done or len(final.files) > sent_files or now - last >= _API_UPDATE_S):
                    continue
                last, sent_files = now, len(final.files)
                yield final.text, final.files, session
            if final is None or final.error:
                raise gr.Error(final.error if final else "no answer", print_exception=False)

        textbox.submit(respond, [textbox, webcam, state, *settings], [chatbot, textbox, webcam, state],
                       api_visibility="private", **model_events)
        chatbot.retry(retry, [state, *settings], [chatbot, textbox, state], api_visibility="private",
                      **model_events)
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
    return demo

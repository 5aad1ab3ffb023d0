"""An OpenAI-compatible HTTP API for a pipeline, following vLLM-Omni's conventions for media.

Endpoints (all under ``/v1``):

- ``POST /v1/chat/completions``: messages whose content is a string or typed parts (``text``,
  ``image_url``, ``audio_url``, ``input_audio``, ``video_url``); media come as data URLs, or as
  local paths inside the server's media folder. ``modalities`` names what the answer must
  contain (``["text", "image"]``). Diffusion settings (``num_inference_steps``,
  ``guidance_scale``, ``height``, ``width``, ``num_frames``, ``audio_length_s``, ``seed``) go at
  the top level of the body, where the OpenAI client's ``extra_body`` puts them, or inside an
  ``extra_body`` object. Images come back as ``image_url`` parts and videos as ``video_url``
  parts (data URLs), audio as base64 WAV in ``message.audio``. With ``stream: true`` the text
  arrives as server-sent events and the media in the last chunk.
- ``POST /v1/images/generations``: ``b64_json`` PNGs.
- ``GET /v1/models``.

Errors use OpenAI's schema (``{"error": {"message", "type", "param", "code"}}``) with the
status that fits: 400 for a bad request, 401 for a wrong key, 413 for a body over the limit,
503 when the queue is full, 500 for a failure inside the model.

A client that goes away cancels its request: generation and decoding stop at the next token or
denoising step, and the model slot is freed for the next request. A non-streamed request (and a
streamed one before its first token) listens for the ASGI ``http.disconnect`` message, as
Starlette's ``StreamingResponse`` does; a stream ends when that response stops iterating it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import mimetypes
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from anygpt.errors import AnyGPTError, Cancelled
from anygpt.modalities import get_modality
from anygpt.types import GenerationOutput, MediaSegment, TextDelta, TextSegment

from anygpt.app.gate import ModelGate, ServerBusyError
from anygpt.app.threaded import ThreadedIterator

logger = logging.getLogger(__name__)

__all__ = ["build_api", "APIError"]

T = TypeVar("T")

#: The status a request whose client went away ends with (nginx's "client closed request"):
#: no one reads it, but it marks the request as cancelled in access logs.
CLIENT_CLOSED = 499

#: Request fields (OpenAI's and vLLM-Omni's extra ones) → the pipeline's settings.
SETTING_FIELDS = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
    "top_p": "top_p", "top_k": "top_k", "seed": "seed", "repetition_penalty": "repetition_penalty",
    "num_inference_steps": "steps", "guidance_scale": "guidance", "height": "height", "width": "width",
    "num_frames": "num_frames", "fps": "fps", "audio_length_s": "audio_length_s",
}
#: Content part type → (modality, the part's key holding ``{"url": ...}``).
MEDIA_PARTS = {"image_url": ("image", "image_url"), "audio_url": ("audio", "audio_url"),
               "video_url": ("video", "video_url")}
_IGNORED_FIELDS = {"model", "messages", "stream", "stream_options", "modalities", "n", "stop", "extra_body",
                   "audio", "user", "response_format", "prompt", "size", "quality", "style"}


@dataclass
class APIError(Exception):
    """A request the API refuses, with the HTTP status and OpenAI error fields it answers with."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------
def parse_settings(body: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline settings a request body asks for (top level and ``extra_body``)."""
    fields = dict(body)
    extra = fields.pop("extra_body", None) or {}
    if not isinstance(extra, Mapping):
        raise APIError(400, "extra_body must be an object", param="extra_body")
    fields.update(extra)
    unknown = sorted(set(fields) - set(SETTING_FIELDS) - _IGNORED_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field(s) {', '.join(unknown)}; settings this server takes: "
                            f"{', '.join(sorted(SETTING_FIELDS))}", param=unknown[0])
    if fields.get("n", 1) != 1:
        raise APIError(400, "n must be 1 for chat completions (send one request per answer)", param="n")
    settings = {SETTING_FIELDS[k]: v for k, v in fields.items() if k in SETTING_FIELDS and v is not None}
    if settings.get("temperature") == 0:  # OpenAI's "deterministic": greedy decoding
        del settings["temperature"]
        settings["do_sample"] = False
    stop = fields.get("stop")
    if stop is not None:
        settings["stop_strings"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return settings


def parse_outputs(body: Mapping[str, Any], output_modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The media modalities ``modalities`` requires (``text`` is always part of an answer)."""
    requested = body.get("modalities") or []
    if isinstance(requested, str) or not all(isinstance(m, str) for m in requested):
        raise APIError(400, "modalities must be a list of names, e.g. [\"text\", \"image\"]", param="modalities")
    valid = ("text", *output_modalities)
    bad = [m for m in requested if m not in valid]
    if bad:
        raise APIError(400, f"unknown output modality {bad[0]!r}; this model answers with {', '.join(valid)}",
                       param="modalities")
    return tuple(m for m in dict.fromkeys(requested) if m != "text")


class MediaFolder:
    """Where a request's media are read from: data URLs are written to a temporary folder, and
    local paths are accepted only inside ``allowed`` (None: no local paths)."""

    def __init__(self, scratch: Path, allowed: Path | None):
        self.scratch, self.allowed = scratch, allowed.resolve() if allowed else None

    def from_url(self, url: Any, modality: str, param: str) -> Path:
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{param}: expected a URL string", param=param)
        if url.startswith("data:"):
            header, sep, data = url[5:].partition(",")
            mime, _, encoding = header.partition(";")
            if not sep or encoding != "base64":
                raise APIError(400, f"{param}: a data URL must look like data:<type>;base64,<data>", param=param)
            return self.from_base64(data, _suffix(mime, modality, param), param)
        if url.startswith(("http://", "https://")):
            raise APIError(400, f"{param}: this server does not fetch remote URLs; send the file as a data URL",
                           param=param)
        return self._local(url.removeprefix("file://"), param)

    def from_base64(self, data: str, suffix: str, param: str) -> Path:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the base64 data is not valid", param=param) from None
        path = self.scratch / f"{uuid.uuid4().hex}{suffix}"
        path.write_bytes(raw)
        return path

    def _local(self, value: str, param: str) -> Path:
        if self.allowed is None:
            raise APIError(400, f"{param}: local paths are not accepted (start the server with --media-dir "
                                "to allow a folder); send the file as a data URL", param=param)
        path = (self.allowed / value).resolve()
        if not path.is_relative_to(self.allowed):
            raise APIError(400, f"{param}: {value!r} is outside the server's media folder", param=param)
        return path


def _suffix(mime: str, modality: str, param: str) -> str:
    spec = get_modality(modality)
    suffix = {"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/mpeg": ".mp3"}.get(mime) or \
        mimetypes.guess_extension(mime or "")
    if suffix == ".jpe":
        suffix = ".jpg"
    if suffix not in spec.input_suffixes:
        raise APIError(400, f"{param}: {mime or 'no type'} is not a supported {modality} type "
                            f"({', '.join(spec.input_suffixes)})", param=param)
    return suffix


def parse_messages(messages: Any, media: MediaFolder) -> list[dict[str, Any]]:
    """OpenAI chat messages as the pipeline's (:func:`anygpt.pipeline.add_messages`): each
    media part becomes a typed part naming the file it was saved to or points at."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, developer, user or assistant, got {role!r}",
                           param=f"messages[{i}].role")
        parsed.append({"role": role, "content": _content(message.get("content"), media, f"messages[{i}].content")})
    return parsed


def _content(content: Any, media: MediaFolder, param: str) -> str | list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of parts", param=param)
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind in MEDIA_PARTS:
            modality, key = MEDIA_PARTS[kind]
            value = part.get(key)
            url = value.get("url") if isinstance(value, Mapping) else value
            parts.append({"type": modality, "path": str(media.from_url(url, modality, f"{where}.{key}.url"))})
        elif kind == "input_audio":
            value = part.get("input_audio") or {}
            suffix = _suffix(f"audio/{value.get('format', 'wav')}", "audio", where)
            path = media.from_base64(value.get("data", ""), suffix, f"{where}.input_audio.data")
            parts.append({"type": "audio", "path": str(path)})
        else:
            valid = ", ".join(["text", *MEDIA_PARTS, "input_audio"])
            raise APIError(400, f"{where}: unknown part type {kind!r}; valid: {valid}", param=where)
    return parts


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------
def _encoded(segment: MediaSegment, scratch: Path) -> tuple[str, str]:
    """``(mime type, base64)`` of a generated item, written in its modality's format."""
    spec = get_modality(segment.modality)
    path = spec.write(segment.value, scratch / f"{uuid.uuid4().hex}{spec.output_suffix}")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if spec.output_suffix == ".wav":
        mime = "audio/wav"
    return mime, base64.b64encode(path.read_bytes()).decode("ascii")


def media_message(output: GenerationOutput, scratch: Path) -> dict[str, Any]:
    """The assistant message of an answer: its content (a string, or parts where media came out)
    and ``audio`` (the first sound, with the text as its transcript)."""
    parts, audio = [], None
    for segment in output.segments:
        if isinstance(segment, TextSegment):
            if segment.text:
                parts.append({"type": "text", "text": segment.text})
            continue
        mime, data = _encoded(segment, scratch)
        if segment.modality == "audio" and audio is None:
            audio = {"id": f"audio_{uuid.uuid4().hex}", "data": data, "format": "wav",
                     "expires_at": int(time.time()) + 3600, "transcript": output.text}
            continue
        kind = f"{segment.modality}_url"
        parts.append({"type": kind, kind: {"url": f"data:{mime};base64,{data}"}})
    only_text = all(p["type"] == "text" for p in parts)
    message: dict[str, Any] = {"role": "assistant", "content": output.text if only_text else parts}
    if audio is not None:
        message["audio"] = audio
    return message


def _finish_reason(output: GenerationOutput) -> str:
    return "length" if output.stop_reason == "length" else "stop"


def _usage(output: GenerationOutput) -> dict[str, int]:
    return {"prompt_tokens": output.num_prompt_tokens, "completion_tokens": output.num_generated_tokens,
            "total_tokens": output.num_prompt_tokens + output.num_generated_tokens}


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------
def build_api(pipe: Any, *, api_key: str | None = None, media_dir: str | Path | None = None,
              max_request_mb: float = 64.0, gate: ModelGate | None = None,
              model_name: str | None = None) -> FastAPI:
    """A FastAPI app serving ``pipe`` with OpenAI's API.

    Args:
        pipe: an :class:`~anygpt.AnyGPTPipeline`.
        api_key: if set, every ``/v1`` request must send ``Authorization: Bearer <api_key>``.
        media_dir: a folder whose files requests may name by path (default: none; data URLs only).
        max_request_mb: larger request bodies are refused with 413.
        gate: the model-call budget shared with the chat app (default: one call at a time).
        model_name: the id ``/v1/models`` lists (default: the preset's name).
    """
    gate = gate or ModelGate()
    name = model_name or getattr(pipe.config, "name", None) or "anygpt"
    created = int(time.time())
    api = FastAPI(title="AnyGPT OpenAI-compatible API")
    api.state.gate = gate

    def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided; send it as 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        check(request)
        limit = int(max_request_mb * 2**20)
        if int(request.headers.get("content-length") or 0) > limit:
            raise APIError(413, f"the request body is over the server's limit of {max_request_mb:g} MB",
                           code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"the request body is over the server's limit of {max_request_mb:g} MB",
                           code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.get("/v1/models")
    async def models(request: Request):
        check(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "anygpt"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        events = _Completion(pipe, gate, body, Path(media_dir) if media_dir else None)
        if not body.get("stream"):
            output, message = await until_disconnected(request, events.cancel, events.run,
                                                       f"chat completion {completion_id}")
            return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": name,
                    "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(output)}],
                    "usage": _usage(output)}
        # Errors before the first token are plain HTTP errors.
        first = await until_disconnected(request, events.cancel, events.start, f"chat completion {completion_id}")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _CompletionStream(_EventPump(events, completion_id), first, name, include_usage)

    @api.post("/v1/images/generations")
    async def images_generations(request: Request):
        body = await read_json(request)
        cancel = threading.Event()
        has_images = "image" in pipe.config.output_modalities
        return await until_disconnected(request, cancel, lambda: _images(pipe, gate, body, has_images, cancel),
                                        "image generation")

    return api


class _Completion:
    """One chat completion: parses the request, holds a gate slot and the pipeline's stream."""

    def __init__(self, pipe: Any, gate: ModelGate, body: dict[str, Any], media_dir: Path | None):
        self.pipe, self.gate, self.body, self.media_dir = pipe, gate, body, media_dir
        self._scratch = tempfile.TemporaryDirectory(prefix="anygpt-api-")
        self._stack = None
        self._stream = None
        #: Set when the client goes away: the pipeline stops at its next token or denoising step.
        self.cancel = threading.Event()

    def _open(self) -> Iterator[Any]:
        from contextlib import ExitStack

        from anygpt.conversation import Conversation
        from anygpt.pipeline import add_messages

        scratch = Path(self._scratch.name)
        settings = parse_settings(self.body)
        outputs = parse_outputs(self.body, tuple(self.pipe.config.output_modalities))
        messages = parse_messages(self.body.get("messages"), MediaFolder(scratch, self.media_dir))
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must be the user's", param="messages")
        conversation = Conversation(keep_cache=False)
        add_messages(conversation, messages, {})
        self._stack = ExitStack()
        self._stack.enter_context(self.gate.slot())
        self._stack.callback(self._scratch.cleanup)
        # Answers the last user turn.
        return self.pipe.stream(conversation, outputs=outputs, cancel=self.cancel, **settings)

    def start(self) -> Any:
        """Open the stream and return its first event (request errors raise :class:`APIError`)."""
        try:
            self._stream = self._open()
            return next(self._stream)
        except BaseException as exc:
            self.close()
            raise _as_api_error(exc) from exc

    @property
    def scratch(self) -> Path:
        """The request's temporary folder (its media in, its answer's media out)."""
        return Path(self._scratch.name)

    def events(self) -> Iterator[Any]:
        """The events after the first; the slot is released when they end or fail (a
        :class:`~anygpt.errors.Cancelled` once :attr:`cancel` is set)."""
        try:
            yield from self._stream
        finally:
            self.close()

    def run(self) -> tuple[GenerationOutput, dict[str, Any]]:
        event = self.start()
        try:
            for event in self.events():
                pass
            return event, media_message(event, self.scratch)
        except BaseException as exc:
            raise _as_api_error(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, APIError | GeneratorExit | KeyboardInterrupt):
        return exc
    if isinstance(exc, Cancelled):  # only our disconnect handling sets the cancel event
        return APIError(CLIENT_CLOSED, f"the client closed the request ({exc})", type="server_error",
                        code="client_closed_request")
    if isinstance(exc, ServerBusyError):
        return APIError(503, str(exc), type="server_error", code="server_busy")
    if isinstance(exc, AnyGPTError):
        return APIError(400, str(exc))
    logger.exception("generation failed")
    return APIError(500, f"generation failed ({type(exc).__name__}: {exc})", type="server_error")


# --------------------------------------------------------------------------------------------
# Clients that go away
# --------------------------------------------------------------------------------------------
async def _disconnect(request: Request) -> None:
    """Return when the client disconnects.

    The body has been read, so the next ASGI message is ``http.disconnect``: waiting for it
    costs nothing, unlike polling ``request.is_disconnected()`` (Starlette's own
    ``StreamingResponse.listen_for_disconnect`` waits the same way).
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, cancel: threading.Event, work: Callable[[], T], what: str) -> T:
    """Run ``work`` in a worker thread; if the client disconnects first, set ``cancel`` (the
    pipeline then stops at its next token or denoising step) and wait for ``work`` to end.

    Raises:
        APIError: the client went away (status 499), or whatever ``work`` raised.
    """
    task = asyncio.ensure_future(run_in_threadpool(work))
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            logger.info("%s: the client disconnected; cancelling it", what)
            cancel.set()
            await asyncio.wait({task})
            logger.info("%s: cancelled; its model slot is free", what)
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():  # the server itself cancelled this request (shutting down)
            cancel.set()


class _EventPump:
    """A completion's remaining events, read by a thread of its own (:class:`ThreadedIterator`:
    a decoder call yields no event for seconds, and the stream must be able to stop meanwhile)."""

    def __init__(self, completion: _Completion, completion_id: str):
        self.completion, self.id = completion, completion_id
        self.what = f"chat completion {completion_id}"
        self._reader = ThreadedIterator(self._events, completion.cancel, name=f"anygpt-{completion_id}")

    def _events(self) -> Iterator[Any]:
        try:
            yield from self.completion.events()
        except BaseException as exc:
            if self.completion.cancel.is_set() and not isinstance(exc, Cancelled):
                logger.warning("%s failed after its client left", self.what, exc_info=exc)
            raise

    def events(self) -> AsyncIterator[Any]:
        """The events, in order; an error in the pipeline is raised here."""
        return self._reader.items()

    async def close(self) -> None:
        """Cancel the completion unless it has ended, and wait until its thread (and with it
        the model slot) is released."""
        if not self._reader.ended:
            logger.info("%s: the client disconnected; cancelling it", self.what)
        if await self._reader.close():
            logger.info("%s: cancelled; its model slot is free", self.what)


class _CompletionStream(StreamingResponse):
    """A streamed completion that is cancelled when the response stops before its end.

    Starlette stops a response whose client disconnected: for ASGI servers before spec 2.4
    (uvicorn) it cancels the response's task when ``http.disconnect`` arrives, and for later
    ones a ``send`` raises ``OSError`` (``ClientDisconnect``). Either way the body iterator is
    abandoned mid-way, so the cancelling is done here, when the response call ends.
    """

    def __init__(self, pump: _EventPump, first: Any, model: str, include_usage: bool):
        super().__init__(_sse(pump, first, model, include_usage), media_type="text/event-stream")
        self.pump = pump

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.pump.close()


async def _sse(pump: _EventPump, first: Any, model: str, include_usage: bool) -> AsyncIterator[str]:
    """The completion as server-sent event lines."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        data = {"id": pump.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    output = None
    try:
        async for item in _chain(first, pump.events()):
            if isinstance(item, TextDelta) and item.text:
                yield chunk({"content": item.text})
            elif isinstance(item, GenerationOutput):
                output = item
        message = media_message(output, pump.completion.scratch)
        media = {k: v for k, v in message.items() if k == "audio"}
        if isinstance(message["content"], list):
            media["content"] = [p for p in message["content"] if p["type"] != "text"]
        if media:
            yield chunk(media)
        yield chunk({}, _finish_reason(output), **({"usage": _usage(output)} if include_usage else {}))
    except Exception as exc:  # noqa: BLE001 - the client learns of it in the stream; the server goes on
        error = _as_api_error(exc)
        body = error.body() if isinstance(error, APIError) else {"error": {"message": str(exc), "type": "server_error"}}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def _images(pipe: Any, gate: ModelGate, body: dict[str, Any], has_images: bool,
            cancel: threading.Event) -> dict[str, Any]:
    if not has_images:
        raise APIError(400, "this model does not generate images")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise APIError(400, "prompt must be a non-empty string", param="prompt")
    if body.get("response_format", "b64_json") != "b64_json":
        raise APIError(400, "only response_format 'b64_json' is served (this server keeps no files)",
                       param="response_format")
    count = body.get("n", 1)
    if not isinstance(count, int) or not 1 <= count <= 10:
        raise APIError(400, "n must be an integer from 1 to 10", param="n")
    settings = parse_settings({k: v for k, v in body.items() if k != "n"})
    size = body.get("size")
    if size not in (None, "auto"):
        try:
            width, height = (int(v) for v in str(size).lower().split("x"))
        except ValueError:
            raise APIError(400, f"size must look like 512x512, got {size!r}", param="size") from None
        settings.update(width=width, height=height)
    seed = settings.pop("seed", None)
    if seed is not None:
        settings["seed"] = [seed + i for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="anygpt-api-") as scratch:
        try:
            with gate.slot():
                outputs = pipe.batch([prompt] * count, outputs=("image",), cancel=cancel, **settings)
        except Exception as exc:
            raise _as_api_error(exc) from exc
        data = []
        for output in outputs:
            segment = next(s for s in output.segments if isinstance(s, MediaSegment) and s.modality == "image")
            data.append({"b64_json": _encoded(segment, Path(scratch))[1], "revised_prompt": output.text})
    return {"created": int(time.time()), "data": data}

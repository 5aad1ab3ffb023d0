"""The OpenAI-compatible API, called with the official `openai` client (through Starlette's test
transport: the same HTTP requests, no port)."""

import asyncio
import base64
import io
import json
import logging

import numpy as np
import pytest

openai = pytest.importorskip("openai")
from starlette.testclient import TestClient  # noqa: E402

from anygpt.app.gate import ModelGate  # noqa: E402
from anygpt.app.openai_api import build_api  # noqa: E402
from anygpt.modalities import get_modality  # noqa: E402
from anygpt.testing import HoldingPipe  # noqa: E402

KEY = "test-key"
FAST = {"num_inference_steps": 2, "seed": 0}


@pytest.fixture(scope="module")
def api(tiny_pipe, tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("served-media")
    return build_api(tiny_pipe, api_key=KEY, media_dir=media_dir, max_request_mb=1.0)


@pytest.fixture(scope="module")
def http(api):
    with TestClient(api) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def _data_url(path, mime):
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _decode_data_url(url, prefix):
    assert url.startswith(prefix), url[:40]
    return base64.b64decode(url.split(",", 1)[1])


def _load(modality, raw, tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    path.write_bytes(raw)
    return get_modality(modality).load(path)


def test_models_lists_the_served_model(client, tiny_pipe):
    ids = [m.id for m in client.models.list().data]
    assert ids == [tiny_pipe.config.name]


def test_a_text_completion(client):
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=6, seed=0)
    choice = response.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens >= 1 and response.usage.prompt_tokens > 1


def test_every_output_modality_comes_back_decodable(client, tmp_path):
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "draw, sing and film"}], max_tokens=6,
        modalities=["text", "image", "audio", "video"], extra_body=FAST)
    message = response.choices[0].message
    parts = message.content
    assert isinstance(parts, list)
    images = [p for p in parts if p["type"] == "image_url"]
    videos = [p for p in parts if p["type"] == "video_url"]
    assert len(images) == 1 and len(videos) == 1
    image = _load("image", _decode_data_url(images[0]["image_url"]["url"], "data:image/png;base64,"), tmp_path, ".png")
    assert image.size[0] > 0
    video = _load("video", _decode_data_url(videos[0]["video_url"]["url"], "data:video/mp4;base64,"), tmp_path, ".mp4")
    assert len(video.frames) >= 1
    audio = _load("audio", base64.b64decode(message.audio.data), tmp_path, ".wav")
    assert audio.waveform.size > 0 and np.isfinite(audio.waveform).all()


def test_streaming_sends_the_text_then_the_media(client, tmp_path):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "draw"}], max_tokens=8,
                  modalities=["text", "image"], extra_body=FAST)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content for c in chunks
                   if c.choices and isinstance(c.choices[0].delta.content, str))
    expected = "".join(p["text"] for p in whole.choices[0].message.content if p["type"] == "text")
    assert text == expected
    media = [c.choices[0].delta.content for c in chunks if c.choices and isinstance(c.choices[0].delta.content, list)]
    assert len(media) == 1 and media[0][0]["type"] == "image_url"
    _load("image", _decode_data_url(media[0][0]["image_url"]["url"], "data:image/png;base64,"), tmp_path, ".png")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_media_in_come_as_data_urls_and_input_audio(client, media_files):
    text_only = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "what?"}],
                                               max_tokens=2, seed=0)
    content = [{"type": "text", "text": "what is in"},
               {"type": "image_url", "image_url": {"url": _data_url(media_files["image"], "image/png")}},
               {"type": "input_audio", "input_audio": {"data": base64.b64encode(media_files["audio"].read_bytes())
                                                       .decode(), "format": "wav"}},
               {"type": "video_url", "video_url": {"url": _data_url(media_files["video"], "video/mp4")}}]
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=2, seed=0)
    # Three media slots more than the text alone.
    assert response.usage.prompt_tokens > text_only.usage.prompt_tokens + 3


def test_images_generate_returns_pngs(client):
    from PIL import Image

    result = client.images.generate(model="tiny", prompt="a red circle", n=2, response_format="b64_json",
                                    extra_body=FAST)
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert all(i.format == "PNG" for i in images)


def test_a_wrong_key_is_401(http):
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert http.get("/v1/models").status_code == 401


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}, "base64 data is not valid"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,plain"}}, "data URL must look like"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "not a supported image type"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "does not fetch remote URLs"),
    ({"type": "image_url", "image_url": {"url": "../../etc/passwd.png"}}, "outside the server's media folder"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, "image"),  # not a PNG
    ({"type": "pdf", "pdf": {}}, "unknown part type"),
])
def test_a_bad_media_part_is_400_in_openai_shape(client, part, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [part]}], max_tokens=2)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert message in error["message"]


@pytest.mark.parametrize("extra, message", [
    ({"num_inference_steps": 0}, "steps"),
    ({"modalities": ["smell"]}, "unknown output modality"),
    ({"frobnicate": 1}, "unknown field"),
    ({"n": 3}, "n must be 1"),
])
def test_bad_settings_are_400(client, extra, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body=extra)
    assert message in info.value.body["message"]


def test_a_body_over_the_limit_is_413(http):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]})
    response = http.post("/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {KEY}",
                                                                         "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_full_queue_is_503(tiny_pipe):
    gate = ModelGate(1, max_waiting=0)
    with TestClient(build_api(tiny_pipe, gate=gate)) as http, gate.slot():
        response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_busy"


def test_local_paths_inside_the_media_folder_are_read(tiny_pipe, media_files, tmp_path):
    (tmp_path / "cat.png").write_bytes(media_files["image"].read_bytes())
    with TestClient(build_api(tiny_pipe, media_dir=tmp_path)) as http:
        ok = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}}]}]})
        missing = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "dog.png"}}]}]})
    assert ok.status_code == 200, ok.text
    assert missing.status_code == 400 and "dog.png" in missing.json()["error"]["message"]


def test_the_server_mounts_the_chat_app_at_the_root(tiny_pipe, tmp_path):
    from anygpt.app.server import build_server

    server = build_server(tiny_pipe, output_dir=str(tmp_path / "app"))
    with TestClient(server) as http:
        page = http.get("/")
        models = http.get("/v1/models")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert models.status_code == 200 and models.json()["data"][0]["id"] == tiny_pipe.config.name


# A client that goes away --------------------------------------------------------------------
SLOW = {"max_tokens": 4, "modalities": ["text", "image"], "num_inference_steps": 20, "seed": 0}


class _Sent(list):
    """The messages an app sent (a list that can carry an event)."""


async def _post_and_leave(app, body, until):
    """POST ``body`` to ``app`` over raw ASGI (as uvicorn does: ASGI spec 2.3); the client
    disconnects once ``until(sent)`` returns (``sent``: the messages the app sent so far, a
    list that grows). Returns the messages the app sent."""
    raw, sent, requested = json.dumps(body).encode(), _Sent(), False
    leave = asyncio.Event()

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        frame_sent.set()

    async def client():
        await until(sent)
        leave.set()

    frame_sent = asyncio.Event()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    sent.frame_sent = frame_sent
    leaving = asyncio.ensure_future(client())
    await app(scope, receive, send)
    leaving.cancel()
    return sent


def _frames(sent):
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"].startswith(b"data:")]


def _assert_cancelled_and_free(pipe, gate, caplog):
    from anygpt.errors import Cancelled

    assert pipe.cancels[-1].is_set()
    assert pipe.raised and isinstance(pipe.raised[-1], Cancelled), pipe.raised
    assert "the client disconnected; cancelling it" in caplog.text
    assert "its model slot is free" in caplog.text
    with gate.slot():  # max_waiting=0: a slot still held would raise ServerBusyError
        pass


def _second_request_is_answered(app):
    with TestClient(app) as http:
        response = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text


def test_a_stream_closed_after_the_first_delta_cancels_and_frees_the_slot(tiny_pipe, caplog):
    pipe, gate = HoldingPipe(tiny_pipe), ModelGate(1, max_waiting=0)
    app = build_api(pipe, gate=gate)

    async def after_the_first_frame(sent):
        while not _frames(sent):
            sent.frame_sent.clear()
            await sent.frame_sent.wait()

    caplog.set_level(logging.INFO, logger="anygpt.app.openai_api")
    body = {**SLOW, "stream": True, "messages": [{"role": "user", "content": "draw"}]}
    frames = _frames(asyncio.run(_post_and_leave(app, body, after_the_first_frame)))
    assert frames and b'"role": "assistant"' in frames[0]
    assert b"[DONE]" not in b"".join(frames)  # the stream did not run to its end
    _assert_cancelled_and_free(pipe, gate, caplog)
    _second_request_is_answered(app)


def test_a_request_whose_client_leaves_is_cancelled_and_frees_the_slot(tiny_pipe, caplog):
    pipe, gate = HoldingPipe(tiny_pipe), ModelGate(1, max_waiting=0)
    app = build_api(pipe, gate=gate)

    async def once_generating(sent):
        await asyncio.to_thread(pipe.first_event.wait, pipe.hold_s)

    caplog.set_level(logging.INFO, logger="anygpt.app.openai_api")
    body = {**SLOW, "messages": [{"role": "user", "content": "draw"}]}
    sent = asyncio.run(_post_and_leave(app, body, once_generating))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    _assert_cancelled_and_free(pipe, gate, caplog)
    _second_request_is_answered(app)

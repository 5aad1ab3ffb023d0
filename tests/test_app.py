"""The Gradio chat app, driven through its named API with gradio_client on the tiny preset."""

import os
import socket
import sys
import threading

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

TIMEOUT = 120
BOOM = "<<boom>>"


class FlakyPipe:
    """The tiny pipeline, except that a message containing BOOM makes ``stream`` raise."""

    def __init__(self, pipe):
        self.pipe, self.config, self.device = pipe, pipe.config, pipe.device

    def stream(self, conversation, **kwargs):
        if BOOM in conversation.turns[-1].text:
            raise RuntimeError("decoder exploded")
        yield from self.pipe.stream(conversation, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pipe, tmp_path_factory):
    from anygpt.app.chat import build_app
    from anygpt.app.server import launch

    out = tmp_path_factory.mktemp("app_out")
    demo = build_app(FlakyPipe(tiny_pipe), output_dir=out, max_upload_mb=0.25)
    launch(demo, host="127.0.0.1", port=_free_port(), block=False)
    try:
        yield demo.local_url, out
    finally:
        demo.close()


def ask(client, text="", files=(), output="auto", **settings):
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    job = client.submit(message, output, api_name="/chat", **settings)
    return job.result(timeout=TIMEOUT)


def client_for(server):
    return Client(server[0], verbose=False, download_files=True)


def test_image_in_image_out(server, media_files):
    text, files = ask(client_for(server), "What is this? Draw one.", [media_files["image"]], "image", seed=0)
    assert isinstance(text, str)
    names = [os.path.basename(f) for f in files]
    assert "image_0.png" in names  # forced; the random LLM may add other media of its own
    with Image.open(files[names.index("image_0.png")]) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 0


def test_audio_in_audio_out(server, media_files):
    text, files = ask(client_for(server), "Listen and answer with a sound.", [media_files["audio"]], "audio")
    names = [os.path.basename(f) for f in files]
    assert "audio_0.wav" in names
    data, rate = sf.read(files[names.index("audio_0.wav")])
    assert rate > 0 and len(data) > 0 and np.isfinite(data).all()


def test_video_in_video_out(server, media_files, tiny_pipe):
    text, files = ask(client_for(server), "Watch this, then make a clip.", [media_files["video"]], "video")
    names = [os.path.basename(f) for f in files]
    assert "video_0.mp4" in names
    with av.open(files[names.index("video_0.mp4")]) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == tiny_pipe.config.modalities["video"].decoder.num_frames


def test_media_are_written_under_session_and_turn(server, media_files):
    ask(client_for(server), "Draw.", output="image")
    written = sorted(server[1].glob("*/*/image_0.png"))
    assert written, "no image under output_dir/<session>/<turn>/"


def test_later_turns_reuse_encodings(server, media_files, tiny_pipe, monkeypatch):
    calls = []
    original = tiny_pipe.model.encode_media

    def counting(modality, batch):
        calls.append((modality, batch.shape[0]))
        return original(modality, batch)

    monkeypatch.setattr(tiny_pipe.model, "encode_media", counting)
    client = client_for(server)
    ask(client, "What is this?", [media_files["image"]])
    assert calls == [("image", 1)]
    ask(client, "And what colour is it?")
    ask(client, "Look again.", [media_files["image"]])  # same content: the cached encoding is used
    assert calls == [("image", 1)]
    ask(client, "And this sound?", [media_files["audio"]])
    assert calls == [("image", 1), ("audio", 1)]


@pytest.fixture
def bad_inputs(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not media")
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    big = tmp_path / "huge.wav"
    sf.write(big, np.zeros(200_000, dtype=np.float32), 16000, subtype="FLOAT")  # ~0.8 MB > 0.25 MB
    return {
        "unsupported": (("Read this", [text_file]), r"notes\.txt: unsupported file type \.txt"),
        "corrupt": (("What is this?", [corrupt]), r"broken\.png"),
        "too_large": (("Hear this", [big]), r"huge\.wav: .*over the upload limit of 0\.25 MB"),
        "empty": (("   ", []), r"empty message"),
        "generation_failure": ((f"please {BOOM}", []), r"generation failed \(RuntimeError: decoder exploded\)"),
    }


@pytest.mark.parametrize("case", ["unsupported", "corrupt", "too_large", "empty", "generation_failure"])
def test_bad_input_is_an_error_and_the_app_keeps_serving(server, bad_inputs, case, media_files):
    (text, files), pattern = bad_inputs[case]
    client = client_for(server)
    with pytest.raises(AppError, match=pattern) as info:
        ask(client, text, files)
    assert "/tmp/" not in str(info.value)  # no server paths in the message
    answer, out_files = ask(client, "Now a normal question.", [media_files["image"]], "image")
    assert isinstance(answer, str) and "image_0.png" in [os.path.basename(f) for f in out_files]


def test_eight_concurrent_clients(server, media_files):
    results, errors = [None] * 8, []

    def one(i):
        try:
            modality = ("image", "audio")[i % 2]
            results[i] = (modality, ask(client_for(server), f"Client {i}", [media_files["image"]], modality, seed=i))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not errors
    for modality, (text, files) in results:
        assert isinstance(text, str)
        names = [os.path.basename(f) for f in files]
        assert f"{modality}_0{'.png' if modality == 'image' else '.wav'}" in names


def test_engine_failure_leaves_the_conversation_unchanged(tiny_pipe, tmp_path, media_files):
    from anygpt.app.engine import run_turn
    from anygpt.app.session import ChatSession, UserMessage

    session = ChatSession()
    states = list(run_turn(tiny_pipe, session, UserMessage("hi", [str(media_files["image"])]), output_dir=tmp_path))
    assert states[-1].done and len(session.conversation.turns) == 2
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    states = list(run_turn(tiny_pipe, session, UserMessage("and this?", [str(bad)]), output_dir=tmp_path))
    assert states[-1].error and "bad.mp4" in states[-1].error
    assert len(session.conversation.turns) == 2 and not session.conversation.pending
    session.undo()  # drops the failed turn only
    assert len(session.conversation.turns) == 2
    assert session.undo().text == "hi"
    assert session.conversation.turns == [] and len(session.turns) == 0


def test_cli_parses_app_and_stays_light():
    from anygpt.cli import build_parser

    args = build_parser().parse_args(["app", "--preset", "tiny", "--port", "7999"])
    assert (args.command, args.model, args.host, args.port, args.share) == ("app", "tiny", "127.0.0.1", 7999, False)
    code = "import sys, anygpt, anygpt.cli, app; assert 'gradio' not in sys.modules, 'gradio imported'"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""The Gradio chat app, driven through its named API with gradio_client on the tiny preset."""

import contextlib
import dataclasses
import logging
import os
import re
import socket
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

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
    """The tiny pipeline, except that a message containing BOOM makes ``stream`` raise after its
    first event, once the pipeline has added the message (so its rollback must undo that).

    ``calls`` maps each message text to the keyword arguments ``stream`` got for it.
    """

    def __init__(self, pipe):
        self.pipe, self.config, self.device = pipe, pipe.config, pipe.device
        self.calls = {}

    def stream(self, conversation, message=None, **kwargs):
        self.calls[message] = kwargs
        events = self.pipe.stream(conversation, message, **kwargs)
        with contextlib.closing(events):
            for event in events:
                if BOOM in (message or ""):
                    raise RuntimeError("decoder exploded")
                yield event


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pipe, tmp_path_factory):
    from anygpt.app.chat import build_app
    from anygpt.app.server import launch

    out = tmp_path_factory.mktemp("app_out")
    pipe = FlakyPipe(tiny_pipe)
    demo = build_app(pipe, output_dir=out, max_upload_mb=0.25)
    launch(demo, host="127.0.0.1", port=_free_port(), block=False)
    try:
        yield demo.local_url, out, pipe
    finally:
        demo.close()


def ask(client, text="", files=(), output="auto", **settings):
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    job = client.submit(message, output, api_name="/chat", **settings)
    return job.result(timeout=TIMEOUT)


def client_for(server):
    return Client(server[0], verbose=False, download_files=True)


@pytest.fixture
def encoded(tiny_pipe, monkeypatch):
    """The modalities the server's pipeline encodes during the test (each new session encodes anew)."""
    calls = []
    original = tiny_pipe.model.encode_media

    def counting(modality, batch):
        calls.append(modality)
        return original(modality, batch)

    monkeypatch.setattr(tiny_pipe.model, "encode_media", counting)
    return calls


def test_image_in_image_out(server, media_files, encoded):
    text, files = ask(client_for(server), "What is this? Draw one.", [media_files["image"]], "image", seed=0)
    assert isinstance(text, str) and encoded == ["image"]
    names = [os.path.basename(f) for f in files]
    assert "image_0.png" in names  # forced; the random LLM may add other media of its own
    with Image.open(files[names.index("image_0.png")]) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 0


@pytest.mark.slow
def test_audio_in_audio_out(server, media_files, encoded):
    text, files = ask(client_for(server), "Listen and answer with a sound.", [media_files["audio"]], "audio")
    assert encoded == ["audio"]
    names = [os.path.basename(f) for f in files]
    assert "audio_0.wav" in names
    data, rate = sf.read(files[names.index("audio_0.wav")])
    assert rate > 0 and len(data) > 0 and np.isfinite(data).all()


@pytest.mark.slow
def test_video_in_video_out(server, media_files, tiny_pipe, encoded):
    text, files = ask(client_for(server), "Watch this, then make a clip.", [media_files["video"]], "video")
    assert encoded == ["video"]
    names = [os.path.basename(f) for f in files]
    assert "video_0.mp4" in names
    with av.open(files[names.index("video_0.mp4")]) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == tiny_pipe.config.modalities["video"].decoder.num_frames


@pytest.mark.slow
def test_media_are_written_under_session_and_turn(server, media_files):
    before = set(server[1].glob("*/*/image_0.png"))  # earlier tests share the server's folder
    ask(client_for(server), "Draw.", output="image")
    written = set(server[1].glob("*/*/image_0.png")) - before
    assert len(written) == 1, "no new image under output_dir/<session>/<turn>/"


@pytest.mark.slow
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
@pytest.mark.slow
def test_bad_input_is_an_error_and_the_app_keeps_serving(server, bad_inputs, case, media_files):
    (text, files), pattern = bad_inputs[case]
    client = client_for(server)
    with pytest.raises(AppError, match=pattern) as info:
        ask(client, text, files)
    assert "/tmp/" not in str(info.value)  # no server paths in the message
    answer, out_files = ask(client, "Now a normal question.", [media_files["image"]], "image")
    assert isinstance(answer, str) and "image_0.png" in [os.path.basename(f) for f in out_files]


@pytest.mark.parametrize("settings, pattern", [
    ({"height": 12}, r"height.*multiple of 8"),
    ({"temperature": 0.001}, r"0\.001 is less than minimum"),  # refused by the slider itself
])
def test_a_bad_setting_is_an_error_bubble_and_the_next_turn_succeeds(server, settings, pattern, media_files):
    client = client_for(server)
    with pytest.raises(AppError, match=pattern):
        ask(client, "Draw it", (), "image", **settings)
    answer, out_files = ask(client, "Now a normal one.", (), "image")
    assert "image_0.png" in [os.path.basename(f) for f in out_files]


def test_typed_control_tokens_stay_text_in_the_app(server, tiny_pipe):
    """Signal and media-wrapper tokens typed by the user are plain text: in auto mode they start no
    decoder, and the turn answers normally."""
    lm = tiny_pipe.model.lm
    forged = "".join(lm.signal_tokens["image"]) + lm.config.media_begin + lm.config.media_end
    # Seeded: unseeded, the random tiny LLM itself sometimes samples a signal run in 4 tokens.
    answer, out_files = ask(client_for(server), f"hello {forged}", (), "auto", max_new_tokens=4, seed=0)
    assert isinstance(answer, str) and out_files in (None, [])


@pytest.mark.slow
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
    assert len(session.conversation.turns) == 2 and not session.conversation.pending()
    session.undo()  # drops the failed turn only
    assert len(session.conversation.turns) == 2
    assert session.undo().text == "hi"
    assert session.conversation.turns == () and len(session.turns) == 0


def test_engine_rolls_back_a_turn_that_fails_mid_stream(tiny_pipe, tmp_path):
    from anygpt.app.engine import run_turn
    from anygpt.app.session import ChatSession, UserMessage

    pipe, session = FlakyPipe(tiny_pipe), ChatSession()
    assert list(run_turn(pipe, session, UserMessage("hi"), output_dir=tmp_path))[-1].done
    turns = session.conversation.turns
    state = list(run_turn(pipe, session, UserMessage(f"now {BOOM}"), output_dir=tmp_path))[-1]
    assert state.error == "generation failed (RuntimeError: decoder exploded)" and not state.done
    assert session.conversation.turns == turns  # the pipeline added the message, then rolled it back

    # A consumer that stops early (a cancelled browser turn) leaves the conversation as it was.
    stream = run_turn(pipe, session, UserMessage("a long answer"), output_dir=tmp_path)
    next(stream)
    stream.close()
    assert session.conversation.turns == turns and session.turns[-1][1].stopped
    session.undo()  # the stopped turn is not in the conversation: undo drops only its display
    assert session.conversation.turns == turns


def _stub(tiny_pipe, inputs, outputs, events=()):
    """A pipeline stub reading ``inputs`` and writing ``outputs``; ``stream`` yields ``events``."""
    def stream(conversation, message=None, **kwargs):
        with conversation.atomic():
            conversation.add_user(message, kwargs.get("media"))
            yield from events
            conversation.add_assistant("done")

    config = SimpleNamespace(name="stub", input_modalities=list(inputs), output_modalities=list(outputs),
                             generation=tiny_pipe.config.generation)
    return SimpleNamespace(config=config, device="cpu", stream=stream)


@pytest.mark.parametrize("message, output, error, pattern", [
    ("   ", "auto", "ConfigError", r"empty message"),
    ("Make a clip.", "video", "ConfigError", r"unknown output choice 'video'; this model offers auto, image"),
    ("Hear this.", "auto", "MediaError", r"tone\.wav: this model does not read audio input \(\.wav\); "
                                         r"attach an image \(\.png, "),
])
def test_bad_input_errors_are_typed(tiny_pipe, media_files, tmp_path, caplog, message, output, error, pattern):
    from anygpt.app.engine import run_turn
    from anygpt.app.session import ChatSession, UserMessage

    wav = tmp_path / "tone.wav"
    wav.write_bytes(media_files["audio"].read_bytes())
    files = [str(wav)] if "Hear" in message else []
    session = ChatSession()
    with caplog.at_level(logging.INFO, logger="anygpt.app.engine"):
        state = list(run_turn(_stub(tiny_pipe, ["image"], ["image"]), session, UserMessage(message, files),
                              output_dir=tmp_path, output=output))[-1]
    assert re.search(pattern, state.error) and session.conversation.turns == ()
    assert f"turn rejected ({error})" in caplog.text


def _blocks(demo, kind):
    import gradio as gr

    return [b for b in demo.blocks.values() if type(b) is getattr(gr, kind)]


def _api_parameters(demo):
    return demo.get_api_info()["named_endpoints"]["/chat"]["parameters"]


def test_settings_controls_and_api_parameters_are_the_declared_options(tiny_pipe, tmp_path, monkeypatch):
    from anygpt.app import chat
    from anygpt.config import DECODE_OPTIONS, SAMPLING_OPTIONS
    from anygpt.options import Option

    declared = [o for o in (*SAMPLING_OPTIONS, *DECODE_OPTIONS) if o.ui is not None or o.name == "seed"]
    demo = chat.build_app(tiny_pipe, output_dir=tmp_path)
    params = _api_parameters(demo)
    names = [p["parameter_name"] for p in params]
    assert names == ["message", "output", *(o.name for o in declared)]
    # gradio_client callers use the pipeline's keyword names; the old UI-only names are gone
    assert {"max_new_tokens", "temperature", "top_p", "seed", "steps", "guidance", "height", "width",
            "num_frames", "fps", "audio_length_s"} <= set(names)
    assert not {"image_size", "video_frames", "audio_length"} & set(names)

    # Defaults: sampling sliders the preset's values (tiny's differ from the options' defaults),
    # decode sliders the decoders' own values where the output modalities share one (tiny: 2
    # steps each, guidance 7.5, 4 video frames), else 0 (native size); the seed -1 (random).
    generation, decode = tiny_pipe.config.generation, {o.name for o in DECODE_OPTIONS}
    preset = {"steps": 2, "guidance": 7.5, "num_frames": 4}
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params}
    for opt in declared:
        expected = (-1 if opt.name == "seed" else preset.get(opt.name, 0) if opt.name in decode
                    else getattr(generation, opt.name))
        assert defaults[opt.name] == expected, opt.name
    sliders = _blocks(demo, "Slider")
    assert len(sliders) == sum(o.ui is not None for o in declared)
    for opt, slider in zip([o for o in declared if o.ui is not None], sliders):
        assert (slider.minimum, slider.maximum, slider.step) == opt.ui, opt.name
        if opt.name in decode:
            shown = preset.get(opt.name)
            assert slider.label.endswith(f"(preset: {'native' if shown is None else f'{shown:g}'})"), slider.label
        else:
            assert "preset" not in slider.label, slider.label
    assert [n.label for n in _blocks(demo, "Number")] == ["Seed (-1: random)"]

    # Declaring an option is all it takes to get a control and an API parameter.
    extra = Option(name="noise", type=float, default=None, help="decoder noise", ui=(0, 1, 0.1), nullable=True)
    monkeypatch.setattr(chat, "DECODE_OPTIONS", (*DECODE_OPTIONS, extra))
    demo = chat.build_app(tiny_pipe, output_dir=tmp_path)
    assert [p["parameter_name"] for p in _api_parameters(demo)] == [*names, "noise"]
    slider = _blocks(demo, "Slider")[-1]
    assert (slider.minimum, slider.maximum, slider.value) == (0, 1, 0) and "(preset: native)" in slider.label
    assert chat.ui_settings([24, 1.0, 1.0, -1, 0, 0, 0, 0, 0, 0, 0, 0.3])["noise"] == 0.3


def test_decode_settings_show_each_modalitys_preset_value_and_keep_it(tiny_pipe, tmp_path):
    """Where the decoders' presets differ, the slider names each one and sits at 0; left there, or
    at a shared preset value, each decoder keeps its own value, and a moved slider applies to all."""
    import dataclasses

    from anygpt.app import chat

    modalities = dict(tiny_pipe.config.modalities)
    modalities["audio"] = dataclasses.replace(
        modalities["audio"], decoder=dataclasses.replace(modalities["audio"].decoder, steps=5))
    config = dataclasses.replace(tiny_pipe.config, modalities=modalities)
    defaults = chat.decode_defaults(config)
    assert defaults["steps"] == {"image": 2, "audio": 5, "video": 2}
    assert defaults["height"] == {} and defaults["num_frames"] == {"video": 4}
    demo = chat.build_app(SimpleNamespace(config=config, device="cpu", stream=tiny_pipe.stream), output_dir=tmp_path)
    steps = next(s for s in _blocks(demo, "Slider") if s.label.startswith("Steps"))
    assert steps.label == "Steps (preset: image 2, audio 5, video 2)" and steps.value == 0
    guidance = next(s for s in _blocks(demo, "Slider") if s.label.startswith("Guidance"))
    assert guidance.label == "Guidance (preset: 7.5)" and guidance.value == 7.5

    options = chat.control_options()
    untouched = [o.default if o.name != "seed" else -1 for o in options]
    untouched = [{"steps": 0, "guidance": 7.5, "num_frames": 4}.get(o.name, v) for o, v in zip(options, untouched)]
    untouched = [0 if o.name in {"height", "width", "fps", "audio_length_s"} else v for o, v in zip(options, untouched)]
    settings = chat.ui_settings(untouched, options, defaults)
    assert settings["steps"] is None and settings["guidance"] is None and settings["num_frames"] is None
    moved = [{"steps": 3, "guidance": 4.0}.get(o.name, v) for o, v in zip(options, untouched)]
    assert chat.ui_settings(moved, options, defaults)["steps"] == 3
    assert chat.ui_settings(moved, options, defaults)["guidance"] == 4.0


def test_ui_values_map_to_pipeline_settings():
    from anygpt.app.chat import control_options, ui_settings
    from anygpt.config import DECODE_OPTIONS

    options, decode = control_options(), {o.name for o in DECODE_OPTIONS}
    # "preset default" everywhere: the seed -1 and every decode slider 0 become None
    unset = ui_settings([-1 if o.name == "seed" else 0 if o.name in decode else o.ui[1] for o in options])
    for opt in options:
        if opt.name == "seed" or opt.name in decode:
            assert unset[opt.name] is None, opt.name
        else:
            assert unset[opt.name] == opt.ui[1] and type(unset[opt.name]) is opt.type, opt.name
    # set values are cast to the option's type (sliders send floats)
    chosen = ui_settings([7.0 if o.name == "seed" else float(o.ui[2] or 1) for o in options])
    assert chosen["seed"] == 7 and type(chosen["seed"]) is int
    for opt in options:
        assert chosen[opt.name] is not None and type(chosen[opt.name]) is opt.type, opt.name
    with pytest.raises(ValueError, match="setting values"):
        ui_settings([1, 2])


def test_api_settings_reach_the_pipeline_by_name(server, tiny_pipe):
    ask(client_for(server), "settings probe", max_new_tokens=3, top_p=0.5, seed=5, steps=1, height=0)
    generation = tiny_pipe.config.generation
    calls = dict(server[2].calls["settings probe"])
    cancel = calls.pop("cancel")  # job.cancel() sets it; this job ran to its end
    assert isinstance(cancel, threading.Event) and not cancel.is_set()
    assert calls == {
        "media": {}, "outputs": (), "max_new_tokens": 3, "temperature": generation.temperature,
        "top_p": 0.5, "seed": 5, "steps": 1}  # height 0 and the other decode settings: preset default


def test_uploads_outputs_and_media_come_from_the_registry(tiny_pipe, tmp_path):
    from anygpt.app.chat import build_app
    from anygpt.modalities import get_modality

    def suffixes(modalities):
        return [s for m in modalities for s in get_modality(m).input_suffixes]

    for pipe in (tiny_pipe, _stub(tiny_pipe, ["image"], ["audio"])):
        demo = build_app(pipe, output_dir=tmp_path)
        box = next(b for b in _blocks(demo, "MultimodalTextbox") if b.elem_id == "message")
        assert box.file_types == suffixes(pipe.config.input_modalities)
        radio = _blocks(demo, "Radio")[0]
        assert [value for _, value in radio.choices] == ["auto", *pipe.config.output_modalities]
    assert box.file_types == list(get_modality("image").input_suffixes)  # the stub reads images only


def test_a_model_with_its_own_examples_and_description_shows_them(tiny_pipe, tmp_path):
    """A model that knows a small world (the trained miniature) offers examples inside it,
    with their media resolved against the model's folder, and says what it knows."""
    import dataclasses

    from anygpt.app.chat import build_app
    from anygpt.config import ExampleConfig

    (tmp_path / "model" / "examples").mkdir(parents=True)
    (tmp_path / "model" / "examples" / "dot.png").write_bytes(b"")
    config = dataclasses.replace(tiny_pipe.config, description="It knows red dots.", examples=[
        ExampleConfig(text="<image> What is this?", media={"image": ["examples/dot.png"]}),
        ExampleConfig(text="Draw a red dot.")])
    pipe = SimpleNamespace(config=config, device="cpu", base_dir=tmp_path / "model", stream=tiny_pipe.stream)
    demo = build_app(pipe, output_dir=tmp_path / "out")
    header = next(b for b in _blocks(demo, "Markdown") if b.elem_id == "header")
    assert "It knows red dots." in header.value
    examples = _blocks(demo, "Dataset")[0]
    assert [row[0]["text"] for row in examples.raw_samples] == ["<image> What is this?", "Draw a red dot."]
    assert [Path(f).resolve() for f in examples.raw_samples[0][0]["files"]] == \
        [(tmp_path / "model" / "examples" / "dot.png").resolve()]
    # Without examples of its own, the app offers its general ones.
    general = _blocks(build_app(tiny_pipe, output_dir=tmp_path / "out2"), "Dataset")[0]
    assert "Hello! Who are you?" in [row[0]["text"] for row in general.raw_samples]


@pytest.fixture
def pointcloud():
    """A modality the app has never heard of, registered for one test."""
    from anygpt.modalities import ModalitySpec, register_modality, unregister_modality

    def write(value, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
        return path

    spec = register_modality(ModalitySpec(
        name="pointcloud", plural="pointclouds", noun="a point cloud", signal_prefix="PCD",
        default_signal_tokens=4, encoder_input="depth", input_suffixes=(".ply",), output_suffix=".ply",
        ui_component="NoSuchPointCloudViewer", rank=99, loader=lambda item: item,
        preprocessor=lambda value, **geometry: None, writer=write))
    try:
        yield spec
    finally:
        unregister_modality("pointcloud")


def test_a_new_modality_needs_no_app_edit(pointcloud, tiny_pipe, tmp_path):
    import gradio as gr

    from anygpt.app import chat
    from anygpt.app.engine import run_turn
    from anygpt.app.session import ChatSession, UserMessage
    from anygpt.types import GenerationOutput, MediaSegment, MediaStarted, TextDelta

    events = [TextDelta("Here:"), MediaStarted("pointcloud", 0), MediaSegment("pointcloud", "ply 1 2 3"),
              GenerationOutput()]
    pipe = _stub(tiny_pipe, ["image", "pointcloud"], ["pointcloud"], events)
    demo = chat.build_app(pipe, output_dir=tmp_path)
    assert ".ply" in _blocks(demo, "MultimodalTextbox")[0].file_types
    assert "pointcloud" in [value for _, value in _blocks(demo, "Radio")[0].choices]
    assert "a point cloud" in _blocks(demo, "Markdown")[0].value

    upload = tmp_path / "scan.ply"
    upload.write_text("ply")
    session = ChatSession()
    states = [dataclasses.replace(s, parts=[dataclasses.replace(p) for p in s.parts])
              for s in run_turn(pipe, session, UserMessage("Scan this", [str(upload)]), output_dir=tmp_path,
                                output="pointcloud")]
    assert session.conversation.turns[0].media[0].modality == "pointcloud"
    pending = chat._render_turn(UserMessage("Scan this"), states[1])[-1]["content"]
    assert "making a point cloud" in pending[-1]
    final = states[-1]
    assert final.done and [os.path.basename(f) for f in final.files] == ["pointcloud_0.ply"]
    assert open(final.files[0]).read() == "ply 1 2 3"
    shown = chat._render_turn(UserMessage("Scan this"), final)[-1]["content"]
    assert isinstance(shown[-1], gr.File)  # no such Gradio component: a file link


def test_cli_parses_app_and_stays_light():
    from anygpt.cli import build_parser

    args = build_parser().parse_args(["app", "--preset", "tiny", "--port", "7999"])
    assert (args.command, args.model, args.host, args.port, args.share) == ("app", "tiny", "127.0.0.1", 7999, False)
    code = "import sys, anygpt, anygpt.cli, anygpt.app; assert 'gradio' not in sys.modules, 'gradio imported'"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pipeline_reports_decoder_steps_and_stops_at_a_step_boundary(tiny_pipe):
    """``on_progress`` gets every denoising step (with an ETA); ``cancel`` stops the call at the
    next step, leaves the conversation as it was and no thread behind, and the next call works."""
    from anygpt import Cancelled, Conversation

    steps = []
    out = tiny_pipe("Draw.", outputs=("image",), seed=0, max_new_tokens=2, steps=3, on_progress=steps.append)
    assert out.images and [(p.label, p.step, p.steps) for p in steps][-3:] == [
        ("image 1/1", 1, 3), ("image 1/1", 2, 3), ("image 1/1", 3, 3)]
    assert steps[-3].describe().startswith("image 1/1 · step 1/3 · ETA ") and steps[-1].eta_s == 0

    conversation, cancel, seen = Conversation(), threading.Event(), []

    def stop_after_first(progress):
        seen.append(progress.step)
        cancel.set()

    before = set(threading.enumerate())  # other tests' threads may end meanwhile: count only new ones
    with pytest.raises(Cancelled, match="image 1/1: stopped after 2 of 5"):
        tiny_pipe.chat(conversation, "Draw.", outputs=("image",), max_new_tokens=2, steps=5,
                       on_progress=stop_after_first, cancel=cancel)
    assert seen == [1] and conversation.turns == () and set(threading.enumerate()) <= before
    with pytest.raises(Cancelled, match="stopped after 0 tokens"):  # set before: no token is made
        tiny_pipe.chat(conversation, "Hi.", cancel=cancel)
    assert tiny_pipe.chat(conversation, "Draw.", outputs=("image",), max_new_tokens=2, steps=1).images
    assert len(conversation.turns) == 2


def test_a_stopped_turn_keeps_its_answer_marked_stopped_and_the_next_turn_works(tiny_pipe, tmp_path):
    from anygpt.app import chat
    from anygpt.app.engine import run_turn
    from anygpt.app.session import ChatSession, UserMessage

    session, cancel, lines = ChatSession(), threading.Event(), []
    message = UserMessage("Draw a square.")

    def on_update(state):
        lines.extend(str(part) for part in chat._render_turn(message, state)[-1]["content"])
        cancel.set()  # the stop button, pressed during the first denoising step

    states = list(run_turn(tiny_pipe, session, message, output_dir=tmp_path, output="image",
                           settings={"steps": 4, "max_new_tokens": 3, "seed": 1}, cancel=cancel,
                           on_update=on_update))
    # The random LLM may begin a run of its own (decoded first); the first step of it is shown.
    assert any(re.fullmatch(r"\*⏳ making (image|audio|video) 1/1 · step 1/4 · ETA \d+ s\*", line)
               for line in lines), lines
    final = states[-1]
    assert final.stopped and not final.done and not final.error and not final.files
    shown = chat._render_turn(message, final)
    assert shown[-1]["role"] == "assistant" and shown[-1]["content"][-1] == chat.STOPPED
    assert not any("making" in str(part) for part in shown[-1]["content"])  # no placeholder left
    assert session.conversation.turns == ()  # the pipeline rolled the stopped turn back

    again = list(run_turn(tiny_pipe, session, UserMessage("Draw again."), output_dir=tmp_path, output="image",
                          settings={"steps": 1, "max_new_tokens": 3}))[-1]
    assert again.done and len(again.files) >= 1 and len(session.conversation.turns) == 2


def test_cancelling_an_api_job_stops_the_turn_and_frees_the_slot(tiny_pipe, tmp_path, caplog):
    from anygpt.app.chat import build_app
    from anygpt.app.gate import ModelGate
    from anygpt.app.server import launch
    from anygpt.errors import Cancelled
    from anygpt.testing import HoldingPipe

    caplog.set_level(logging.INFO, logger="anygpt.app.chat")
    pipe, gate = HoldingPipe(tiny_pipe), ModelGate(1, max_waiting=1)
    demo = build_app(pipe, output_dir=tmp_path, gate=gate)
    launch(demo, host="127.0.0.1", port=_free_port(), block=False)
    try:
        client = Client(demo.local_url, verbose=False)
        job = client.submit({"text": "Draw a square.", "files": []}, "image", api_name="/chat",
                            steps=20, max_new_tokens=3, seed=1)
        assert pipe.first_event.wait(TIMEOUT), "the turn never started"
        job.cancel()  # held until the turn's cancel is set: nothing else can end it early
        assert pipe.cancels[0].wait(TIMEOUT) and pipe.ended.wait(TIMEOUT)
        assert isinstance(pipe.raised[0], Cancelled), pipe.raised
        def take_the_slot():  # max_waiting=1: waits for the slot, which the cancelled turn must give back
            with gate.slot():
                pass

        freed = threading.Thread(target=take_the_slot)
        freed.start()
        freed.join(TIMEOUT)
        assert not freed.is_alive(), "the cancelled turn kept its model slot"
        assert "API turn cancelled by its client" in caplog.text
    finally:
        demo.close()

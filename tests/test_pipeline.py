"""End-to-end behaviour of AnyGPTPipeline on the tiny preset."""

import json

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from anygpt import AnyGPTPipeline, Conversation, MediaError
from anygpt.errors import ConfigError, ContextLengthError, UnknownNameError
from anygpt.export import save_output
from anygpt.types import MediaSegment, TextDelta


def test_any_to_any_round_trip_on_disk(tiny_pipe, media_files, tmp_path):
    out = tiny_pipe("What is in these? <image> <audio> <video> Now make new ones.",
                    images=[media_files["image"]], audios=[media_files["audio"]],
                    videos=[media_files["video"]], outputs=("image", "audio", "video"), seed=0)
    assert [s.modality for s in out.segments if isinstance(s, MediaSegment)] == ["image", "audio", "video"]
    written = save_output(out, tmp_path)
    names = [p.name for p in written]
    assert names == ["image_0.png", "audio_0.wav", "video_0.mp4", "answer.json"]

    image = Image.open(tmp_path / "image_0.png")
    image.load()
    assert image.size == (64, 64)
    data, rate = sf.read(tmp_path / "audio_0.wav")
    # The WAV carries the decoder's own rate (its vocoder's), and the configured length.
    assert rate == tiny_pipe.decoder("audio").pipeline.vocoder.config.sampling_rate == 16000
    assert len(data) == out.audios[0].waveform.shape[-1] > 0
    with av.open(str(tmp_path / "video_0.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == tiny_pipe.config.modalities["video"].decoder.num_frames

    answer = json.loads((tmp_path / "answer.json").read_text())
    assert [s["type"] for s in answer["segments"] if s["type"] != "text"] == ["image", "audio", "video"]
    assert answer["text"] == out.text


def test_segment_order_follows_the_text(tiny_pipe):
    """Runs the LLM writes itself keep their place between text pieces."""
    lm = tiny_pipe.model.lm
    audio_first = lm.signal_ids["audio"][0]
    image_first = lm.signal_ids["image"][0]
    bias = torch.zeros(lm.model.get_output_embeddings().weight.shape[0])
    # Make the LLM write an audio run, some text, then an image run by biasing its logits.
    calls = {"n": 0}
    head = lm.model.get_output_embeddings()

    def steer(module, inputs, output):
        calls["n"] += 1
        step = calls["n"]
        boost = bias.clone()
        if step == 3:
            boost[audio_first] = 1e4
        elif step == 16:
            boost[image_first] = 1e4
        elif step == 20:  # right after the 4-token image run (steps 16-19)
            boost[lm.tokenizer.eos_token_id] = 1e4
        return output + boost.to(output.dtype)

    handle = head.register_forward_hook(steer)
    try:
        out = tiny_pipe("Hi", seed=0, max_new_tokens=40, do_sample=False)
    finally:
        handle.remove()
    kinds = [s.modality if isinstance(s, MediaSegment) else "text" for s in out.segments]
    assert kinds == ["text", "audio", "text", "image"]
    assert not any(s.forced for s in out.segments if isinstance(s, MediaSegment))
    first_text = out.segments[0].text
    assert out.raw_text.startswith(first_text)
    assert out.raw_text.index("[AUD0]") < out.raw_text.index("[IMG0]")


def _steer(lm, plan):
    """Bias the LM head: ``plan`` maps a forward-call number (1 = prefill) to a token id to boost,
    or to ``-ids`` lists to forbid at every step."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        bias = torch.zeros(output.shape[-1])
        for banned in plan.get("ban", ()):
            bias[banned] = -1e4
        if calls["n"] in plan:
            bias[plan[calls["n"]]] = 1e4
        return output + bias.to(output.dtype)

    return lm.model.get_output_embeddings().register_forward_hook(hook)


def test_forced_outputs_are_appended_when_the_llm_writes_none(tiny_pipe):
    lm = tiny_pipe.model.lm
    handle = _steer(lm, {"ban": [ids[0] for ids in lm.signal_ids.values()]})
    try:
        out = tiny_pipe("Say something", outputs=("video",), seed=1, max_new_tokens=5)
    finally:
        handle.remove()
    videos = [s for s in out.segments if isinstance(s, MediaSegment)]
    assert [v.modality for v in videos] == ["video"] and videos[0].forced
    assert out.videos[0].num_frames == 4
    assert out.raw_text.endswith("[VID23]")


def test_a_begun_run_is_completed_past_the_token_limit(tiny_pipe):
    lm = tiny_pipe.model.lm
    handle = _steer(lm, {5: lm.signal_ids["image"][0]})  # the 5th and last allowed token
    try:
        out = tiny_pipe("Draw", seed=0, max_new_tokens=5, do_sample=False)
    finally:
        handle.remove()
    assert out.num_generated_tokens == 4 + 4
    assert out.raw_text.endswith("[IMG0][IMG1][IMG2][IMG3]")
    assert len(out.images) == 1 and not out.segments[-1].forced


def test_same_seed_same_answer_and_media(tiny_pipe):
    a = tiny_pipe("Draw", outputs=("image",), seed=3)
    b = tiny_pipe("Draw", outputs=("image",), seed=3)
    c = tiny_pipe("Draw", outputs=("image",), seed=4)
    assert a.raw_text == b.raw_text
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.raw_text != c.raw_text or not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_save_pretrained_round_trip_is_identical(tiny_pipe, media_files, tmp_path):
    kwargs = dict(images=[media_files["image"]], outputs=("image", "audio"), seed=7)
    before = tiny_pipe("Describe and redraw", **kwargs)
    tiny_pipe.save_pretrained(tmp_path / "model")
    reloaded = AnyGPTPipeline.from_pretrained(tmp_path / "model")
    reloaded.set_progress_bar_config(disable=True)
    after = reloaded("Describe and redraw", **kwargs)
    assert after.raw_text == before.raw_text
    assert np.array_equal(np.asarray(after.images[0]), np.asarray(before.images[0]))
    assert np.array_equal(after.audios[0].waveform, before.audios[0].waveform)


def test_chat_reuses_earlier_encodings(tiny_pipe, media_files, monkeypatch):
    calls = []
    original = tiny_pipe.model.encode_media

    def counting(modality, batch):
        calls.append((modality, batch.shape[0]))
        return original(modality, batch)

    monkeypatch.setattr(tiny_pipe.model, "encode_media", counting)
    conv = Conversation()
    tiny_pipe.chat(conv, "What is this?", images=[media_files["image"]], seed=0, max_new_tokens=4)
    tiny_pipe.chat(conv, "And this sound?", audios=[media_files["audio"]], seed=0, max_new_tokens=4)
    tiny_pipe.chat(conv, "Compare them", seed=0, max_new_tokens=4)
    # The same image attached again is recognised by content and not encoded again either.
    tiny_pipe.chat(conv, "Again", images=[media_files["image"]], seed=0, max_new_tokens=4)
    assert calls == [("image", 1), ("audio", 1)]
    assert [t.role for t in conv.turns] == ["user", "assistant"] * 4
    assert conv.num_encoded == 2


def test_stream_yields_text_then_media_then_output(tiny_pipe):
    conv = Conversation()
    conv.add_user("Paint")
    events = list(tiny_pipe.stream(conv, outputs=("image",), seed=0))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    kinds = [type(e).__name__ for e in events if not isinstance(e, TextDelta)]
    assert kinds == ["MediaStarted", "MediaSegment", "GenerationOutput"]
    assert text.strip() == events[-1].text
    assert conv.turns[-1].role == "assistant"


def test_messages_api_places_media(tiny_pipe, media_files, monkeypatch):
    """A message's media is encoded and its slots sit in that message, not elsewhere."""
    seen = {}
    original = tiny_pipe.model.embed_prompt

    def spy(prompt, media_embeddings):
        seen["prompt"], seen["media"] = prompt, media_embeddings
        return original(prompt, media_embeddings)

    monkeypatch.setattr(tiny_pipe.model, "embed_prompt", spy)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Look: <image>", "images": [media_files["image"]]},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "Now draw it"}]
    out = tiny_pipe(messages, outputs=("image",), seed=0)
    assert len(out.images) == 1
    prompt, lm = seen["prompt"], tiny_pipe.model.lm
    assert [ref.modality for ref in prompt.media] == ["image"] and len(seen["media"]) == 1
    slots = prompt.media_mask.nonzero().flatten().tolist()
    assert len(slots) == tiny_pipe.model.num_media_tokens()["image"]
    before = lm.decode(prompt.input_ids[: slots[0]].tolist())
    after = lm.decode(prompt.input_ids[slots[-1] + 1:].tolist())
    assert "Be brief." in before and "Look:" in before and "A red square." not in before
    assert "A red square." in after and "Now draw it" in after


def test_bad_inputs_raise_clear_errors(tiny_pipe, tmp_path):
    with pytest.raises(MediaError, match="nope.png"):
        tiny_pipe("hi", images=[tmp_path / "nope.png"])
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(MediaError, match="broken.wav"):
        tiny_pipe("hi", audios=[bad])
    with pytest.raises(UnknownNameError, match="valid names: audio, image, video"):
        tiny_pipe("hi", outputs=("smell",))
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) temprature; valid: .*images.*temperature"):
        tiny_pipe("hi", temprature=0.5)
    with pytest.raises(ConfigError, match=r"settings.temperature: must be >= 0.01, got -1.0"):
        tiny_pipe("hi", temperature=-1.0)
    with pytest.raises(ConfigError, match=r"steps: must be >= 1 and <= 1000, got 0"):
        tiny_pipe("hi", steps=0, outputs=("image",))


def test_context_overflow_drops_old_turns_or_raises(tiny_pipe, caplog):
    conv = Conversation()
    for i in range(6):
        conv.add_user("x" * 300)
        conv.add_assistant("y" * 100)
    conv.add_user("final question")
    out = tiny_pipe.chat(conv, seed=0, max_new_tokens=1500)  # 2048-token context
    assert "dropped" in caplog.text
    assert out is not None
    with pytest.raises(ContextLengthError, match=r"needs \d+ tokens plus 100 new tokens.*2048"):
        tiny_pipe("z" * 3000, max_new_tokens=100)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UnknownNameError, match="mini, nextgpt-7b, tiny"):
        AnyGPTPipeline.from_pretrained("tiny-typo")

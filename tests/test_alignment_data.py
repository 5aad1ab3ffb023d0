"""Alignment data: manifests, per-stage datasets, collation, target cache, synthetic dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from anygpt.alignment.data import AlignmentDataset, ManifestError, Sample, collate, read_manifest
from anygpt.alignment.synthetic import BACKGROUNDS, COLOURS, DIRECTIONS, PITCHES, make_synthetic_dataset
from anygpt.alignment.targets import MissingTargetsError, TargetCache
from anygpt.errors import ConfigError


def _write_manifest(folder: Path, rows: list) -> Path:
    """Rows as JSONL (strings are written verbatim, anything else as JSON)."""
    path = folder / "manifest.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def media_dir(tmp_path, media_files):
    """A manifest folder holding copies of the sample media under relative names."""
    for modality, source in media_files.items():
        (tmp_path / "media").mkdir(exist_ok=True)
        (tmp_path / "media" / source.name).write_bytes(source.read_bytes())
    return tmp_path


def _run_of(model, modality):
    return model.lm.signal_ids[modality]


def _contains_run(ids: list[int], run: list[int]) -> bool:
    return any(ids[i:i + len(run)] == run for i in range(len(ids) - len(run) + 1))


# Manifests ----------------------------------------------------------------------------------


def test_manifest_resolves_relative_paths_and_lists(media_dir):
    path = _write_manifest(media_dir, [
        {"caption": "a red square", "image": "media/square.png"},
        "",
        {"caption": "a tone", "audio": ["media/tone.wav", str(media_dir / "media" / "tone.wav")], "id": 7},
        {"conversation": [{"role": "user", "content": "<image> what is it?", "image": ["media/square.png"]},
                          {"role": "assistant", "content": "A red square."}]},
    ])
    samples = read_manifest(path)
    assert [s.line for s in samples] == [1, 3, 4]
    assert samples[0] == Sample(line=1, media={"image": [media_dir / "media" / "square.png"]}, caption="a red square")
    assert samples[1].media["audio"] == [media_dir / "media" / "tone.wav"] * 2
    assert samples[2].caption is None
    assert samples[2].turns[0]["media"] == {"image": [media_dir / "media" / "square.png"]}
    assert samples[2].turns[1] == {"role": "assistant", "content": "A red square.", "media": {}}


BAD_ROWS = {
    "invalid JSON": '{"caption": "x", "image": ',
    "no such file": {"caption": "missing", "image": "media/nope.png"},
    "image: ": {"caption": "corrupt", "image": "media/corrupt.png"},
    "must be a string": {"caption": 5, "image": "media/square.png"},
    "unknown key(s) 'depth'": {"caption": "depth map", "depth": "media/square.png"},
    "empty": {"caption": "   ", "image": "media/square.png"},
    ".role must be one of": {"conversation": [{"role": "bot", "content": "hi"}]},
    "no assistant message": {"conversation": [{"role": "user", "content": "hi"}]},
}


@pytest.fixture()
def bad_manifest(media_dir):
    (media_dir / "media" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rows = [{"caption": "a red square", "image": "media/square.png"}, *BAD_ROWS.values()]
    return _write_manifest(media_dir, rows)


def test_manifest_skip_reports_each_bad_row_with_its_line(bad_manifest, caplog):
    with caplog.at_level(logging.WARNING, logger="anygpt.alignment.data"):
        samples = read_manifest(bad_manifest, on_error="skip")
    assert [s.line for s in samples] == [1]
    messages = [r.getMessage() for r in caplog.records]
    for line, problem in enumerate(BAD_ROWS, start=2):
        assert any(m.startswith(f"{bad_manifest}:{line}:") and problem in m for m in messages), (problem, messages)
    assert any(f"skipped {len(BAD_ROWS)} bad row(s) of {len(BAD_ROWS) + 1}" in m for m in messages)


def test_manifest_fail_raises_listing_every_bad_row(bad_manifest):
    with pytest.raises(ManifestError) as info:
        read_manifest(bad_manifest, on_error="fail")
    assert len(info.value.problems) == len(BAD_ROWS)
    for line, problem in enumerate(BAD_ROWS, start=2):
        assert f"{bad_manifest}:{line}: " in str(info.value) and problem in str(info.value)
    assert "valid keys" in str(info.value) and "image" in str(info.value)  # unknown modality lists valid names
    corrupt = info.value.problems[2]
    assert "corrupt.png" in corrupt and "no such file" not in corrupt


def test_manifest_without_usable_rows_raises(tmp_path):
    with pytest.raises(ManifestError, match="no usable rows"):
        read_manifest(_write_manifest(tmp_path, [{"caption": "x", "image": "gone.png"}]))
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "absent.jsonl")
    with pytest.raises(ConfigError, match="on_error"):
        read_manifest(tmp_path / "absent.jsonl", on_error="ignore")


# Datasets ------------------------------------------------------------------------------------


@pytest.fixture()
def caption_samples(media_files):
    return [Sample(1, {"image": [media_files["image"]]}, caption="a red square"),
            Sample(2, {"audio": [media_files["audio"]], "video": [media_files["video"]]}, caption="a busy scene"),
            Sample(3, {"image": [media_files["image"]]}, caption="the same square again")]


def _check_media_slots(model, item):
    slots = sum(model.num_media_tokens()[m] for m, _ in item["media"])
    assert slots == int(item["media_mask"].sum())
    assert all(emb.shape == (model.encoder.output_dim,) and emb.device.type == "cpu" for _, emb in item["media"])


def test_stage1_labels_are_the_caption_and_end_marker(tiny_pipe, caption_samples):
    model = tiny_pipe.model
    ds = AlignmentDataset(caption_samples, 1, model)
    assert len(ds) == 4  # one item per media file
    for i in range(len(ds)):
        item = ds[i]
        labelled = item["labels"][item["labels"] != -100].tolist()
        assert model.lm.decode(labelled) == f" {item['caption']}\n###"
        assert len(item["media"]) == 1 and item["output_modality"] is None and item["index"] == i
        _check_media_slots(model, item)
        assert item["labels"].shape == item["input_ids"].shape == item["media_mask"].shape


def test_stage2_labels_hold_the_full_signal_run(tiny_pipe, caption_samples):
    model = tiny_pipe.model
    ds = AlignmentDataset(caption_samples, 2, model)
    assert [ds[i]["output_modality"] for i in range(len(ds))] == ["image", "audio", "video", "image"]
    requests = set()
    for i in range(len(ds)):
        item = ds[i]
        labelled = item["labels"][item["labels"] != -100].tolist()
        assert _contains_run(labelled, _run_of(model, item["output_modality"]))
        assert item["media"] == [] and not item["media_mask"].any()
        requests.add(model.lm.decode(item["input_ids"][item["labels"] == -100].tolist()).split(item["caption"])[0])
    assert len(requests) > 1  # templates vary with the index
    chosen = AlignmentDataset(caption_samples, 2, model, modalities=["audio", "image"])
    assert len(chosen) == 6 and {chosen[i]["output_modality"] for i in range(6)} == {"audio", "image"}
    with pytest.raises(ConfigError, match="no output modality 'depth'"):
        AlignmentDataset(caption_samples, 2, model, modalities=["depth"])


def test_stage3_dialogue_with_media_and_signal_runs(tiny_pipe, media_files):
    model = tiny_pipe.model
    run = "".join(model.lm.signal_tokens["image"])
    turns = [{"role": "user", "content": "What is <image> and <audio>?",
              "media": {"image": [media_files["image"]], "audio": [media_files["audio"]]}},
             {"role": "assistant", "content": "A square and a tone.", "media": {}},
             {"role": "user", "content": "Draw it.", "media": {}},
             {"role": "assistant", "content": f"Here: {run}", "media": {}}]
    ds = AlignmentDataset([Sample(5, {}, turns=turns)], 3, model)
    item = ds[0]
    assert [m for m, _ in item["media"]] == ["image", "audio"]
    _check_media_slots(model, item)
    labelled = item["labels"][item["labels"] != -100].tolist()
    assert _contains_run(labelled, _run_of(model, "image"))
    assert "A square and a tone." in model.lm.decode(labelled)
    with pytest.raises(ConfigError, match="conversation rows"):
        AlignmentDataset([Sample(1, {"image": [media_files["image"]]}, caption="x")], 3, model)
    with pytest.raises(ConfigError, match="caption rows"):
        AlignmentDataset([Sample(5, {}, turns=turns)], 1, model)


def test_stage3_captioned_generation_gets_a_conditioning_target(tiny_pipe, media_dir):
    """A caption on the assistant message that generates media names that run's target; the last
    captioned message of a conversation is the one scored."""
    model = tiny_pipe.model
    image, audio = ("".join(model.lm.signal_tokens[m]) for m in ("image", "audio"))
    rows = [{"conversation": [
        {"role": "user", "content": "draw a red circle"},
        {"role": "assistant", "content": f"Sure! {image}", "caption": "a red circle"},
        {"role": "user", "content": "and play a low tone"},
        {"role": "assistant", "content": f"Here it is. {audio}", "caption": "a low sine tone"}]},
        {"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}]
    ds = AlignmentDataset(read_manifest(_write_manifest(media_dir, rows), on_error="fail"), 3, model)
    assert (ds[0]["caption"], ds[0]["output_modality"]) == ("a low sine tone", "audio")
    assert (ds[1]["caption"], ds[1]["output_modality"]) == (None, None)

    def problem(message):
        path = _write_manifest(media_dir, [{"conversation": [{"role": "user", "content": "x"}, message]}])
        with pytest.raises(ManifestError) as error:
            read_manifest(path, on_error="fail")
        return str(error.value)

    assert "only assistant messages take a caption" in problem({"role": "user", "content": "x", "caption": "c"})
    assert "conversation[1].caption is empty" in problem({"role": "assistant", "content": "x", "caption": ""})
    no_run = _write_manifest(media_dir, [{"conversation": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "no run here", "caption": "c"}]}])
    with pytest.raises(ConfigError, match="exactly one output modality"):
        AlignmentDataset(read_manifest(no_run), 3, model)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_encoder_runs_once_per_file(tiny_pipe, caption_samples, monkeypatch, batch_size):
    model = tiny_pipe.model
    encoded: list[int] = []
    original = type(model).encode_media

    def counting(self, modality, batch):
        encoded.append(batch.shape[0])
        return original(self, modality, batch)

    monkeypatch.setattr(type(model), "encode_media", counting)
    ds = AlignmentDataset(caption_samples, 1, model, encode_batch_size=batch_size)
    first = [ds[i]["media"][0][1] for i in range(len(ds))]
    again = [ds[i]["media"][0][1] for i in range(len(ds))]
    assert sum(encoded) == 3  # image (used twice), audio, video
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(first[0], first[3])  # the shared image


def test_collate_pads_and_keeps_media_order(tiny_pipe, caption_samples):
    model = tiny_pipe.model
    ds = AlignmentDataset(caption_samples, 1, model)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items, pad_id=model.lm.tokenizer.pad_token_id)
    lengths = [it["input_ids"].numel() for it in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["media_mask"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == model.lm.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all() and not batch["media_mask"][row, n:].any()
    assert [m for m, _ in batch["media"]] == [m for it in items for m, _ in it["media"]]
    assert batch["captions"] == [it["caption"] for it in items]
    assert batch["output_modalities"] == [None] * 4 and batch["indices"].tolist() == [0, 1, 2, 3]
    out = model(batch["input_ids"], batch["attention_mask"], batch["media_mask"], batch["media"], batch["labels"])
    assert torch.isfinite(out.loss)


def test_stage2_batch_feeds_signal_states(tiny_pipe, caption_samples):
    model = tiny_pipe.model
    ds = AlignmentDataset(caption_samples, 2, model, modalities=["image"])
    batch = collate([ds[i] for i in range(len(ds))], pad_id=model.lm.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        states = model.signal_states(out.hidden_states, batch["input_ids"], "image")
        cond = model.project_signals("image", states)
    assert states.shape[:2] == (3, 4)
    assert cond.shape == (3, *tiny_pipe.decoder("image").condition_shape)


# Target cache --------------------------------------------------------------------------------


class _StubDecoder:
    name = "stub"
    condition_shape = (2, 3)

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.text_encoder = torch.nn.Linear(4, 6)
        self.calls = 0

    def encode_text(self, captions):
        self.calls += len(captions)
        feats = torch.tensor([[len(c), c.count("a"), c.count("e"), 1.0] for c in captions])
        return self.text_encoder(feats).detach().reshape(len(captions), *self.condition_shape)


def test_target_cache_builds_once_and_matches_the_decoder(tiny_pipe, tmp_path):
    decoder = tiny_pipe.decoder("image")
    ident = TargetCache.decoder_id(decoder)
    captions = ["a red circle", "a blue square", "a red circle", ""]
    cache = TargetCache(tmp_path / "targets")
    assert cache.build(decoder, captions, batch_size=2) == 3
    assert cache.build(decoder, captions) == 0
    assert len(cache) == 3 and (ident, "a blue square") in cache and (ident, "a green cat") not in cache
    expected = decoder.encode_text(["a blue square", "a red circle"])
    assert torch.equal(cache.get(ident, ["a blue square", "a red circle"]), expected)
    reopened = TargetCache(tmp_path / "targets")
    assert len(reopened) == 3 and torch.equal(reopened.get(ident, ["a blue square", "a red circle"]), expected)
    assert reopened.build(decoder, ["a red circle", "a green cat"]) == 1
    assert not list((tmp_path / "targets").glob(".*tmp*"))  # no temporary files left behind
    with pytest.raises(MissingTargetsError, match="run TargetCache.build"):
        cache.get(ident, ["a purple dog"])


def test_target_cache_ids_differ_between_decoders(tiny_pipe, tmp_path):
    assert TargetCache.decoder_id(tiny_pipe.decoder("image")) != TargetCache.decoder_id(tiny_pipe.decoder("video"))
    one, same, other = _StubDecoder(0), _StubDecoder(0), _StubDecoder(1)
    assert TargetCache.decoder_id(one) == TargetCache.decoder_id(same) != TargetCache.decoder_id(other)
    cache = TargetCache(tmp_path)
    cache.build(one, ["hello"])
    assert cache.build(other, ["hello"]) == 1 and other.calls == 1
    assert not torch.equal(cache.get(TargetCache.decoder_id(one), ["hello"]),
                           cache.get(TargetCache.decoder_id(other), ["hello"]))


# Synthetic dataset ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=12, num_val=3, seed=3)


def _dominant_colour(pixels: np.ndarray, background: tuple[int, int, int]) -> str:
    """The palette colour nearest to the most common non-background pixel."""
    flat = pixels.reshape(-1, 3).astype(int)
    fg = flat[np.abs(flat - background).sum(1) > 60]
    values, counts = np.unique(fg, axis=0, return_counts=True)
    top = values[counts.argmax()]
    return min(COLOURS, key=lambda name: np.abs(top - COLOURS[name]).sum())


def test_synthetic_media_match_their_captions(synthetic):
    from anygpt.media import load_audio, load_image, load_video

    samples = read_manifest(synthetic["captions_train"], on_error="fail")
    assert len(samples) == 12 and {m for s in samples for m in s.media} == {"image", "audio", "video"}
    for sample in samples:
        (modality, [path]), = sample.media.items()
        words = sample.caption.split()
        if modality == "image":
            background = BACKGROUNDS[words[-2]]
            assert _dominant_colour(np.asarray(load_image(path)), background) == words[1]
        elif modality == "audio":
            audio = load_audio(path)
            spectrum = np.abs(np.fft.rfft(audio.waveform))
            peak = spectrum.argmax() * audio.sample_rate / len(audio.waveform)
            assert abs(peak / PITCHES[words[1]] - 1) < 0.05, (sample.caption, peak)
        else:
            frames = load_video(path).frames.astype(int)
            assert frames.shape[1:3] == (64, 64) and len(frames) == 8
            centres = []
            for frame in frames[[0, -1]]:
                ys, xs = np.nonzero(np.abs(frame - 255).sum(-1) > 120)
                centres.append(np.array([xs.mean(), ys.mean()]))
            motion = centres[1] - centres[0]
            assert np.dot(motion, DIRECTIONS[words[-1]]) > 15, (sample.caption, motion)


def test_synthetic_dialogues_are_valid_and_deterministic(synthetic, tmp_path):
    dialogues = read_manifest(synthetic["dialogues_train"], on_error="fail")
    assert len(dialogues) == 12 and len(read_manifest(synthetic["dialogues_val"], on_error="fail")) == 3
    answers = [t["content"] for d in dialogues for t in d.turns if t["role"] == "assistant"]
    assert any("[IMG0][IMG1][IMG2][IMG3]" in a for a in answers)
    generated = [t for d in dialogues for t in d.turns if t["role"] == "assistant" and "[" in t["content"]]
    assert generated and all(t.get("caption") for t in generated)  # every generated medium names its target
    assert any(t["media"] for d in dialogues for t in d.turns)
    again = make_synthetic_dataset(tmp_path / "again", num_train=12, num_val=3, seed=3)
    other = make_synthetic_dataset(tmp_path / "other", num_train=12, num_val=3, seed=4)
    for key in synthetic:
        assert again[key].read_text() == synthetic[key].read_text()
    assert other["captions_train"].read_text() != synthetic["captions_train"].read_text()
    png = "train/image_0000.png"
    assert (tmp_path / "again" / png).read_bytes() == (synthetic["captions_train"].parent / png).read_bytes()
    custom = make_synthetic_dataset(tmp_path / "custom", num_train=12, num_val=1, seed=0,
                                    signal_tokens={"image": ["<a>", "<b>"]})
    text = custom["dialogues_train"].read_text()
    assert "<a><b>" in text  # (with fewer rows no image request may be drawn at all)
    assert "[AUD0]" not in text and "[IMG0]" not in text


def test_synthetic_dialogues_train_in_stage3(tiny_pipe, synthetic):
    model = tiny_pipe.model
    ds = AlignmentDataset(read_manifest(synthetic["dialogues_val"]), 3, model)
    batch = collate([ds[i] for i in range(len(ds))], pad_id=model.lm.tokenizer.pad_token_id)
    assert len(batch["media"]) == sum(len(ds[i]["media"]) for i in range(len(ds)))
    out = model(batch["input_ids"], batch["attention_mask"], batch["media_mask"], batch["media"], batch["labels"])
    assert torch.isfinite(out.loss)

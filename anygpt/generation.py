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
import inspect
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Generator, Hashable, Sequence

import torch

from anygpt.config import SamplingSettings
from anygpt.errors import Cancelled
from anygpt.llm import LanguageModel, cache_argument
from anygpt.seeding import fresh_seed

__all__ = ["SamplingSettings", "SignalRun", "LLMResult", "PromptCache", "generate_stream", "generate",
           "generate_batch", "cache_argument"]


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
        self.banned = torch.tensor(inner + [lm.media_begin_id, lm.media_end_id], dtype=torch.long,
                                   device=lm.device)
        self.modality: str | None = None
        self.pos = 0
        self.states: list[torch.Tensor] = []

    def forced_next(self) -> int | None:
        if self.modality is None:
            return None
        return self.runs[self.modality][self.pos]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.banned.device != logits.device:
            self.banned = self.banned.to(logits.device)
        logits[..., self.banned] = float("-inf")
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
    cancel: Any = None,
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
        cancel: a ``threading.Event`` (anything with ``is_set()``) checked before each token;
            once set, :class:`~anygpt.errors.Cancelled` is raised there.

    Yields:
        Text deltas (signal tokens excluded; held back while they could begin a stop string).

    Returns:
        The :class:`LLMResult` (via ``StopIteration.value``; use ``yield from``).
    """
    model, device = lm.model, inputs_embeds.device
    answer = _Answer(lm, settings, prompt_ids, settings.seed, device)
    result = answer.result
    static = None
    if lm.decode_step is not None:  # a fixed-shape step over a static cache: no reuse across turns
        position_keys = reuse = None
        static = _static_cache(lm, inputs_embeds.shape[1], settings.max_new_tokens, required)

    t0 = time.perf_counter()
    with torch.inference_mode():
        cache, logits, result.reused_tokens = _prefill(model, inputs_embeds, position_keys, reuse, static)
        # The compiled step's position lives on the device and advances there: no copy per token.
        position = torch.tensor([inputs_embeds.shape[1]], device=device)
        result.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            _check_cancel(cancel, answer.result)
            token = answer.next_token(logits)
            if token is not None:
                yield from answer.accept(token)
            if answer.finished:
                break
            if static is not None:
                hidden, logits = lm.decode_step(answer.token_tensor(token), cache, position)
                position += 1
                state = hidden[0, -1]
            else:
                out = model(input_ids=answer.token_tensor(token), **{cache_argument(): cache}, use_cache=True,
                            output_hidden_states=answer.in_run)
                cache, logits = _cache_of(out), out.logits
                state = out.hidden_states[-1][0, -1] if answer.in_run else None
            logits = logits[:, -1, :].float()
            if answer.in_run:
                answer.record(state)
        yield from answer.finish()
        cache = _append_missing_runs(lm, result, required, cache, device, inputs_embeds.shape[1])
    if position_keys is not None:
        result.cache = _keep(model, cache, tuple(position_keys) + tuple(result.token_ids))
    result.decode_s = time.perf_counter() - t0
    return result


class _Answer:
    """One answer being decoded: its sampler, signal-run tracker, text stream and result.

    The decoding loops (one answer, or a padded batch of them) ask it for the next token
    (:meth:`next_token`: a run's forced token, else a sampled one), hand it back
    (:meth:`accept`, which yields the text that became final) and, for a run token, give it the
    hidden state the LLM returned for it (:meth:`record`).
    """

    def __init__(self, lm: LanguageModel, settings: SamplingSettings, prompt_ids: torch.Tensor,
                 seed: int | None, device: torch.device):
        self.tracker, self.procs, self.settings = _RunTracker(lm), _processors(settings), settings
        self.text = _TextStream(lm, list(settings.stop_strings) + lm.stop_strings)
        self.eos, self.device = lm.eos_ids, device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed if seed is not None else fresh_seed())
        self.history = prompt_ids.to(device)[None]  # (1, L + generated): for the repetition penalty
        self.picked: torch.Tensor | None = None  # (1, 1) the last sampled token, on the device
        self.result = LLMResult()
        self.finished = self.in_run = False
        self.appending = False  # feeding a required run the LLM did not write (batched loop)

    def next_token(self, logits: torch.Tensor) -> int | None:
        """The token to feed after ``logits`` (1, V); None (and :attr:`finished`) at the length limit."""
        token = self.tracker.forced_next()
        self.picked = None
        if token is not None:
            return token
        if len(self.result.token_ids) >= self.settings.max_new_tokens:
            self.result.stop_reason, self.finished = "length", True
            return None
        scores = self.procs(self.history, self.tracker.mask(logits))
        self.picked = _pick(scores, self.settings.do_sample, self.gen)
        return int(self.picked)  # the one host sync of a step: the tracker and the text need the id

    def token_tensor(self, token: int) -> torch.Tensor:
        """``token`` as the LLM's (1, 1) input: the sampled tensor itself, or a forced run token."""
        if self.picked is not None:
            return self.picked
        return torch.tensor([[token]], device=self.device)

    def accept(self, token: int) -> Generator[str, None, None]:
        """Take ``token`` into the answer; yields the text it made final. An end-of-sequence token
        or a completed stop string finishes the answer (and is not kept)."""
        ids, result = self.result.token_ids, self.result
        ids.append(token)
        if self.settings.repetition_penalty != 1.0:
            self.history = torch.cat([self.history, self.token_tensor(token).view(1, 1)], dim=1)
        self.in_run = self.tracker.observe(token)
        if self.appending:
            return
        if not self.in_run:
            if token in self.eos:
                ids.pop()
                result.stop_reason, self.finished = "eos", True
                return
            delta, stopped = self.text.push(ids)
            if delta:
                _add_text(result, delta)
                yield delta
            if stopped:
                del ids[self.text.stop_at:]
                result.stop_reason, self.finished = "stop_string", True
        elif self.tracker.pos == 1:  # a run begins: release held-back text, start a new span
            tail = self.text.flush(len(ids))
            if tail:
                _add_text(result, tail)
                yield tail

    def record(self, state: torch.Tensor) -> None:
        """Store the hidden state (hidden,) of the run token just fed."""
        run = self.tracker.record(state, len(self.result.token_ids) - 1)
        if run is None:
            return
        run.forced = self.appending
        self.result.runs.append(run)
        self.result.pieces.append(run)
        if self.appending:
            self.finished = True  # an appended run ends the answer again
        else:
            self.text.flush(len(self.result.token_ids))

    def finish(self) -> Generator[str, None, None]:
        """Release the text still held back (unless a stop string cut it)."""
        if self.result.stop_reason != "stop_string":
            tail = self.text.flush(len(self.result.token_ids))
            if tail:
                _add_text(self.result, tail)
                yield tail

    def append_run(self, required: Sequence[str]) -> bool:
        """Start feeding the first run of ``required`` the answer lacks; False if none is missing."""
        present = {r.modality for r in self.result.runs}
        missing = [m for m in required if m not in present]
        if not missing:
            return False
        self.appending, self.finished = True, False
        self.tracker.modality, self.tracker.pos = missing[0], 0
        return True


def generate_batch(
    lm: LanguageModel,
    inputs_embeds: Sequence[torch.Tensor],
    prompt_ids: Sequence[torch.Tensor],
    settings: SamplingSettings,
    required: Sequence[str] = (),
    *,
    seeds: Sequence[int | None] | None = None,
    cancel: Any = None,
) -> list[LLMResult]:
    """Decode several answers as one left-padded batch: one LLM call per step for all of them.

    Each answer keeps its own sampler (seeded by its entry of ``seeds``), stop conditions and
    signal-run tracking, so it comes out as :func:`generate` would give it alone with that seed,
    up to floating-point rounding of the batched matrix products (greedy answers match; hidden
    states agree to about 1e-5 in float32). An answer that has finished feeds masked placeholder
    tokens until the last one ends; tokens a stop string cut after they were fed are masked out
    of the cache, and required runs the LLM did not write are fed token by token.

    Args:
        lm: the language model.
        inputs_embeds: one (1, L_i, hidden) prompt per answer.
        prompt_ids: one (L_i,) id tensor per answer (for the repetition penalty).
        settings: sampling settings shared by all answers (``settings.seed`` is not used).
        required: modalities every answer must contain.
        seeds: one seed per answer; None (or a None entry) draws a fresh one.
        cancel: as for :func:`generate_stream`, checked before each step.

    Returns:
        One :class:`LLMResult` per prompt, in order; ``prefill_s`` and ``decode_s`` are the
        batch's.
    """
    if len(inputs_embeds) != len(prompt_ids):
        raise ValueError(f"generate_batch: {len(inputs_embeds)} prompts but {len(prompt_ids)} id tensors")
    seeds = list(seeds) if seeds is not None else [None] * len(inputs_embeds)
    if len(seeds) != len(inputs_embeds):
        raise ValueError(f"generate_batch: {len(inputs_embeds)} prompts but {len(seeds)} seeds")
    model, device = lm.model, inputs_embeds[0].device
    answers = [_Answer(lm, settings, ids, seed, device) for ids, seed in zip(prompt_ids, seeds)]
    batch = _PaddedBatch(inputs_embeds)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache, logits = batch.prefill(model)
        prefill_s, t0 = time.perf_counter() - t0, time.perf_counter()
        while True:
            _check_cancel(cancel, answers[0].result)
            tokens = [_batch_step(answer, logits[i:i + 1], required) for i, answer in enumerate(answers)]
            for i, (answer, token) in enumerate(zip(answers, tokens)):
                batch.keep(i, len(answer.result.token_ids) - (token is not None))
            if all(token is None for token in tokens):
                break
            in_run = [token is not None and answer.in_run for answer, token in zip(answers, tokens)]
            out = batch.step(model, cache, tokens, output_hidden_states=any(in_run))
            cache, logits = _cache_of(out), out.logits[:, -1, :].float()
            for i, answer in enumerate(answers):
                if in_run[i]:
                    answer.record(out.hidden_states[-1][i, -1])
    decode_s = time.perf_counter() - t0
    for answer in answers:
        answer.result.prefill_s, answer.result.decode_s = prefill_s, decode_s
    return [answer.result for answer in answers]


def _batch_step(answer: _Answer, logits: torch.Tensor, required: Sequence[str]) -> int | None:
    """The token ``answer`` feeds this step, or None once it has nothing more to feed."""
    if answer.finished and not answer.append_run(required):
        return None
    token = answer.next_token(logits)
    if token is not None:
        for _ in answer.accept(token):
            pass
    if answer.finished:
        for _ in answer.finish():
            pass
        if not answer.append_run(required):
            return None
        # The token that ended the answer (none at the length limit) is not fed: the appended
        # run begins in its place.
        token = answer.next_token(logits)
        for _ in answer.accept(token):
            pass
    return token


class _PaddedBatch:
    """The left-padded KV-cache layout of a batch of answers.

    Column ``c`` of the cache holds one position of every row; a row's padding, its placeholder
    tokens after it finished, and tokens a stop string cut are masked out, and position ids
    count only a row's real tokens, so each row computes what it would alone.
    """

    def __init__(self, inputs_embeds: Sequence[torch.Tensor]):
        self.embeds = inputs_embeds
        self.lengths = [e.shape[1] for e in inputs_embeds]
        width = max(self.lengths)
        device = inputs_embeds[0].device
        self.mask = torch.zeros(len(inputs_embeds), width, dtype=torch.long, device=device)  # (B, columns)
        for i, n in enumerate(self.lengths):
            self.mask[i, width - n:] = 1
        self.next_position = torch.tensor(self.lengths, device=device)
        self.columns: list[list[int]] = [[] for _ in inputs_embeds]  # the column of each fed answer token

    def prefill(self, model: torch.nn.Module) -> tuple[Any, torch.Tensor]:
        batch, width = self.mask.shape
        first = self.embeds[0]
        padded = first.new_zeros(batch, width, first.shape[-1])  # (B, W, hidden)
        for i, embeds in enumerate(self.embeds):
            padded[i, width - embeds.shape[1]:] = embeds[0]
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, W)
        kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        out = model(inputs_embeds=padded, attention_mask=self.mask, position_ids=positions, use_cache=True,
                    **kwargs)
        return _cache_of(out), out.logits[:, -1, :].float()

    def keep(self, row: int, kept: int) -> None:
        """Mask out row ``row``'s fed answer tokens past its first ``kept`` (cut by a stop string)."""
        columns = self.columns[row]
        if len(columns) > kept:
            self.mask[row, columns[kept:]] = 0
            del columns[kept:]
            self.next_position[row] = self.lengths[row] + kept

    def step(self, model: torch.nn.Module, cache: Any, tokens: Sequence[int | None],
             output_hidden_states: bool) -> Any:
        """Feed one token per row (None: a masked placeholder)."""
        device = self.mask.device
        real = torch.tensor([t is not None for t in tokens], device=device)
        ids = torch.tensor([[0 if t is None else t] for t in tokens], device=device)  # (B, 1)
        column = self.mask.shape[1]
        self.mask = torch.cat([self.mask, real[:, None].long()], dim=1)
        positions = self.next_position[:, None].clone()  # (B, 1)
        self.next_position += real.long()
        for row, token in enumerate(tokens):
            if token is not None:
                self.columns[row].append(column)
        return model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                     output_hidden_states=output_hidden_states, **{cache_argument(): cache})


def _prefill(model: torch.nn.Module, inputs_embeds: torch.Tensor, keys: Sequence[Hashable] | None,
             reuse: PromptCache | None, static: Any = None) -> tuple[Any, torch.Tensor, int]:
    """Run the prompt through the LLM: ``(cache, last logits (1, V), positions reused)``; into
    the empty ``static`` cache if given."""
    start, past = 0, {}
    if static is not None:
        past = {cache_argument(): static,
                "cache_position": torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)}
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


def _static_cache(lm: LanguageModel, prompt_length: int, max_new_tokens: int, required: Sequence[str]) -> Any:
    """An empty static KV cache with room for the prompt, the answer and the appended runs."""
    from transformers import StaticCache

    longest_run = max((len(ids) for ids in lm.signal_ids.values()), default=0)
    needed = prompt_length + max_new_tokens + longest_run * (1 + len(required))
    # Rounded up to a power of two (at least 256): the compiled step is specialised to the
    # cache's length, so prompts of similar length share one compiled graph.
    length = max(256, 1 << (needed - 1).bit_length())
    # Its tensors are allocated by the (eager) prefill, on each layer's device and dtype, so the
    # first compiled step already sees its final buffers.
    return StaticCache(config=lm.model.config, max_cache_len=length)


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


def _check_cancel(cancel: Any, result: LLMResult) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"the answer was stopped after {len(result.token_ids)} tokens")


def _add_text(result: LLMResult, delta: str) -> None:
    if result.pieces and isinstance(result.pieces[-1], str):
        result.pieces[-1] += delta
    else:
        result.pieces.append(delta)


def _pick(scores: torch.Tensor, do_sample: bool, gen: torch.Generator) -> torch.Tensor:
    """The next token as a (1, 1) tensor on the scores' device."""
    if not do_sample:
        return scores.argmax(-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)


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

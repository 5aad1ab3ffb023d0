"""Teacher-forced passes that run the frozen prompt prefix once, without autograd.

In stage 2 only the output projectors and the signal tokens' embedding rows train; the LLM is
frozen. The hidden states and attention keys / values of every position before a row's first
signal token therefore do not depend on any trainable parameter: they are computed under
``torch.no_grad`` (and kept per example, keyed by content, in a byte-bounded LRU cache: the
prefix of an example is the same in every epoch), and only the rest of the row — the *suffix*,
from the first signal token on — runs with autograd, attending to the prefix through a fresh
``DynamicCache`` built from the stored tensors. Nothing about the result changes: the LM loss
still covers the prefix's labelled positions (their logits are the frozen LM head applied to the
stored prefix states, so the signal rows' logit offsets still get their gradient), and the
signal states are those of the full pass. ``tests/test_stage2_prefix.py`` checks loss and
gradients against the full pass.

:meth:`FrozenPrefix.forward` returns None when the split does not apply (LoRA, the LLM or the
input projectors train; active dropout in a training-mode LLM; left padding; logit scaling the
LM head alone would miss; no prefix at all); the caller then runs the full pass.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anygpt.generation import cache_argument

if TYPE_CHECKING:
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["FrozenPrefix", "PrefixCache", "PrefixOutput", "prefix_lengths"]

# LLM config settings that change logits beyond ``lm_head(hidden)``: the split computes the
# prefix's logits with the LM head module alone, so it stands aside for these.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class PrefixOutput:
    """What :meth:`FrozenPrefix.forward` returns: the LM loss (None without labels), the
    last-layer hidden states (B, L, H) of the full pass (prefix positions detached, padding zero)
    and the prefix length of each row (B,)."""

    loss: torch.Tensor | None
    hidden_states: torch.Tensor
    prefix: torch.Tensor


@dataclass
class _Entry:
    """One example's frozen prefix: per-layer keys and values (heads, P, d) and the last-layer
    states (P, H), which are also the LM head's input."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values, self.hidden])


class PrefixCache:
    """Frozen-prefix entries by example key, least recently used evicted past ``max_bytes``.

    Entries stay on the model's device. ``max_bytes = 0`` keeps nothing (every step recomputes
    the prefix, still without autograd).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: _Entry) -> None:
        size = entry.nbytes
        if size > self.max_bytes or key in self._entries:
            return
        while self._entries and self.nbytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
        self._entries[key] = entry
        self.nbytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def prefix_lengths(input_ids: torch.Tensor, lengths: torch.Tensor, trainable_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the number of leading positions whose inputs hold no trainable token: the index
    of the first ``trainable_ids`` token, capped at ``length - 1`` so that every row keeps at
    least one position in the suffix (B,) long."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    valid = positions[None] < lengths[:, None]
    hit = torch.isin(input_ids, trainable_ids.to(input_ids.device)) & valid
    first = torch.where(hit.any(1), hit.long().argmax(1), lengths)
    return torch.minimum(first, lengths - 1).clamp(min=0)


class FrozenPrefix:
    """The split teacher-forced pass of an :class:`AnyGPTModel` (see the module docstring).

    Args:
        model: the composed model.
        extra: the objective's extra trainable modules (the signal rows, if they train).
        cache_bytes: bound of the per-example prefix cache (0: no cache).
    """

    def __init__(self, model: "AnyGPTModel", extra: nn.ModuleDict, cache_bytes: int):
        self.model, self.extra = model, extra
        self.cache = PrefixCache(cache_bytes)
        self.calls = 0  # batches that took the split pass (tests and logs read it)
        self._reported: set[str] = set()

    # When it applies ----------------------------------------------------------------------
    def unsupported(self) -> str | None:
        """Why the split cannot run now (a short reason), or None when it can."""
        projectors = {id(p) for p in self.model.output_projectors.parameters()}
        if any(p.requires_grad for p in self.model.parameters() if id(p) not in projectors):
            return "a parameter upstream of the output projectors trains (LoRA, the LLM or an input projector)"
        rows = self.extra["signal_rows"] if "signal_rows" in self.extra else None
        others = [p for name, p in self.extra.named_parameters() if not name.startswith("signal_rows.")]
        if any(p.requires_grad for p in others):
            return "an extra trainable module acts on the LLM"
        llm = self.model.lm.model
        if llm.training and _has_active_dropout(llm):
            return "the LLM has active dropout in training mode"
        if any(getattr(llm.config, name, None) for name in _LOGIT_TRANSFORMS):
            return "the LLM transforms its logits beyond the LM head"
        if rows is not None and rows.input.requires_grad and llm.get_input_embeddings() is not rows.embedding:
            return "the signal rows are hooked on a different embedding module"
        return None

    def _trainable_ids(self) -> torch.Tensor:
        """Token ids whose input embeddings train (the signal rows' ids), possibly none."""
        rows = self.extra["signal_rows"] if "signal_rows" in self.extra else None
        if rows is None or not rows.input.requires_grad:
            return torch.empty(0, dtype=torch.long)
        return rows.ids

    def _report(self, reason: str) -> None:
        if reason not in self._reported:
            self._reported.add(reason)
            logger.info("frozen-prefix pass: %s", reason)

    # The pass -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media_mask: torch.Tensor,
                media: Sequence[tuple[str, torch.Tensor]], labels: torch.Tensor | None,
                row_media: Callable[[], Sequence[Sequence[tuple[str, torch.Tensor]]]]) -> PrefixOutput | None:
        """The full pass's LM loss and hidden states, computed with the prefix split off; None
        when the split does not apply (the caller runs the full pass).

        Args:
            input_ids, attention_mask, media_mask, labels: (B, L), right-padded (``collate``).
            media: as :meth:`AnyGPTModel.embed_inputs` takes it.
            row_media: gives each row's media items (``media`` split by row), for the cache keys
                of prefixes that hold media slots (called only then).
        """
        reason = self.unsupported()
        if reason is not None:
            self._report(f"full pass ({reason})")
            return None
        device = self.model.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        lengths = attention_mask.sum(1)
        positions = torch.arange(input_ids.shape[1], device=device)
        if not torch.equal(attention_mask.bool(), positions[None] < lengths[:, None]) or bool((lengths == 0).any()):
            self._report("full pass (the batch is not right-padded)")
            return None
        prefix = prefix_lengths(input_ids, lengths, self._trainable_ids())
        if int(prefix.max()) == 0:
            self._report("full pass (no frozen prefix in the batch)")
            return None
        self._report("on")
        self.calls += 1
        embeds = self.model.embed_inputs(input_ids, media_mask, media)  # (B, L, H); grad at signal rows only
        entries = self._entries(embeds, prefix, _prefix_keys(input_ids, media_mask.to(device), prefix, row_media))
        hidden, logits = self._suffix(embeds, prefix, lengths, entries)
        full = self._assemble(hidden, prefix, lengths, entries)
        loss = None if labels is None else self._lm_loss(labels.to(device), prefix, entries, logits)
        return PrefixOutput(loss=loss, hidden_states=full, prefix=prefix)

    def _entries(self, embeds: torch.Tensor, prefix: torch.Tensor, keys: Sequence[tuple]) -> list[_Entry | None]:
        """Each row's prefix entry (None for an empty prefix): from the cache, or computed (for
        all missing rows in one batched no-grad pass) and cached."""
        lengths = prefix.tolist()
        entries: list[_Entry | None] = [None] * len(lengths)
        missing = []
        for row, length in enumerate(lengths):
            if length == 0:
                continue
            entries[row] = self.cache.get(keys[row]) if self.cache.max_bytes else None
            if entries[row] is None:
                missing.append(row)
        if missing:
            computed = self._run_prefix(embeds, prefix, missing)
            for row, entry in zip(missing, computed):
                entries[row] = entry
                if self.cache.max_bytes:
                    self.cache.put(keys[row], entry)
        return entries

    @torch.no_grad()
    def _run_prefix(self, embeds: torch.Tensor, prefix: torch.Tensor, rows: list[int]) -> list[_Entry]:
        """The frozen prefixes of batch ``rows``, right-padded into one pass of the base model
        (no LM head: the prefix's logits are only needed at labelled positions)."""
        index = torch.tensor(rows, device=embeds.device)
        length = int(prefix[index].max())
        mask = (torch.arange(length, device=embeds.device)[None] < prefix[index][:, None]).long()
        base = self.model.lm.model.get_decoder()
        out = base(inputs_embeds=embeds[index, :length].detach(), attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None)
        layers = (cache if cache is not None else out.past_key_values).layers
        entries = []
        for sub, row in enumerate(rows):
            p = int(prefix[row])
            # clone: keep each row's own slice, not a view that pins the whole batch tensor
            entries.append(_Entry(keys=[layer.keys[sub, :, :p].clone() for layer in layers],
                                  values=[layer.values[sub, :, :p].clone() for layer in layers],
                                  hidden=out.last_hidden_state[sub, :p].clone()))
        return entries

    def _suffix(self, embeds: torch.Tensor, prefix: torch.Tensor, lengths: torch.Tensor,
                entries: list[_Entry | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The suffixes (from each row's prefix length on) through the LLM with autograd,
        attending to the stored prefixes: last-layer states and logits, (B, S, H) and (B, S, V)."""
        from transformers import DynamicCache

        llm = self.model.lm.model
        device, batch = embeds.device, embeds.shape[0]
        width = int(prefix.max())
        steps = torch.arange(int((lengths - prefix).max()), device=device)
        where = (prefix[:, None] + steps[None]).clamp(max=embeds.shape[1] - 1)  # (B, S)
        suffix_mask = steps[None] < (lengths - prefix)[:, None]
        prefix_mask = torch.arange(width, device=device)[None] < prefix[:, None]
        # A fresh cache per step, filled from the stored tensors: the model appends the suffix's
        # keys to it, which must never reach the stored (shared) prefix tensors.
        cache = DynamicCache(config=llm.config)
        for layer in range(len(next(e for e in entries if e is not None).keys)):
            cache.update(_padded([None if e is None else e.keys[layer] for e in entries], width, dim=1),
                         _padded([None if e is None else e.values[layer] for e in entries], width, dim=1), layer)
        rows = torch.arange(batch, device=device)[:, None]
        out = llm(inputs_embeds=embeds[rows, where], attention_mask=torch.cat([prefix_mask, suffix_mask], 1).long(),
                  position_ids=prefix[:, None] + steps[None], use_cache=True, output_hidden_states=True,
                  **{cache_argument(): cache})
        return out.hidden_states[-1], out.logits

    def _assemble(self, suffix: torch.Tensor, prefix: torch.Tensor, lengths: torch.Tensor,
                  entries: list[_Entry | None]) -> torch.Tensor:
        """(B, L, H) last-layer states: stored prefix states, then the suffix's (padding zero)."""
        batch, width = suffix.shape[0], int(lengths.max())
        pieces = []
        for row in range(batch):
            parts = [] if entries[row] is None else [entries[row].hidden.to(suffix.dtype)]
            parts.append(suffix[row, : int(lengths[row] - prefix[row])])
            row_states = torch.cat(parts)
            pieces.append(F.pad(row_states, (0, 0, 0, width - row_states.shape[0])))
        return torch.stack(pieces)

    def _lm_loss(self, labels: torch.Tensor, prefix: torch.Tensor, entries: list[_Entry | None],
                 suffix_logits: torch.Tensor) -> torch.Tensor | None:
        """The causal-LM loss of the full pass (mean next-token cross-entropy over labelled
        positions). Prefix positions' logits: the frozen LM head on the stored states, with
        autograd, so that the signal rows' logit offsets (a hook on the head) get their gradient."""
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts labels[t + 1]
        rows, cols = (targets != -100).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return None
        in_prefix = cols < prefix[rows]
        head = self.model.lm.model.get_output_embeddings()
        picked = []
        if bool(in_prefix.any()):
            stored = _padded([None if e is None else e.hidden for e in entries], int(prefix.max()), dim=0)
            states = stored[rows[in_prefix], cols[in_prefix]]  # (N, H), constants
            picked.append((in_prefix.nonzero(as_tuple=True)[0], head(states)))
        later = ~in_prefix
        if bool(later.any()):
            picked.append((later.nonzero(as_tuple=True)[0],
                           suffix_logits[rows[later], cols[later] - prefix[rows[later]]]))
        # back into (row, position) order, the order of the full pass's flattened logits
        order = torch.cat([index for index, _ in picked])
        logits = torch.cat([value.float() for _, value in picked])[torch.argsort(order)]
        return F.cross_entropy(logits, targets[rows, cols])


def _prefix_keys(input_ids: torch.Tensor, media_mask: torch.Tensor, prefix: torch.Tensor,
                 row_media: Callable[[], Sequence[Sequence[tuple[str, torch.Tensor]]]]) -> list[tuple]:
    """One content key per row for its prefix: the prefix's token ids and, when media slots fall
    in the prefix, the bytes of the row's media embeddings (the frozen model is a function of
    these alone, so equal keys mean equal prefix states)."""
    keys, split = [], None
    for row, (ids, length) in enumerate(zip(input_ids.tolist(), prefix.tolist())):
        media = ()
        if bool(media_mask[row, :length].any()):
            split = row_media() if split is None else split
            media = tuple((m, e.detach().cpu().float().numpy().tobytes()) for m, e in split[row])
        keys.append((tuple(ids[:length]), media))
    return keys


def _padded(tensors: list[torch.Tensor | None], width: int, dim: int) -> torch.Tensor:
    """Stack per-row tensors (e.g. keys (heads, P_r, d) with ``dim=1``) into one batch tensor,
    zero-padded to ``width`` along ``dim`` (the padding is masked out); a None row is all padding."""
    like = next(t for t in tensors if t is not None)
    shape = list(like.shape)
    out = []
    for tensor in tensors:
        if tensor is None:
            shape[dim] = width
            out.append(like.new_zeros(shape))
            continue
        pad = [0, 0] * (like.dim() - 1 - dim) + [0, width - tensor.shape[dim]]
        out.append(F.pad(tensor, pad))
    return torch.stack(out)


def _has_active_dropout(module: nn.Module) -> bool:
    """Whether a forward in training mode would drop anything: a dropout module with p > 0, or
    a dropout probability in the config (attention dropout is often functional)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()):
        return True
    config = getattr(module, "config", None)
    settings = config.to_dict() if config is not None else {}
    return any(("dropout" in name or "pdrop" in name) and isinstance(value, float) and value > 0
               for name, value in settings.items())

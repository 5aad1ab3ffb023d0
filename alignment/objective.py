"""The training objective: the model plus its loss terms, as one ``nn.Module``.

Everything that touches trainable parameters happens inside :meth:`AlignmentObjective.forward`,
so the module can be wrapped by DDP / DeepSpeed (``accelerator.prepare``) as a whole. The terms,
weighted by :class:`~alignment.config.LossConfig`:

* ``lm`` — next-token loss on the assistant's answers;
* ``condition_mse`` — per signal run whose example has a caption, MSE between the projected
  signal states and the decoder's own text conditioning of the caption (read from a
  :class:`~alignment.targets.TargetCache`; no text encoder runs during training);
* ``denoising`` — the decoder's denoising loss through its frozen UNet, conditioned on the
  projected signal states, on the caption's own media (any output modality: each decoder turns
  its media into training samples, see :class:`MediaTargets`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anygpt.alignment.config import LossConfig
from anygpt.alignment.frozen_prefix import FrozenPrefix
from anygpt.alignment.targets import TargetCache
from anygpt.modalities import get_modality

if TYPE_CHECKING:
    from anygpt.decoders import Decoder
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["AlignmentObjective", "ConditionTargets", "MediaTargets", "conditioning_metrics", "signal_run_rows",
           "captioned_signal_states"]


class ConditionTargets:
    """Cached decoder conditionings by output modality.

    Args:
        cache: the target cache (already built for every caption that will be asked for).
        decoder_ids: output modality → :meth:`TargetCache.decoder_id` of its decoder.
    """

    def __init__(self, cache: TargetCache, decoder_ids: Mapping[str, str]):
        self.cache, self.decoder_ids = cache, dict(decoder_ids)

    def get(self, modality: str, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """(B, *condition_shape) float32 targets on ``device``."""
        return self.cache.get(self.decoder_ids[modality], list(captions)).to(device, torch.float32)


class MediaTargets:
    """The media of caption rows as denoising targets, by output modality.

    For each modality, a caption maps to the first file of that modality of a row with that
    caption. Files are loaded with the modality's loader (``get_modality(m).load``), turned into
    training samples by the modality's decoder (:meth:`Decoder.training_sample`: the size, range
    and representation its VAE encodes) and kept in memory after the first load.

    Args:
        samples: caption rows (with ``caption`` and ``media``: modality → file paths).
        decoders: output modality → its decoder; only these modalities get targets.
    """

    def __init__(self, samples: Sequence[Any], decoders: Mapping[str, "Decoder"]):
        self.decoders = dict(decoders)
        self.paths: dict[str, dict[str, Path]] = {m: {} for m in self.decoders}
        for sample in samples:
            if sample.caption is None:
                continue
            for modality, paths in self.paths.items():
                files = sample.media.get(modality)
                if files:
                    paths.setdefault(sample.caption, Path(files[0]))
        self._loaded: dict[tuple[str, Path], torch.Tensor] = {}

    def has(self, modality: str, caption: str) -> bool:
        """Whether ``caption`` has a ``modality`` file."""
        return caption in self.paths.get(modality, {})

    def get(self, modality: str, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """The training samples of ``captions`` stacked (``(B, ...)`` float32) on ``device``."""
        return torch.stack([self._load(modality, self.paths[modality][c]) for c in captions]).to(device)

    def _load(self, modality: str, path: Path) -> torch.Tensor:
        key = (modality, path)
        if key not in self._loaded:
            value = get_modality(modality).load(path)
            self._loaded[key] = self.decoders[modality].training_sample(value)
        return self._loaded[key]


def signal_run_rows(input_ids: torch.Tensor, first_id: int) -> torch.Tensor:
    """Batch row of every run starting with ``first_id``, in :meth:`AnyGPTModel.signal_states` order."""
    return (input_ids == first_id).nonzero(as_tuple=True)[0]


def captioned_signal_states(model: "AnyGPTModel", hidden: torch.Tensor, input_ids: torch.Tensor, modality: str,
                            captions: Sequence[str | None], output_modalities: Sequence[str | None]):
    """Hidden states (R, S, H) of the ``modality`` signal runs of the examples that carry a caption
    for that modality (the last such run per example), and those captions; ``(None, [])`` if none."""
    rows, states = _captioned_runs(model, hidden, input_ids, modality, captions, output_modalities)
    return states, [captions[row] for row in rows]


def _captioned_runs(model: "AnyGPTModel", hidden: torch.Tensor, input_ids: torch.Tensor, modality: str,
                    captions: Sequence[str | None], output_modalities: Sequence[str | None]):
    """The batch rows of :func:`captioned_signal_states` and their run states (R, S, H) (or None)."""
    rows = signal_run_rows(input_ids, model.lm.signal_ids[modality][0]).tolist()
    keep: dict[int, int] = {}  # batch row -> index of its last run
    for index, row in enumerate(rows):
        if output_modalities[row] == modality and captions[row] is not None:
            keep[row] = index
    if not keep:
        return [], None
    states = model.signal_states(hidden, input_ids, modality)  # (R_all, S, H)
    chosen = torch.tensor(list(keep.values()), device=states.device)
    return list(keep), states[chosen]


def conditioning_metrics(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE over all elements, and cosine similarity per conditioning vector (each of the Q
    positions of each item), averaged. Both are (differentiable) scalars."""
    mse = F.mse_loss(predicted, target)
    cosine = F.cosine_similarity(predicted, target, dim=-1).mean()
    return mse, cosine


class AlignmentObjective(nn.Module):
    """An :class:`AnyGPTModel` and the weighted loss terms of one stage.

    Args:
        model: the composed model (its trainable parameters already chosen).
        losses: the loss weights.
        targets: cached conditionings (needed when ``losses.condition_mse > 0``).
        decoders: output modality → decoder (needed when ``losses.denoising > 0``); frozen and
            deliberately not registered as submodules.
        media: denoising targets by modality and caption (needed when ``losses.denoising > 0``).
        extra: trainable modules that act on the model through hooks (the signal-row offsets);
            registered here so that DDP / DeepSpeed see their parameters.
        frozen_prefix: in training, run each row's frozen prefix (the positions before its
            first trainable input, e.g. the first signal token) without autograd, and only the
            rest with it (:mod:`alignment.frozen_prefix`); same loss and gradients.
        prefix_cache_mb: bound of the per-example cache of those prefixes (0: recompute them
            every step, still without autograd).

    When only the output projectors train (the LLM, its signal rows, LoRA and the input
    projectors all frozen) and the LM loss is off, the signal states of an example never change.
    In training mode they are then computed once per distinct example (token ids and media) and
    kept: later epochs run the projectors alone, which is what makes many epochs of an
    output-projector fit affordable. Otherwise, when the LLM is frozen but the signal rows train
    (stage 2), the frozen-prefix pass above applies. Evaluation always runs the whole model.
    """

    def __init__(self, model: "AnyGPTModel", losses: LossConfig, targets: ConditionTargets | None = None,
                 decoders: Mapping[str, Any] | None = None, media: MediaTargets | None = None,
                 extra: nn.ModuleDict | None = None, frozen_prefix: bool = True,
                 prefix_cache_mb: float = 1024.0):
        super().__init__()
        self.model = model
        self.extra = extra if extra is not None else nn.ModuleDict()
        self.losses = losses
        self.targets = targets
        self._decoders = dict(decoders or {})
        self.media = media
        # example key -> (modality, caption, run states (S, H)), or None without a captioned run
        self._states: dict[tuple, tuple[str, str, torch.Tensor] | None] = {}
        # not a submodule: it only holds references to the model and the prefix cache
        self.prefix = FrozenPrefix(model, self.extra, int(prefix_cache_mb * 2**20)) if frozen_prefix else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                media_mask: torch.Tensor, media: Sequence[tuple[str, torch.Tensor]] = (),
                captions: Sequence[str | None] = (), output_modalities: Sequence[str | None] = (),
                indices: torch.Tensor | None = None, noise_seed: int = 0) -> dict[str, torch.Tensor]:
        """One batch (as :func:`alignment.data.collate` makes it) → ``{"loss": total, ...terms}``.

        Metrics other than ``loss`` are detached: ``lm``, ``condition_mse/<m>``,
        ``condition_cosine/<m>``, ``denoising/<m>``. ``noise_seed`` seeds the denoising noise.
        """
        if self.training and self.losses.lm == 0 and self._only_output_projectors_train():
            return self._forward_memoized(input_ids, attention_mask, media_mask, media, captions,
                                          output_modalities, noise_seed)
        out = None
        if self.training and self.prefix is not None:
            out = self.prefix.forward(input_ids, attention_mask, media_mask, media,
                                      labels if self.losses.lm > 0 else None,
                                      lambda: _row_media(media_mask, media, self.model.num_media_tokens()))
        if out is None:  # the full pass (evaluation, or the split does not apply)
            out = self.model(input_ids, attention_mask=attention_mask, media_mask=media_mask, media=media,
                             labels=labels)
        metrics: dict[str, torch.Tensor] = {}
        total = out.hidden_states.new_zeros((), dtype=torch.float32)
        if self.losses.lm > 0 and out.loss is not None:
            total = total + self.losses.lm * out.loss.float()
            metrics["lm"] = out.loss.detach().float()
        if self.losses.condition_mse > 0 or self.losses.denoising > 0:
            total = total + self._output_side(out.hidden_states, input_ids, captions, output_modalities,
                                              noise_seed, metrics)
        if not total.requires_grad:  # no term applied to this batch: a zero loss that still backpropagates
            total = total + self._zero_through_trainable()
        metrics["loss"] = total
        return metrics

    def _zero_through_trainable(self) -> torch.Tensor:
        """0 × (sum of the trainable parameters): every process can call backward (DDP needs all to)
        and the step is a no-op for the gradient."""
        zero = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros(()))
        return zero.float()

    def _only_output_projectors_train(self) -> bool:
        projectors = {id(p) for p in self.model.output_projectors.parameters()}
        upstream = [p for p in self.model.parameters() if id(p) not in projectors]
        return not any(p.requires_grad for p in [*upstream, *self.extra.parameters()])

    def _forward_memoized(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media_mask: torch.Tensor,
                          media: Sequence[tuple[str, torch.Tensor]], captions: Sequence[str | None],
                          output_modalities: Sequence[str | None], noise_seed: int) -> dict[str, torch.Tensor]:
        per_row = _row_media(media_mask, media, self.model.num_media_tokens())
        keys = _example_keys(input_ids, attention_mask, per_row)
        for row, key in enumerate(keys):
            if key not in self._states and (captions[row] is None or output_modalities[row] is None):
                self._states[key] = None  # nothing to score: no LLM pass needed
        missing = [row for row, key in enumerate(keys) if key not in self._states]
        if missing:
            self._compute_states(missing, keys, input_ids, attention_mask, media_mask, per_row, captions,
                                 output_modalities)
        metrics: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=self.model.device)
        for modality in self.model.output_projectors:
            chosen = [v for v in map(self._states.get, keys) if v is not None and v[0] == modality]
            if chosen:
                runs = torch.stack([run for _, _, run in chosen])  # (R, S, H)
                total = total + self._run_losses(modality, runs, [c for _, c, _ in chosen], noise_seed, metrics)
        if not total.requires_grad:
            total = total + self._zero_through_trainable()
        metrics["loss"] = total
        return metrics

    def _compute_states(self, rows: list[int], keys: list[tuple], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, media_mask: torch.Tensor,
                        per_row: list[list[tuple[str, torch.Tensor]]], captions: Sequence[str | None],
                        output_modalities: Sequence[str | None]) -> None:
        """Run the frozen model on the batch ``rows`` alone (``per_row``: each row's media) and keep
        their captioned run states."""
        length = int(attention_mask[rows].sum(1).max())  # right padding: later columns are padding
        index = torch.tensor(rows)
        with torch.no_grad():
            hidden = self.model(input_ids[index, :length], attention_mask=attention_mask[index, :length],
                                media_mask=media_mask[index, :length],
                                media=[m for row in rows for m in per_row[row]]).hidden_states
        for row in rows:
            self._states[keys[row]] = None
        sub_captions, sub_outputs = [captions[r] for r in rows], [output_modalities[r] for r in rows]
        for modality in self.model.output_projectors:
            found, states = _captioned_runs(self.model, hidden, input_ids[index, :length], modality, sub_captions,
                                            sub_outputs)
            for sub_row, run in zip(found, states if states is not None else []):
                self._states[keys[rows[sub_row]]] = (modality, sub_captions[sub_row], run.detach())

    def _output_side(self, hidden: torch.Tensor, input_ids: torch.Tensor, captions: Sequence[str | None],
                     output_modalities: Sequence[str | None], noise_seed: int,
                     metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        for modality in self.model.output_projectors:
            runs, run_captions = captioned_signal_states(self.model, hidden, input_ids, modality, captions,
                                                         output_modalities)
            if runs is not None:
                total = total + self._run_losses(modality, runs, run_captions, noise_seed, metrics)
        return total

    def _run_losses(self, modality: str, runs: torch.Tensor, run_captions: list[str], noise_seed: int,
                    metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """The conditioning and denoising terms of one modality's captioned runs (R, S, H)."""
        total = torch.zeros((), dtype=torch.float32, device=runs.device)
        predicted = self.model.project_signals(modality, runs)  # (R, Q, out) float32
        if self.losses.condition_mse > 0 and self.targets is not None:
            target = self.targets.get(modality, run_captions, predicted.device)
            mse, cosine = conditioning_metrics(predicted, target)
            total = total + self.losses.condition_mse * mse
            metrics[f"condition_mse/{modality}"] = mse.detach()
            metrics[f"condition_cosine/{modality}"] = cosine.detach()
        if self.losses.denoising > 0 and modality in self.losses.denoising_modalities:
            loss = self._denoising(modality, predicted, run_captions, noise_seed)
            if loss is not None:
                total = total + self.losses.denoising * loss
                metrics[f"denoising/{modality}"] = loss.detach()
        return total

    def _denoising(self, modality: str, predicted: torch.Tensor, captions: list[str],
                   noise_seed: int) -> torch.Tensor | None:
        if self.media is None or modality not in self._decoders:
            return None
        have = [i for i, c in enumerate(captions) if self.media.has(modality, c)]
        if not have:
            return None
        decoder = self._decoders[modality]
        samples = self.media.get(modality, [captions[i] for i in have], predicted.device)
        generator = torch.Generator(device=decoder.device).manual_seed(noise_seed)
        return decoder.denoising_loss(predicted[have], samples, generator=generator)


def _row_media(media_mask: torch.Tensor, media: Sequence[tuple[str, torch.Tensor]],
               slots: Mapping[str, int]) -> list[list[tuple[str, torch.Tensor]]]:
    """``media`` (slot order, row by row; each item fills ``slots[modality]`` slots) split by row."""
    items = iter(media)
    rows = []
    for row_slots in media_mask.sum(1).tolist():
        row = []
        while row_slots > 0:
            row.append(next(items))
            row_slots -= slots[row[-1][0]]
        rows.append(row)
    return rows


def _example_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  per_row: list[list[tuple[str, torch.Tensor]]]) -> list[tuple]:
    """One hashable key per batch row: its unpadded token ids and the bytes of its media embeddings."""
    keys = []
    for ids, mask, row in zip(input_ids.tolist(), attention_mask.tolist(), per_row):
        row_media = tuple((m, e.detach().cpu().float().numpy().tobytes()) for m, e in row)
        keys.append((tuple(i for i, keep in zip(ids, mask) if keep), row_media))
    return keys

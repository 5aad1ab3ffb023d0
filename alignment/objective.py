"""The training objective: the model plus its loss terms, as one ``nn.Module``.

Everything that touches trainable parameters happens inside :meth:`AlignmentObjective.forward`,
so the module can be wrapped by DDP / DeepSpeed (``accelerator.prepare``) as a whole. The terms,
weighted by :class:`~alignment.config.LossConfig`:

* ``lm`` — next-token loss on the assistant's answers;
* ``condition_mse`` — per signal run whose example has a caption, MSE between the projected
  signal states and the decoder's own text conditioning of the caption (read from a
  :class:`~alignment.targets.TargetCache`; no text encoder runs during training);
* ``denoising`` — the decoder's denoising loss through its frozen UNet, conditioned on the
  projected signal states, on the caption's own media (images).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anygpt.alignment.config import LossConfig
from anygpt.alignment.targets import TargetCache

if TYPE_CHECKING:
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["AlignmentObjective", "ConditionTargets", "ImageTargets", "conditioning_metrics", "signal_run_rows",
           "captioned_signal_states", "decoder_image_size"]


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


class ImageTargets:
    """The images of caption rows as denoising targets: caption → (3, H, W) in [-1, 1].

    A caption with several images uses the first. Images are resized to the decoder's size and
    kept in memory after the first load.
    """

    def __init__(self, samples: Sequence[Any], size: tuple[int, int]):
        self.size = size
        self.paths: dict[str, Path] = {}
        for sample in samples:
            if sample.caption is not None and sample.media.get("image"):
                self.paths.setdefault(sample.caption, Path(sample.media["image"][0]))
        self._loaded: dict[Path, torch.Tensor] = {}

    def __contains__(self, caption: str) -> bool:
        return caption in self.paths

    def get(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """(B, 3, H, W) float32 in [-1, 1]."""
        return torch.stack([self._load(self.paths[c]) for c in captions]).to(device)

    def _load(self, path: Path) -> torch.Tensor:
        if path not in self._loaded:
            import numpy as np
            from PIL import Image

            height, width = self.size
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC))
            tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
            self._loaded[path] = tensor
        return self._loaded[path]


def decoder_image_size(decoder: Any) -> tuple[int, int]:
    """(height, width) of the images a diffusers image decoder generates by default."""
    pipeline = decoder.pipeline
    side = int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
    return side, side


def signal_run_rows(input_ids: torch.Tensor, first_id: int) -> torch.Tensor:
    """Batch row of every run starting with ``first_id``, in :meth:`AnyGPTModel.signal_states` order."""
    return (input_ids == first_id).nonzero(as_tuple=True)[0]


def captioned_signal_states(model: "AnyGPTModel", hidden: torch.Tensor, input_ids: torch.Tensor, modality: str,
                            captions: Sequence[str | None], output_modalities: Sequence[str | None]):
    """Hidden states (R, S, H) of the ``modality`` signal runs of the examples that carry a caption
    for that modality (the last such run per example), and those captions; ``(None, [])`` if none."""
    rows = signal_run_rows(input_ids, model.lm.signal_ids[modality][0]).tolist()
    keep: dict[int, int] = {}  # batch row -> index of its last run
    for index, row in enumerate(rows):
        if output_modalities[row] == modality and captions[row] is not None:
            keep[row] = index
    if not keep:
        return None, []
    states = model.signal_states(hidden, input_ids, modality)  # (R_all, S, H)
    chosen = torch.tensor(list(keep.values()), device=states.device)
    return states[chosen], [captions[row] for row in keep]


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
        images: denoising targets by caption (needed when ``losses.denoising > 0``).
        extra: trainable modules that act on the model through hooks (the signal-row offsets);
            registered here so that DDP / DeepSpeed see their parameters.
    """

    def __init__(self, model: "AnyGPTModel", losses: LossConfig, targets: ConditionTargets | None = None,
                 decoders: Mapping[str, Any] | None = None, images: ImageTargets | None = None,
                 extra: nn.ModuleDict | None = None):
        super().__init__()
        self.model = model
        self.extra = extra if extra is not None else nn.ModuleDict()
        self.losses = losses
        self.targets = targets
        self._decoders = dict(decoders or {})
        self.images = images

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                media_mask: torch.Tensor, media: Sequence[tuple[str, torch.Tensor]] = (),
                captions: Sequence[str | None] = (), output_modalities: Sequence[str | None] = (),
                indices: torch.Tensor | None = None, noise_seed: int = 0) -> dict[str, torch.Tensor]:
        """One batch (as :func:`alignment.data.collate` makes it) → ``{"loss": total, ...terms}``.

        Metrics other than ``loss`` are detached: ``lm``, ``condition_mse/<m>``,
        ``condition_cosine/<m>``, ``denoising/<m>``. ``noise_seed`` seeds the denoising noise.
        """
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

    def _output_side(self, hidden: torch.Tensor, input_ids: torch.Tensor, captions: Sequence[str | None],
                     output_modalities: Sequence[str | None], noise_seed: int,
                     metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        for modality in self.model.output_projectors:
            runs, run_captions = captioned_signal_states(self.model, hidden, input_ids, modality, captions,
                                                         output_modalities)
            if runs is None:
                continue
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
        if self.images is None or modality not in self._decoders:
            return None
        have = [i for i, c in enumerate(captions) if c in self.images]
        if not have:
            return None
        decoder = self._decoders[modality]
        samples = self.images.get([captions[i] for i in have], predicted.device)
        generator = torch.Generator(device=decoder.device).manual_seed(noise_seed)
        return decoder.denoising_loss(predicted[have], samples, generator=generator)

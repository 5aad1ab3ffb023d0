"""Train a diffusion decoder's own components from scratch on (media value, caption) pairs.

The alignment recipe trains the projectors *into* a frozen decoder; this module trains the
decoder itself, so that a small offline model (the ``mini`` preset's decoders) generates media
that match their captions instead of noise. It works on a :class:`~anygpt.decoders.base.Decoder`
through its public pieces only — ``decoder.pipeline.vae`` / ``.unet`` / ``.text_encoder``,
:meth:`~anygpt.decoders.base.Decoder.training_sample`,
:meth:`~anygpt.decoders.base.Decoder.encode_text` and
:meth:`~anygpt.decoders.base.Decoder.denoising_loss` — so the same code trains the image
(Stable Diffusion), audio (AudioLDM) and video (text-to-video) decoders. The result is still
the decoder's diffusers pipeline: :meth:`~anygpt.decoders.base.Decoder.save_pretrained` writes a
folder that ``diffusers.<Pipeline>.from_pretrained`` and
``load_decoder(DecoderConfig(name=..., pretrained=folder))`` load.

The components are trained one after the other, as Stable Diffusion was:

1. **VAE** (:func:`train_vae`): ``AutoencoderKL`` reconstruction (L1 + MSE) plus a small KL
   term, on the decoder's training samples (video: on single frames, as its per-frame VAE is
   used). Then :func:`calibrate_scaling_factor` sets ``vae.config.scaling_factor`` to
   ``1 / std`` of the training latents, so the diffusion model sees unit-variance latents.
2. **UNet** (:func:`train_unet`): the DDPM loss of :meth:`Decoder.denoising_loss` (the target
   is the pipeline scheduler's ``prediction_type``: noise or velocity) on latents encoded once
   with the trained VAE (re-sampled from their posterior every step), with caption dropout to
   the empty caption so that classifier-free guidance works at generation time.
3. **Text encoder**: kept frozen at its random initialisation by default (its embeddings of
   the captions are then computed once, which makes UNet training cheaper), or trained jointly
   with the UNet (``UNetTraining.train_text_encoder``).
4. **Fine-tuning** (optional, ``DecoderTraining.finetune``): the UNet again, on samples sized by
   other decode options. A video UNet learns content on short clips and motion on whole ones:
   its temporal layers have no positional embedding, so it learns the frame spacing and count
   of its training clips and should be fine-tuned at the length it generates.

:func:`train_decoder` runs the whole sequence, saving the pipeline after each component into
an output folder with a ``decoder_training.json`` state file, and resumes from it: components
already trained there are loaded instead of trained again.

Every function is seeded (``seed`` → a ``torch.Generator`` for the data order, the noise, the
timesteps and the caption dropout), logs through :mod:`logging` and shows a ``tqdm`` progress
bar unless ``progress=False``.

Example::

    from anygpt.config import DecoderConfig
    from anygpt.decoders import load_decoder
    from anygpt.alignment.decoder_training import DecoderTraining, train_decoder

    decoder = load_decoder(DecoderConfig(name="stable-diffusion", arch={"scheduler": "ddim"}))
    pairs = [(pil_image, "a red circle on a white background"), ...]
    train_decoder(decoder, pairs, DecoderTraining(), output_dir="out/image-decoder")
    # out/image-decoder is a StableDiffusionPipeline folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anygpt.alignment.optim import WarmupDecay, optimizer_step

if TYPE_CHECKING:
    from anygpt.decoders.base import Decoder

logger = logging.getLogger(__name__)

__all__ = [
    "VAETraining",
    "UNetTraining",
    "DecoderTraining",
    "TrainingSet",
    "LatentSet",
    "ComponentResult",
    "training_set",
    "train_vae",
    "reconstruction_loss",
    "calibrate_scaling_factor",
    "encode_latents",
    "train_unet",
    "evaluate_denoising_loss",
    "train_decoder",
    "set_noise_schedule",
    "save_decoder",
    "cast_weight_file",
    "STATE_FILE",
]

#: The state file :func:`train_decoder` writes next to the saved pipeline.
STATE_FILE = "decoder_training.json"


# Settings --------------------------------------------------------------------------------------


@dataclass
class VAETraining:
    """Settings of :func:`train_vae`.

    Attributes:
        steps: optimizer steps (0 skips the VAE: it keeps its weights, the scaling factor is
            still calibrated).
        batch_size: training samples per step (video: clips; every frame is a VAE input).
        lr, weight_decay, betas: AdamW.
        warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``lr * min_lr_ratio``.
        l1_weight, mse_weight: weights of the per-element L1 and squared reconstruction errors.
        kl_weight: weight of the posterior's KL divergence from N(0, 1), both terms being
            per-element means (Stable Diffusion's 1e-6 weighed per-image sums, about 1e-7 in
            these units; more KL keeps tiny latent spaces smooth and near unit scale).
        grad_clip: max gradient norm (0 disables clipping).
    """

    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-4
    grad_clip: float = 1.0


@dataclass
class UNetTraining:
    """Settings of :func:`train_unet`.

    Attributes:
        steps: optimizer steps.
        batch_size: training samples per step.
        lr, weight_decay, betas: AdamW for the UNet.
        warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``lr * min_lr_ratio``.
        caption_dropout: probability of replacing a caption by ``""`` (the unconditional
            embedding classifier-free guidance subtracts).
        train_text_encoder: train the text encoder jointly with the UNet (else it stays frozen
            and the captions' embeddings are computed once).
        text_encoder_lr: AdamW learning rate of the text encoder; default ``lr``.
        ema_decay: keep an exponential moving average of the UNet's (and a trained text
            encoder's) weights with this decay and load it at the end; None disables it.
        grad_clip: max gradient norm (0 disables clipping).
    """

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    caption_dropout: float = 0.1
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    ema_decay: float | None = None
    grad_clip: float = 1.0


@dataclass
class FinetuneTraining:
    """A second UNet phase of :func:`train_decoder`, on samples made with other decode options.

    Video models learn content on short clips and motion on long ones: e.g. the UNet is first
    trained on 4-frame samples (``DecoderTraining.sample_options``), then fine-tuned here on
    8-frame ones. With ``unet.train_text_encoder`` false the text encoder, and therefore every
    conditioning target computed from it, stays as the first phase left it.

    Attributes:
        unet: the phase's :class:`UNetTraining` settings.
        sample_options: decode options its samples are sized for (see
            :meth:`~anygpt.decoders.base.Decoder.training_sample`); empty: the decoder's own.
    """

    unet: UNetTraining = field(default_factory=UNetTraining)
    sample_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecoderTraining:
    """Settings of :func:`train_decoder`: one block per component, a seed and the output knobs."""

    vae: VAETraining = field(default_factory=VAETraining)
    unet: UNetTraining = field(default_factory=UNetTraining)
    #: decode options the VAE and UNet samples are sized for (e.g. ``{"num_frames": 4}``); empty:
    #: the decoder's own.
    sample_options: dict[str, Any] = field(default_factory=dict)
    #: a further UNet phase on differently sized samples (needs the media: pass pairs, not a
    #: :class:`TrainingSet`); None: none.
    finetune: FinetuneTraining | None = None
    seed: int = 0
    #: show a tqdm progress bar per component.
    progress: bool = True
    #: log the running loss every this many steps (0: only at the end of a component).
    log_every: int = 200

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecoderTraining:
        """The settings :func:`asdict` wrote (e.g. read back from :data:`STATE_FILE`), or a
        config section of the same shape (nested mappings, lists for tuples)."""
        values = dict(values)
        vae = VAETraining(**_tuples(values.pop("vae", {})))
        unet = UNetTraining(**_tuples(values.pop("unet", {})))
        finetune = values.pop("finetune", None)
        if finetune is not None:
            finetune = FinetuneTraining(unet=UNetTraining(**_tuples(finetune.get("unet", {}))),
                                        sample_options=dict(finetune.get("sample_options") or {}))
        return cls(vae=vae, unet=unet, finetune=finetune, **values)


@dataclass
class ComponentResult:
    """What training one component did: steps, wall time, mean loss of the first and last tenth
    of the steps, and component-specific numbers in ``extra`` (e.g. the scaling factor)."""

    component: str
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


# Data ------------------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Training samples of one decoder: ``samples[i]`` is ``decoder.training_sample`` of the
    ``i``-th media value (stored as ``samples.dtype``, float16 by default), ``captions[i]`` its
    caption."""

    samples: torch.Tensor
    captions: list[str]

    def __post_init__(self) -> None:
        if len(self.samples) != len(self.captions):
            raise ValueError(f"{len(self.samples)} samples but {len(self.captions)} captions")
        if not len(self.captions):
            raise ValueError("a TrainingSet needs at least one (media, caption) pair")

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class LatentSet:
    """The VAE posterior of every training sample, unscaled: ``mean`` and ``std`` with the
    UNet's latent shape; a training latent is ``(mean + std * noise) * scaling_factor``."""

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, index: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        mean, std = self.mean[index].float(), self.std[index].float()
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor


def training_set(decoder: Decoder, pairs: Iterable[tuple[Any, str]],
                 dtype: torch.dtype = torch.float16, options: Mapping[str, Any] | None = None) -> TrainingSet:
    """``(media value, caption)`` pairs → the decoder's training samples, stacked.

    Args:
        decoder: gives :meth:`~anygpt.decoders.base.Decoder.training_sample` (size, range).
        pairs: media values of the decoder's modality (PIL images, ``Audio``, ``Video``) with
            their captions.
        dtype: storage dtype of the stacked samples (float16 halves the memory; samples are
            cast to float32 per batch).
        options: decode options the samples are sized for (e.g. ``{"num_frames": 4}``); None:
            the decoder's own.
    """
    samples, captions = [], []
    for value, caption in pairs:
        samples.append(decoder.training_sample(value, options).to(dtype))
        captions.append(str(caption))
    if not samples:
        raise ValueError("training_set needs at least one (media, caption) pair")
    return TrainingSet(torch.stack(samples), captions)


def _batches(size: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches, drawn without replacement within each shuffled epoch."""
    batch_size = min(batch_size, size)
    order, position = torch.randperm(size, generator=generator), 0
    for _ in range(steps):
        if position + batch_size > size:
            order, position = torch.randperm(size, generator=generator), 0
        yield order[position:position + batch_size]
        position += batch_size


# Shared loop pieces ----------------------------------------------------------------------------


def _optimizer(groups: list[dict], settings: VAETraining | UNetTraining, steps: int):
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas),
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay("cosine", settings.warmup_steps, steps, settings.min_lr_ratio))
    return optimizer, schedule


def _progress(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)


class _Losses:
    """Per-step losses: running log lines and the first / last tenth means."""

    def __init__(self, name: str, steps: int, log_every: int):
        self.name, self.steps, self.log_every = name, steps, log_every
        self.values: list[float] = []
        self.start = time.perf_counter()

    def add(self, loss: float, bar: Any) -> None:
        self.values.append(loss)
        step = len(self.values)
        bar.update(1)
        if step % 10 == 0 or step == self.steps:
            bar.set_postfix(loss=f"{sum(self.values[-10:]) / len(self.values[-10:]):.4f}")
        if self.log_every and step % self.log_every == 0:
            window = self.values[-self.log_every:]
            logger.info("%s step %d/%d: loss %.4f (%.2f steps/s)", self.name, step, self.steps,
                        sum(window) / len(window), step / (time.perf_counter() - self.start))

    def result(self, **extra: Any) -> ComponentResult:
        seconds = time.perf_counter() - self.start
        tenth = max(1, len(self.values) // 10)
        mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
        result = ComponentResult(self.name, len(self.values), seconds, mean(self.values[:tenth]),
                                 mean(self.values[-tenth:]), extra)
        logger.info("%s: %d steps in %.1f s (%.2f steps/s), loss %.4f -> %.4f", self.name, result.steps,
                    seconds, result.steps_per_s, result.first_loss, result.last_loss)
        return result


def _trainable(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(True).train()


def _frozen(*modules: torch.nn.Module) -> None:
    # The Decoder protocol keeps every component frozen and in eval mode between calls.
    for module in modules:
        module.requires_grad_(False).eval()


# 1. The VAE -----------------------------------------------------------------------------------


def _frames(samples: torch.Tensor) -> torch.Tensor:
    """VAE inputs of a batch of samples: video clips ``(B, C, F, H, W)`` become their frames."""
    if samples.dim() == 5:
        return samples.transpose(1, 2).flatten(0, 1)
    return samples


def reconstruction_loss(vae: Any, media: torch.Tensor, settings: VAETraining,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's training loss on a batch of VAE inputs: ``(total, reconstruction)``.

    ``reconstruction`` is ``l1_weight · L1 + mse_weight · MSE`` of the decoded posterior sample;
    ``total`` adds ``kl_weight`` times the per-element KL divergence of the posterior.
    """
    posterior = vae.encode(media).latent_dist
    decoded = vae.decode(posterior.sample(generator)).sample
    error = decoded.float() - media.float()
    reconstruction = settings.l1_weight * error.abs().mean() + settings.mse_weight * error.square().mean()
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
    return reconstruction + settings.kl_weight * kl, reconstruction


def train_vae(decoder: Decoder, data: TrainingSet, settings: VAETraining | None = None, *, seed: int = 0,
              progress: bool = True, log_every: int = 200) -> ComponentResult:
    """Train ``decoder.pipeline.vae`` to reconstruct ``data``'s samples (in place).

    The VAE is left frozen and in eval mode, as the decoder keeps its components; its
    ``scaling_factor`` is not changed here (see :func:`calibrate_scaling_factor`).

    Returns:
        the steps, time and losses (``first_loss`` / ``last_loss`` are the total loss).
    """
    settings = settings or VAETraining()
    vae = decoder.pipeline.vae
    generator = torch.Generator().manual_seed(seed)
    params = list(vae.parameters())
    optimizer, schedule = _optimizer([{"params": params}], settings, settings.steps)
    losses = _Losses("vae", settings.steps, log_every)
    _trainable(vae)
    try:
        with _progress(settings.steps, "vae", progress) as bar:
            for index in _batches(len(data), settings.batch_size, settings.steps, generator):
                media = _frames(data.samples[index].to(decoder.device, decoder.dtype))
                loss, _ = reconstruction_loss(vae, media, settings, generator)
                optimizer_step(loss, optimizer, schedule, params, settings.grad_clip)
                losses.add(loss.item(), bar)
    finally:
        _frozen(vae)
    return losses.result()


@torch.no_grad()
def _posterior(decoder: Decoder, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior ``(mean, std)`` of a batch of samples, in the UNet's latent layout
    (video: frames encoded one by one, back to ``(B, C, F, h, w)``)."""
    media = _frames(samples.to(decoder.device, decoder.dtype))
    latent = decoder.pipeline.vae.encode(media).latent_dist
    mean, std = latent.mean, latent.std
    if samples.dim() == 5:
        batch, frames = samples.shape[0], samples.shape[2]
        mean, std = (t.unflatten(0, (batch, frames)).transpose(1, 2) for t in (mean, std))
    return mean.float().cpu(), std.float().cpu()


def encode_latents(decoder: Decoder, data: TrainingSet, batch_size: int = 64) -> LatentSet:
    """The trained VAE's posterior of every sample in ``data``, with the VAE's current
    ``scaling_factor``; what :func:`train_unet` trains on."""
    means, stds = [], []
    for start in range(0, len(data), batch_size):
        mean, std = _posterior(decoder, data.samples[start:start + batch_size])
        means.append(mean)
        stds.append(std)
    return LatentSet(torch.cat(means), torch.cat(stds), list(data.captions),
                     float(decoder.pipeline.vae.config.scaling_factor))


def calibrate_scaling_factor(decoder: Decoder, latents: LatentSet | TrainingSet, *,
                             generator: torch.Generator | None = None) -> float:
    """Set ``vae.config.scaling_factor`` to ``1 / std`` of the unscaled training latents (as
    Stable Diffusion computed its 0.18215) and return it.

    ``latents`` may be a :class:`LatentSet` (its ``scaling_factor`` is updated too) or a
    :class:`TrainingSet` (encoded first).
    """
    if isinstance(latents, TrainingSet):
        latents = encode_latents(decoder, latents)
    noise = torch.randn(latents.mean.shape, generator=generator)
    std = float((latents.mean + latents.std * noise).std())
    factor = 1.0 / std
    decoder.pipeline.vae.register_to_config(scaling_factor=factor)
    latents.scaling_factor = factor
    logger.info("vae scaling_factor = %.5f (1 / std of %d training latents)", factor, len(latents))
    return factor


# 2. The UNet (and optionally the text encoder) ------------------------------------------------


def _text_condition(decoder: Decoder, captions: list[str]) -> torch.Tensor:
    """``encode_text(captions)`` with gradients to the text encoder.

    ``Decoder.encode_text`` runs under ``no_grad``; this is the same computation (the decoder's
    own ``_encode_prompt``, i.e. the pipeline's prompt encoder) with autograd on.
    """
    embeds = decoder._encode_prompt(list(captions))
    return embeds.reshape(len(captions), *decoder.condition_shape)


class _EMA:
    """Exponential moving average of some modules' floating-point parameters."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        # The usual warmup of the decay (1 + t) / (10 + t), so early weights are not kept long.
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for param, shadow in zip(self.params, self.shadow, strict=True):
            param.copy_(shadow)


def train_unet(decoder: Decoder, latents: LatentSet, settings: UNetTraining | None = None, *, seed: int = 0,
               progress: bool = True, log_every: int = 200, label: str = "unet") -> ComponentResult:
    """Train ``decoder.pipeline.unet`` (and, if set, the text encoder) with the DDPM loss.

    Each step takes a batch of latents (sampled from their posterior, scaled), replaces each
    caption by ``""`` with probability ``caption_dropout``, and minimises
    :meth:`Decoder.denoising_loss` — the decoder's own noising, timestep sampling, conditioning
    of its UNet and ``prediction_type`` target. ``label`` names the progress bar, the log lines
    and the result's component (``finetune`` for a second phase).

    Returns:
        the steps, time and losses.
    """
    settings = settings or UNetTraining()
    pipeline = decoder.pipeline
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    generator = torch.Generator().manual_seed(seed)
    groups = [{"params": list(unet.parameters())}]
    modules = [unet]
    embeddings = None
    if settings.train_text_encoder:
        groups.append({"params": list(text_encoder.parameters()), "lr": settings.text_encoder_lr or settings.lr})
        modules.append(text_encoder)
    else:
        # A frozen text encoder: every distinct caption (and "") is encoded once.
        unique = sorted(set(latents.captions) | {""})
        embeddings = dict(zip(unique, decoder.encode_text(unique), strict=True))
    params = [p for group in groups for p in group["params"]]
    optimizer, schedule = _optimizer(groups, settings, settings.steps)
    ema = _EMA(modules, settings.ema_decay) if settings.ema_decay else None
    losses = _Losses(label, settings.steps, log_every)
    _trainable(*modules)
    try:
        with _progress(settings.steps, label, progress) as bar:
            for step, index in enumerate(_batches(len(latents), settings.batch_size, settings.steps, generator)):
                drop = torch.rand(len(index), generator=generator) < settings.caption_dropout
                captions = ["" if d else latents.captions[i] for i, d in zip(index.tolist(), drop.tolist())]
                if embeddings is None:
                    condition = _text_condition(decoder, captions)
                else:
                    condition = torch.stack([embeddings[c] for c in captions])
                sample = latents.sample(index, generator).to(decoder.device, decoder.dtype)
                loss = decoder.denoising_loss(condition, sample, generator)
                optimizer_step(loss, optimizer, schedule, params, settings.grad_clip)
                if ema is not None:
                    ema.update(step)
                losses.add(loss.item(), bar)
        if ema is not None:
            ema.copy_to_model()
    finally:
        _frozen(*modules)
        if settings.train_text_encoder:
            _forget_negative(decoder)
    return losses.result(train_text_encoder=settings.train_text_encoder)


def _forget_negative(decoder: Decoder) -> None:
    # Decoder.negative_condition caches encode_text([""]); a trained text encoder changes it.
    if getattr(decoder, "_negative", None) is not None:
        decoder._negative = None


@torch.no_grad()
def evaluate_denoising_loss(decoder: Decoder, latents: LatentSet, *, batch_size: int = 32,
                            num_batches: int = 4, seed: int = 1234) -> float:
    """Mean :meth:`Decoder.denoising_loss` over fixed batches, noise and timesteps (``seed``):
    a deterministic measure to compare a UNet before and after training."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _, index in zip(range(num_batches), _batches(len(latents), batch_size, num_batches, generator)):
        condition = decoder.encode_text([latents.captions[i] for i in index.tolist()])
        sample = latents.sample(index, generator).to(decoder.device, decoder.dtype)
        total += float(decoder.denoising_loss(condition, sample, generator)) * len(index)
        count += len(index)
    return total / count


def set_noise_schedule(decoder: Decoder, **overrides: Any) -> Any:
    """Replace the pipeline's scheduler by one of the same class with ``overrides`` of its
    config (e.g. ``prediction_type="v_prediction"``, ``rescale_betas_zero_snr=True``,
    ``timestep_spacing="trailing"``), before training: :meth:`Decoder.denoising_loss` trains with
    the pipeline scheduler's noise schedule and prediction type, and the saved pipeline samples
    with it. Returns the new scheduler."""
    scheduler = type(decoder.pipeline.scheduler).from_config({**decoder.pipeline.scheduler.config, **overrides})
    decoder.pipeline.scheduler = scheduler
    # Decoder.noise_scheduler caches a DDPMScheduler built from the pipeline's scheduler config.
    if getattr(decoder, "_noise_scheduler", None) is not None:
        decoder._noise_scheduler = None
    return scheduler


# The whole decoder -----------------------------------------------------------------------------


def train_decoder(decoder: Decoder, data: TrainingSet | Iterable[tuple[Any, str]],
                  settings: DecoderTraining | None = None, *, output_dir: str | Path | None = None,
                  resume: bool = True) -> dict[str, ComponentResult]:
    """Train the decoder's VAE, then its UNet (and text encoder, if set), then the UNet's
    ``settings.finetune`` phase if any, in place.

    Args:
        decoder: a decoder built from ``arch`` (random weights) or loaded.
        data: a :class:`TrainingSet`, or ``(media value, caption)`` pairs to build one from
            (sized by ``settings.sample_options``; a fine-tuning phase needs the pairs).
        settings: the components' settings, seed and progress bar; default :class:`DecoderTraining`.
        output_dir: if set, the pipeline is saved there (``decoder.save_pretrained``) after each
            component, with :data:`STATE_FILE` recording the components done, their results and
            the settings.
        resume: load the components that ``output_dir``'s state file lists as done instead of
            training them again (their settings are not compared; a different architecture
            fails to load).

    Returns:
        component name → its :class:`ComponentResult` (also for resumed components, as recorded).
    """
    settings = settings or DecoderTraining()
    pairs = None
    if isinstance(data, TrainingSet):
        if settings.finetune is not None:
            raise ValueError("settings.finetune makes new samples from the media: pass the (media value, "
                             "caption) pairs to train_decoder, not a TrainingSet")
    else:
        pairs = list(data)
        data = training_set(decoder, pairs, options=settings.sample_options)
    output = Path(output_dir) if output_dir is not None else None
    state = _read_state(output) if (output is not None and resume) else {}
    done: dict[str, ComponentResult] = {}
    for name in state.get("completed", []):
        _load_component(decoder, output, name)
        done[name] = ComponentResult(**state["results"][name])
        logger.info("resumed %s from %s", name, output)
    common = {"progress": settings.progress, "log_every": settings.log_every}
    latents = None

    if "vae" not in done:
        seed = settings.seed
        result = train_vae(decoder, data, settings.vae, seed=seed, **common) if settings.vae.steps else None
        latents = encode_latents(decoder, data)
        factor = calibrate_scaling_factor(decoder, latents, generator=torch.Generator().manual_seed(seed))
        if result is None:
            result = ComponentResult("vae", 0, 0.0, float("nan"), float("nan"))
        result.extra["scaling_factor"] = factor
        done["vae"] = result
        _checkpoint(decoder, output, done, settings)

    if "unet" not in done:
        if latents is None:
            latents = encode_latents(decoder, data)
        done["unet"] = train_unet(decoder, latents, settings.unet, seed=settings.seed + 1, **common)
        _checkpoint(decoder, output, done, settings)

    if settings.finetune is not None and "finetune" not in done:
        tuned = training_set(decoder, pairs, options=settings.finetune.sample_options)
        done["finetune"] = train_unet(decoder, encode_latents(decoder, tuned), settings.finetune.unet,
                                      seed=settings.seed + 2, label="finetune", **common)
        _checkpoint(decoder, output, done, settings)
    return done


def save_decoder(decoder: Decoder, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """``decoder.save_pretrained(directory)``, with the weight files stored as ``dtype``.

    With ``dtype=torch.float16`` the files are half the size. Only the ``*.safetensors`` tensors
    are converted: the components' configs keep the decoder's dtype (float32), so a plain
    ``<Pipeline>.from_pretrained(directory)`` still loads every component in float32 (transformers
    would otherwise load the text encoder in float16 next to a float32 UNet), and
    ``from_pretrained(directory, dtype=torch.float16)`` runs in half precision on a GPU. The
    in-memory decoder is rounded to ``dtype`` and back, so that it generates what the saved
    folder does.
    """
    directory = Path(decoder.save_pretrained(directory))
    if dtype is None or dtype == decoder.dtype:
        return directory
    for path in sorted(directory.glob("*/*.safetensors")):
        cast_weight_file(path, dtype)
    with torch.no_grad():
        for component in decoder.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in component.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.to(dtype))
    return directory


def cast_weight_file(path: str | Path, dtype: torch.dtype) -> None:
    """Rewrite the ``.safetensors`` file ``path`` with its floating tensors stored as ``dtype``
    (integer tensors and the file's metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as reader:
        metadata = reader.metadata()
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    save_file({key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()},
              str(path), metadata=metadata)


def _checkpoint(decoder: Decoder, output: Path | None, done: dict[str, ComponentResult],
                settings: DecoderTraining) -> None:
    if output is None:
        return
    decoder.save_pretrained(output)
    state = {"completed": list(done), "results": {k: asdict(v) for k, v in done.items()},
             "settings": asdict(settings), "decoder": decoder.name}
    temporary = output / (STATE_FILE + ".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    temporary.replace(output / STATE_FILE)
    logger.info("saved the decoder after %s to %s", ", ".join(done), output)


def _read_state(output: Path) -> dict[str, Any]:
    path = output / STATE_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


#: Components trained together with a listed one (restored with it on resume).
_RESTORED_WITH = {"vae": ("vae",), "unet": ("unet", "text_encoder"), "finetune": ("unet", "text_encoder")}


def _load_component(decoder: Decoder, output: Path, name: str) -> None:
    """Copy the saved weights (and the VAE's scaling factor) of ``name`` into the decoder's
    own component, so the decoder object and its architecture are kept."""
    for part in _RESTORED_WITH[name]:
        component = getattr(decoder.pipeline, part)
        saved = type(component).from_pretrained(output / part)
        component.load_state_dict(saved.state_dict())
        factor = getattr(saved.config, "scaling_factor", None)
        if factor is not None and hasattr(component, "register_to_config"):
            component.register_to_config(scaling_factor=factor)
        _frozen(component)
    _forget_negative(decoder)


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}

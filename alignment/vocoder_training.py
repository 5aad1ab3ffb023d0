"""Train an AudioLDM decoder's HiFi-GAN vocoder from scratch: log-mel spectrogram → waveform.

:mod:`anygpt.alignment.decoder_training` trains a decoder's VAE, UNet and text encoder; an
AudioLDM pipeline has one more component, the ``SpeechT5HifiGan`` vocoder that turns the
generated log-mel spectrogram into audio. This module trains it, in place, on pairs of
(clip the mel is computed from, clip the vocoder should output) prepared exactly as
:meth:`AudioLDMDecoder.training_sample <anygpt.decoders.audio.AudioLDMDecoder.training_sample>`
prepares the UNet's training audio, so the vocoder learns to invert the very mels the diffusion
model is trained to generate. The saved pipeline (``decoder.save_pretrained``) is still a plain
``AudioLDMPipeline`` folder.

The loss (no discriminator): a multi-resolution STFT loss (spectral convergence plus L1 of the
log magnitudes at a few FFT sizes, as in Parallel WaveGAN), the L1 distance of the log-mel
spectrograms at the vocoder's own mel parameters (HiFi-GAN's mel loss) and, optionally, the L1
distance of the waveforms (useful only where the targets' phase is predictable from the mel).

A HiFi-GAN is a stack of convolutions and strided transposed convolutions: shifting its input
by one mel frame shifts its output by exactly one hop. So on a *steady* sound, whose mel frames
are all alike, it can only output a signal that repeats every hop, whose spectrum has lines at
multiples of the frame rate ``sampling_rate / hop`` and nowhere else — a 220 Hz tone cannot come
out of a vocoder with a 100 Hz frame rate (hop 160 at 16 kHz). Tones are faithful only at pitches
that are multiples of the frame rate; :func:`world_tone_pairs` therefore pairs each world tone's
mel with the same tone at the nearest such pitch to its nominal one (with a hop of 800 samples at
16 kHz, the frame rate is 20 Hz and the world's 220 / 440 / 880 Hz are exactly on the grid).

Every function is seeded, logs through :mod:`logging` and shows a ``tqdm`` progress bar unless
``progress=False``.

Example::

    from anygpt.config import DecoderConfig
    from anygpt.decoders import load_decoder
    from anygpt.alignment.vocoder_training import VocoderTraining, train_decoder_vocoder, world_tone_pairs

    decoder = load_decoder(DecoderConfig(name="audioldm", arch={
        "num_mel_bins": 32, "upsample_rates": (8, 10, 10), "upsample_kernel_sizes": (16, 20, 20),
        "upsample_initial_channel": 64, "sample_size": 10}))
    train_decoder_vocoder(decoder, world_tone_pairs(decoder, 540, seed=0), VocoderTraining())
    decoder.save_pretrained("out/audio-decoder")
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from anygpt.alignment.decoder_training import ComponentResult
from anygpt.alignment.optim import WarmupDecay, optimizer_step

if TYPE_CHECKING:
    from anygpt.decoders.base import Decoder
    from anygpt.types import Audio

logger = logging.getLogger(__name__)

__all__ = [
    "VocoderTraining",
    "VocoderSet",
    "prepared_waveform",
    "vocoder_set",
    "world_tone_pairs",
    "tone",
    "frame_rate",
    "log_mel",
    "stft_loss",
    "vocoder_loss",
    "fit_normalization",
    "init_vocoder_weights",
    "train_vocoder",
    "train_decoder_vocoder",
]


# Settings and results ---------------------------------------------------------------------------


@dataclass
class VocoderTraining:
    """Settings of :func:`train_vocoder`.

    Attributes:
        steps: optimizer steps.
        batch_size: clips per step.
        lr, betas, weight_decay: AdamW (HiFi-GAN's betas by default).
        warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``lr * min_lr_ratio``.
        stft_resolutions: ``(n_fft, hop)`` of each STFT of the multi-resolution loss (Hann window
            of ``n_fft`` samples). The long windows resolve the side bands a HiFi-GAN puts at
            multiples of the frame rate around a steady tone (its frame-periodic buzz), which
            the short ones and the mel term cannot see.
        stft_weight: weight of the multi-resolution STFT loss (mean over the resolutions).
        mel_weight: weight of the L1 distance of the log-mels at the vocoder's parameters.
        wave_weight: weight of the waveform L1 distance (0: off).
        stft_floor, mel_floor: the magnitudes below which the STFT and mel terms compare
            logarithms as if equal to the floor. Low floors (the 1e-5 of the mel representation)
            make silence a strong local minimum on sparse spectra such as a sine's: any faint
            noise in the thousands of empty bins then costs more than missing the few bins of
            the tone.
        initialize: before training, draw the weights afresh with :func:`init_vocoder_weights`
            (seeded with the training seed); False keeps them (to fine-tune a trained vocoder).
        normalize_input: before training, set the vocoder's input normalisation
            (``config.normalize_before`` with its ``mean`` / ``scale`` buffers) to the per-band
            mean and standard deviation of the training mels.
        grad_clip: max gradient norm (0 disables clipping).
    """

    steps: int = 600
    batch_size: int = 8
    lr: float = 3e-3
    betas: tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    stft_resolutions: tuple[tuple[int, int], ...] = ((512, 128), (1024, 256), (2048, 512), (4096, 1024),
                                                     (8192, 2048))
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    wave_weight: float = 0.0
    stft_floor: float = 1.0
    mel_floor: float = 0.1
    initialize: bool = True
    normalize_input: bool = True
    grad_clip: float = 1.0


# Data -------------------------------------------------------------------------------------------


@dataclass
class VocoderSet:
    """Training pairs of a vocoder: ``mels[i]`` ``(T, n_mels)`` is what it hears, ``waves[i]``
    (``T * hop`` samples) what it should say."""

    mels: torch.Tensor
    waves: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.mels) != len(self.waves) or not len(self.mels):
            raise ValueError(f"a VocoderSet needs as many waves as mels (at least one); got "
                             f"{len(self.mels)} mels and {len(self.waves)} waves")

    def __len__(self) -> int:
        return len(self.mels)


def _vocoder_sizes(decoder: Decoder) -> tuple[int, int, int]:
    """``(sampling rate, hop, mel bands)`` of the decoder's vocoder."""
    config = decoder.pipeline.vocoder.config
    return int(config.sampling_rate), math.prod(config.upsample_rates), int(config.model_in_dim)


def frame_rate(decoder: Decoder) -> float:
    """Mel frames per second of the decoder's vocoder: the spacing of the only frequencies it
    can hold steady (see the module doc)."""
    rate, hop, _ = _vocoder_sizes(decoder)
    return rate / hop


def prepared_waveform(decoder: Decoder, value: Audio) -> torch.Tensor:
    """A clip as the decoder prepares it before its log-mel (``T * hop`` samples): ``log_mel``
    of it is ``decoder.training_sample(value)``."""
    return decoder.training_waveform(value)


def vocoder_set(decoder: Decoder, clips: Iterable[Audio | tuple[Audio, Audio]]) -> VocoderSet:
    """Training pairs for the decoder's vocoder.

    Args:
        decoder: an AudioLDM decoder; its vocoder's config fixes the rate, hop and mel bands.
        clips: clips to reconstruct, or ``(heard, target)`` pairs: the vocoder hears the log-mel
            of ``heard`` (``decoder.training_sample(heard)``) and is taught to output ``target``
            (prepared the same way, :func:`prepared_waveform`).
    """
    rate, hop, mels = _vocoder_sizes(decoder)
    heard, waves = [], []
    for clip in clips:
        source, target = clip if isinstance(clip, tuple) else (clip, clip)
        heard.append(prepared_waveform(decoder, source))
        waves.append(prepared_waveform(decoder, target) if target is not source else heard[-1])
    if not waves:
        raise ValueError("vocoder_set needs at least one clip")
    with torch.no_grad():
        spectrograms = [log_mel(torch.stack(heard[i:i + 64]), rate, hop, mels) for i in range(0, len(heard), 64)]
    return VocoderSet(torch.cat(spectrograms), torch.stack(waves))


def tone(waveform: str, frequency: float, rate: int, seconds: float = 1.0, amplitude: float = 0.4) -> np.ndarray:
    """A tone drawn as the world draws its sounds (:func:`anygpt.alignment.world.render_sound`),
    at any ``frequency``: ``sine``, ``square`` (the sign of the sine) or ``sawtooth``, phase 0
    at sample 0."""
    phase = frequency * np.arange(round(seconds * rate)) / rate
    if waveform == "sine":
        wave = np.sin(2 * np.pi * phase)
    elif waveform == "square":
        wave = np.sign(np.sin(2 * np.pi * phase))
    elif waveform == "sawtooth":
        wave = 2.0 * (phase - np.floor(phase + 0.5))
    else:
        raise ValueError(f"waveform must be sine, square or sawtooth, got {waveform!r}")
    return (amplitude * wave).astype(np.float32)


def world_tone_pairs(decoder: Decoder, count: int, seed: int = 0) -> list[tuple[Audio, Audio]]:
    """``count`` ``(heard, target)`` pairs of the procedural world's sounds for :func:`vocoder_set`.

    ``heard`` is a random world tone as :func:`~anygpt.alignment.world.render_sound` draws it
    (random pitch, waveform and detuning); ``target`` is the same waveform at the multiple of the
    vocoder's :func:`frame_rate` nearest the tone's *nominal* pitch — the pitch a HiFi-GAN can
    hold steady (module doc). The items cycle through every (pitch, waveform) in turn, so every
    class is equally represented.
    """
    from anygpt.alignment.world import PITCHES, all_items, render_sound
    from anygpt.types import Audio

    rng = np.random.default_rng(seed)
    items = all_items("audio")
    step = frame_rate(decoder)
    pairs = []
    for i in range(count):
        item = items[i % len(items)]
        heard = render_sound(item, rng)
        nominal = PITCHES[item.pitch]
        target = tone(item.waveform, max(1, round(nominal / step)) * step, heard.sample_rate,
                      seconds=heard.duration)
        pairs.append((heard, Audio(target, heard.sample_rate)))
    return pairs


# Losses -----------------------------------------------------------------------------------------


def log_mel(waves: torch.Tensor, rate: int, hop: int, mels: int) -> torch.Tensor:
    """Batched, differentiable :func:`anygpt.decoders.audio.log_mel_spectrogram`:
    ``(B, T * hop)`` waveforms → ``(B, T, mels)`` log-mels, equal to it item by item."""
    from anygpt.decoders.audio import MEL_FLOOR

    n_fft = 1 << (4 * hop - 1).bit_length()
    left = (n_fft - hop) // 2
    padded = F.pad(waves[:, None], (left, n_fft - hop - left), mode="reflect")[:, 0]
    window = torch.hann_window(n_fft, dtype=waves.dtype, device=waves.device)
    magnitude = _magnitude(torch.stft(padded, n_fft, hop_length=hop, window=window, center=False,
                                      return_complex=True))  # (B, n_fft // 2 + 1, T)
    bank = _mel_bank(n_fft, rate, mels).to(waves.device, waves.dtype)
    return torch.log((magnitude.transpose(1, 2) @ bank).clamp(min=MEL_FLOOR))


@functools.lru_cache(maxsize=8)
def _mel_bank(n_fft: int, rate: int, mels: int) -> torch.Tensor:
    """The Slaney mel filter bank ``(n_fft // 2 + 1, mels)`` of :func:`log_mel_spectrogram`."""
    import torchaudio

    return torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, rate / 2, mels, rate, norm="slaney",
                                                 mel_scale="slaney")


def _magnitude(spectrum: torch.Tensor) -> torch.Tensor:
    # |z| with a finite gradient at 0 (torch's abs of a complex 0 has none).
    return (spectrum.real.square() + spectrum.imag.square()).clamp(min=1e-12).sqrt()


def stft_loss(pred: torch.Tensor, target: torch.Tensor, resolutions: Sequence[tuple[int, int]],
              floor: float = 1e-5) -> torch.Tensor:
    """Multi-resolution STFT loss of ``(B, L)`` waveforms: per ``(n_fft, hop)``, the spectral
    convergence ``‖|S| - |Ŝ|‖ / ‖|S|‖`` plus the mean L1 of the log magnitudes (clamped at
    ``floor``); averaged over the resolutions."""
    total = pred.new_zeros(())
    for n_fft, hop in resolutions:
        window = torch.hann_window(n_fft, dtype=pred.dtype, device=pred.device)
        spec = [_magnitude(torch.stft(x, n_fft, hop_length=hop, window=window, return_complex=True))
                for x in (pred, target)]
        convergence = (spec[1] - spec[0]).norm(dim=(1, 2)) / spec[1].norm(dim=(1, 2)).clamp(min=1e-7)
        log_l1 = (torch.log(spec[0].clamp(min=floor)) - torch.log(spec[1].clamp(min=floor))).abs().mean()
        total = total + convergence.mean() + log_l1
    return total / max(1, len(resolutions))


def vocoder_loss(pred: torch.Tensor, target: torch.Tensor, sizes: tuple[int, int, int],
                 settings: VocoderTraining) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted training loss of :class:`VocoderTraining` and its terms (unweighted).

    Args:
        pred, target: ``(B, L)`` waveforms.
        sizes: the vocoder's ``(sampling rate, hop, mel bands)`` for the mel term.
    """
    parts: dict[str, torch.Tensor] = {}
    if settings.stft_weight:
        parts["stft"] = stft_loss(pred, target, settings.stft_resolutions, settings.stft_floor)
    if settings.mel_weight:
        floor = math.log(settings.mel_floor)
        parts["mel"] = (log_mel(pred, *sizes).clamp(min=floor) - log_mel(target, *sizes).clamp(min=floor)).abs().mean()
    if settings.wave_weight:
        parts["wave"] = (pred - target).abs().mean()
    weights = {"stft": settings.stft_weight, "mel": settings.mel_weight, "wave": settings.wave_weight}
    if not parts:
        raise ValueError("VocoderTraining: every loss weight is 0")
    total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}


# Training ---------------------------------------------------------------------------------------


@torch.no_grad()
def fit_normalization(vocoder: Any, mels: torch.Tensor) -> None:
    """Normalise the vocoder's input with the per-band mean and standard deviation of ``mels``
    ``(N, T, bands)``: sets ``config.normalize_before`` and the ``mean`` / ``scale`` buffers,
    which ``save_pretrained`` writes with the weights."""
    flat = mels.reshape(-1, mels.shape[-1]).float()
    vocoder.mean.copy_(flat.mean(0))
    vocoder.scale.copy_(flat.std(0).clamp(min=1e-2))
    vocoder.config.normalize_before = True


@torch.no_grad()
def init_vocoder_weights(vocoder: Any, seed: int = 0) -> None:
    """Variance-preserving random weights for a ``SpeechT5HifiGan`` (in place).

    Its own initialisation, ``normal(0, initializer_range = 0.01)`` on every convolution,
    shrinks the signal at each layer: a freshly built vocoder outputs ~1e-6 and learns very
    slowly. Here each convolution gets He-normal weights for its leaky ReLU (fan-in: input
    channels × kernel, divided by the stride for the transposed ones) and zero biases; the second
    convolution of each residual unit is scaled by 0.3 and the output convolution by 0.3, so the
    residual stream keeps its scale and the first output is a quiet noise of std ≈ 0.2.
    """
    slope = float(getattr(vocoder.config, "leaky_relu_slope", 0.1))
    gain = math.sqrt(2.0 / (1.0 + slope ** 2))
    generator = torch.Generator().manual_seed(seed)
    for name, module in vocoder.named_modules():
        if isinstance(module, torch.nn.ConvTranspose1d):
            fan_in = module.in_channels * module.kernel_size[0] / module.stride[0]
        elif isinstance(module, torch.nn.Conv1d):
            fan_in = module.in_channels * module.kernel_size[0]
        else:
            continue
        std = gain / math.sqrt(fan_in)
        if ".convs2." in name or name == "conv_post":
            std *= 0.3
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
        if module.bias is not None:
            module.bias.zero_()


def train_vocoder(vocoder: Any, data: VocoderSet, settings: VocoderTraining | None = None, *, seed: int = 0,
                  progress: bool = True, log_every: int = 100,
                  callback: Callable[[int], None] | None = None, callback_every: int = 0) -> ComponentResult:
    """Train a ``SpeechT5HifiGan`` on ``data`` in place; it is left frozen and in eval mode.

    Args:
        vocoder: the vocoder (its ``config`` gives the rate, hop and mel bands of the mel loss).
        data: the training pairs (:func:`vocoder_set`).
        settings: default :class:`VocoderTraining`.
        seed: seeds the batch order and :attr:`VocoderTraining.initialize`'s weights.
        progress: show a tqdm progress bar.
        log_every: log the running loss every this many steps (0: only at the end).
        callback, callback_every: call ``callback(step)`` every ``callback_every`` steps, with
            the vocoder in eval mode and gradients off (e.g. to measure it as it trains).
    """
    from tqdm.auto import tqdm

    settings = settings or VocoderTraining()
    config = vocoder.config
    sizes = (int(config.sampling_rate), math.prod(config.upsample_rates), int(config.model_in_dim))
    if data.mels.shape[-1] != sizes[2] or data.waves.shape[-1] != data.mels.shape[1] * sizes[1]:
        raise ValueError(f"data has mels {tuple(data.mels.shape[1:])} and waves of {data.waves.shape[-1]} samples; "
                         f"the vocoder takes {sizes[2]} mel bands at {sizes[1]} samples a frame")
    if settings.initialize:
        init_vocoder_weights(vocoder, seed)
    if settings.normalize_input:
        fit_normalization(vocoder, data.mels)
    device = vocoder.device
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in vocoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas),
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay("cosine", settings.warmup_steps, settings.steps, settings.min_lr_ratio))
    batch_size = min(settings.batch_size, len(data))
    losses: list[float] = []
    parts: list[dict[str, float]] = []
    start = time.perf_counter()
    vocoder.requires_grad_(True).train()
    order, position = torch.randperm(len(data), generator=generator), 0
    try:
        with tqdm(total=settings.steps, desc="vocoder", disable=not progress, dynamic_ncols=True,
                  leave=False) as bar:
            for step in range(1, settings.steps + 1):
                if position + batch_size > len(data):
                    order, position = torch.randperm(len(data), generator=generator), 0
                index = order[position:position + batch_size]
                position += batch_size
                mels = data.mels[index].to(device, torch.float32)
                target = data.waves[index].to(device, torch.float32)
                loss, terms = vocoder_loss(vocoder(mels), target, sizes, settings)
                optimizer_step(loss, optimizer, schedule, params, settings.grad_clip)
                losses.append(loss.item())
                parts.append(terms)
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
                if log_every and step % log_every == 0:
                    logger.info("vocoder step %d/%d: loss %.4f (%.2f steps/s)", step, settings.steps,
                                np.mean(losses[-log_every:]), step / (time.perf_counter() - start))
                if callback is not None and callback_every and step % callback_every == 0:
                    vocoder.eval()
                    with torch.no_grad():
                        callback(step)
                    vocoder.train()
    finally:
        vocoder.requires_grad_(False).eval()
    seconds = time.perf_counter() - start
    tenth = max(1, len(losses) // 10)
    last = {name: float(np.mean([p[name] for p in parts[-tenth:]])) for name in (parts[0] if parts else {})}
    result = ComponentResult("vocoder", len(losses), seconds,
                             float(np.mean(losses[:tenth])) if losses else float("nan"),
                             float(np.mean(losses[-tenth:])) if losses else float("nan"), extra=last)
    logger.info("vocoder: %d steps in %.1f s (%.2f steps/s), loss %.4f -> %.4f", result.steps, seconds,
                result.steps_per_s, result.first_loss, result.last_loss)
    return result


def train_decoder_vocoder(decoder: Decoder, clips: VocoderSet | Iterable[Audio | tuple[Audio, Audio]],
                          settings: VocoderTraining | None = None, *, seed: int = 0, progress: bool = True,
                          log_every: int = 100) -> ComponentResult:
    """Train ``decoder.pipeline.vocoder`` on ``clips`` (a :class:`VocoderSet`, or what
    :func:`vocoder_set` takes); the arguments are :func:`train_vocoder`'s."""
    data = clips if isinstance(clips, VocoderSet) else vocoder_set(decoder, clips)
    return train_vocoder(decoder.pipeline.vocoder, data, settings, seed=seed, progress=progress,
                         log_every=log_every)

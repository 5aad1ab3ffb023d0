"""Pretrain an AudioLDM decoder's CLAP text encoder contrastively against the audio, as CLAP was.

AudioLDM conditions its UNet on one vector per caption: CLAP's projected, L2-normalised
embedding of the ``<s>`` token. A randomly initialised CLAP text encoder gives every caption
almost the same vector (cosine similarity ≈ 0.9999 for the tiny one: with small random weights
the first token barely attends to the others), so a UNet trained on it — even jointly with it,
through the denoising loss — learns to ignore its conditioning. (Decoders conditioned on a
CLIP encoder's per-token hidden states through cross-attention do not have this problem: their
tokens differ from the start.)

:func:`train_text_encoder` gives the text encoder CLAP's own objective before the UNet is
trained: a symmetric InfoNCE loss between the caption embeddings and embeddings of the
captions' audio, computed by a small throw-away audio tower (an MLP over each log-mel band's mean
and standard deviation over time). Captions of alike sounds end up close, others apart, and the
embeddings of different phrasings of one sound are pulled to the same audio. Only the text
encoder is kept; the audio tower is discarded. Seeded, logged through :mod:`logging`, with a
``tqdm`` progress bar unless ``progress=False``.

Example::

    from anygpt.alignment.decoder_training import training_set
    from anygpt.alignment.clap_training import train_text_encoder

    data = training_set(decoder, [(audio, "a low sine tone"), ...])
    train_text_encoder(decoder, data)
    # then train the UNet with the (now frozen) text encoder: decoder_training.train_unet
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from anygpt.decoders.base import Decoder

logger = logging.getLogger(__name__)

__all__ = ["TextEncoderTraining", "TextEncoderResult", "train_text_encoder", "caption_similarity"]


@dataclass
class TextEncoderTraining:
    """Settings of :func:`train_text_encoder`.

    Attributes:
        steps: optimizer steps.
        batch_size: (audio, caption) pairs per step.
        lr, weight_decay: AdamW, for the text encoder and the audio tower.
        temperature: the InfoNCE temperature (CLIP's initial 0.07).
        audio_hidden: width of the throw-away audio tower.
        grad_clip: max gradient norm (0 disables clipping).
    """

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    temperature: float = 0.07
    audio_hidden: int = 128
    grad_clip: float = 1.0


@dataclass
class TextEncoderResult:
    """Steps, wall time, the mean loss of the first and last tenth of the steps, and the
    largest cosine similarity between the embeddings of two different captions of the data
    before and after."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    max_similarity_before: float
    max_similarity_after: float


class _AudioTower(torch.nn.Module):
    """Log-mel ``(B, 1, T, bands)`` → per band mean and std over time → MLP → unit vector."""

    def __init__(self, bands: int, hidden: int, dim: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(2 * bands), torch.nn.Linear(2 * bands, hidden),
                                       torch.nn.GELU(), torch.nn.Linear(hidden, dim))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        mels = mels.flatten(1, 2) if mels.dim() == 4 else mels  # (B, C·T, bands)
        features = torch.cat([mels.mean(1), mels.std(1)], dim=-1)
        return F.normalize(self.net(features), dim=-1)


def _embed(decoder: Decoder, captions: list[str]) -> torch.Tensor:
    # The pipeline's own prompt encoding (CLAP text_embeds, L2-normalised), with autograd on.
    return decoder._encode_prompt(list(captions)).reshape(len(captions), -1)


@torch.no_grad()
def caption_similarity(decoder: Decoder, captions: list[str]) -> torch.Tensor:
    """Cosine similarities ``(n, n)`` of the decoder's conditionings of ``captions``."""
    embeds = decoder.encode_text(list(captions)).reshape(len(captions), -1).float()
    embeds = F.normalize(embeds, dim=-1)
    return embeds @ embeds.T


def _max_off_diagonal(similarity: torch.Tensor) -> float:
    n = len(similarity)
    return float(similarity.masked_fill(torch.eye(n, dtype=torch.bool), -2.0).max()) if n > 1 else float("nan")


def train_text_encoder(decoder: Decoder, data: Any, settings: TextEncoderTraining | None = None, *,
                       labels: Sequence[Any] | None = None, seed: int = 0, progress: bool = True,
                       log_every: int = 100) -> TextEncoderResult:
    """Train ``decoder.pipeline.text_encoder`` contrastively against ``data``'s audio (in place).

    Args:
        decoder: an AudioLDM decoder.
        data: a :class:`~anygpt.alignment.decoder_training.TrainingSet` (``samples``: the
            decoder's log-mel training samples ``(N, 1, T, bands)``; ``captions``).
        settings: default :class:`TextEncoderTraining`.
        labels: one per pair; in-batch pairs with equal labels count as matches (e.g. the item
            a caption describes, so that two phrasings of one sound are not pushed apart).
            Default: the captions themselves.
        seed: seeds the audio tower's weights and the batches.
        progress: show a tqdm progress bar.
        log_every: log the running loss every this many steps (0: only at the end).

    The InfoNCE target of a pair spreads over the in-batch pairs with its label. The text encoder is left frozen and in eval mode; the decoder's cached empty-caption embedding
    is dropped.
    """
    from tqdm.auto import tqdm

    settings = settings or TextEncoderTraining()
    text_encoder = decoder.pipeline.text_encoder
    labels = list(data.captions) if labels is None else list(labels)
    if len(labels) != len(data.captions):
        raise ValueError(f"{len(labels)} labels for {len(data.captions)} (audio, caption) pairs")
    unique = sorted(set(data.captions))
    before = _max_off_diagonal(caption_similarity(decoder, unique))
    generator = torch.Generator().manual_seed(seed)
    dim = int(decoder.condition_shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = _AudioTower(int(data.samples.shape[-1]), settings.audio_hidden, dim).to(decoder.device)
    params = list(text_encoder.parameters()) + list(tower.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    batch_size = min(settings.batch_size, len(data.captions))
    losses: list[float] = []
    start = time.perf_counter()
    text_encoder.requires_grad_(True).train()
    try:
        with tqdm(total=settings.steps, desc="text encoder", disable=not progress, dynamic_ncols=True,
                  leave=False) as bar:
            for step in range(1, settings.steps + 1):
                index = torch.randperm(len(data.captions), generator=generator)[:batch_size]
                captions = [data.captions[i] for i in index.tolist()]
                audio = tower(data.samples[index].to(decoder.device, torch.float32))
                text = _embed(decoder, captions).float()
                logits = text @ audio.T / settings.temperature
                batch_labels = [labels[i] for i in index.tolist()]
                same = torch.tensor([[a == b for b in batch_labels] for a in batch_labels], dtype=torch.float32,
                                    device=logits.device)
                target = same / same.sum(1, keepdim=True)
                loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                              + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
                if log_every and step % log_every == 0:
                    window = losses[-log_every:]
                    logger.info("text encoder step %d/%d: loss %.4f", step, settings.steps, sum(window) / len(window))
    finally:
        text_encoder.requires_grad_(False).eval()
        if getattr(decoder, "_negative", None) is not None:
            decoder._negative = None  # Decoder.negative_condition caches encode_text([""])
    after = _max_off_diagonal(caption_similarity(decoder, unique))
    tenth = max(1, len(losses) // 10)
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    result = TextEncoderResult(len(losses), time.perf_counter() - start, mean(losses[:tenth]),
                               mean(losses[-tenth:]), before, after)
    logger.info("text encoder: %d steps in %.1f s, loss %.4f -> %.4f, max caption similarity %.4f -> %.4f",
                result.steps, result.seconds, result.first_loss, result.last_loss, before, after)
    return result

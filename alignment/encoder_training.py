"""Train a small ImageBind encoder contrastively on (media, caption) pairs, as ImageBind was.

The ``mini`` preset's encoder is ImageBind's architecture (``ImageBindModel`` at small widths,
built by :class:`~anygpt.encoders.ImageBindEncoder` from ``EncoderConfig.arch``). Random, its
embeddings do not tell a red circle from a blue square; this module trains it so that they do.
The objective is ImageBind's: an InfoNCE loss that binds each medium's embedding to the
embedding of its caption by ImageBind's own text trunk (CLIP BPE ids of shape (B, 77), pooled at
the end-of-text token), with a learnable temperature. Images and clips share the vision trunk;
sounds use the audio trunk; all of them are bound to the one text space.

Pieces:

* :func:`tokenize`: captions → (N, 77) CLIP BPE ids, with ImageBind's ``SimpleTokenizer``.
* :class:`MediaSet` / :func:`media_set` / :func:`world_media_set`: media preprocessed once at
  the encoder's geometry (``ModalitySpec.preprocess`` with
  :meth:`~anygpt.encoders.ImageBindEncoder.preprocess_options`) and kept as one tensor, with the
  world item each one shows. Preprocessing (224 x 224 resizes, log-mels) costs far more than a
  training step of a small encoder, so it is done once and reused every epoch. A medium whose
  clips are all identical (a 1 s sound cut into 2 s clips, a 1 s video) keeps one clip: the
  encoder averages its clips' unit embeddings, so one clip gives the same embedding.
* :func:`contrastive_loss`: the symmetric InfoNCE of CLIP / ImageBind, extended to batches in
  which several media share a caption (the world has only 9 sounds): every caption of the same
  item counts as a positive (the probability of the positives is summed), which is exactly
  CLIP's loss when every item in the batch is distinct.
* :func:`train_encoder`: trains a *copy* of an encoder's inner ``ImageBindModel`` (the vision,
  audio and text preprocessors, trunks and heads that the media use, and the logit scale) and
  returns it wrapped in a new, frozen :class:`~anygpt.encoders.ImageBindEncoder`. The encoder it
  is given is left untouched, so the frozen-at-inference contract of the wrapper holds
  throughout. The temperature is ImageBind's own: the ``LearnableLogitScaling`` of the text
  postprocessor (initial scale 1/0.07, clipped at 100), so the learnt value is saved with the
  weights. The text trunk is trained too by default, or kept at its random initialisation
  (``EncoderTraining.train_text=False``).
* :func:`retrieval_accuracy`: each medium → the nearest of a set of captions (default: every
  caption of the world for that modality), with accuracy overall and per attribute.
* :func:`train_world_encoder`: all of it for the procedural world (render, preprocess, train,
  save with :meth:`~anygpt.encoders.ImageBindEncoder.save_weights`), so that
  ``ImageBindEncoder.from_config(EncoderConfig(pretrained=path, arch=arch))`` reloads it.

Everything is seeded (rendering by a numpy generator, initialisation by ``EncoderConfig.seed``,
batches and caption phrasings by a ``torch.Generator``), logs through :mod:`logging` and shows
a ``tqdm`` progress bar unless ``progress=False``.

Example::

    from anygpt.alignment.encoder_training import EncoderTraining, train_world_encoder

    result = train_world_encoder(MINI_ARCH, EncoderTraining(steps=300), output="encoder.safetensors")
    result.encoder               # a frozen ImageBindEncoder
    # EncoderConfig(pretrained="encoder.safetensors", arch=MINI_ARCH) loads the same weights.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from anygpt.alignment.optim import WarmupDecay, optimizer_step

if TYPE_CHECKING:
    from anygpt.encoders import ImageBindEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "EncoderTraining",
    "MediaSet",
    "TrainingResult",
    "Retrieval",
    "tokenize",
    "media_set",
    "world_media_set",
    "world_media_sets",
    "embed",
    "embed_text_prefix",
    "contrastive_loss",
    "train_encoder",
    "caption_embeddings",
    "retrieval_accuracy",
    "train_world_encoder",
]

#: ImageBind's text context: 77 CLIP BPE ids (start, text, end, zero padding).
CONTEXT_LENGTH = 77
#: The modalities a world encoder is trained on, and their ImageBind inputs.
WORLD_MODALITIES = ("image", "audio", "video")


# --------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------
@dataclass
class EncoderTraining:
    """Settings of :func:`train_encoder` (and of the data :func:`train_world_encoder` renders).

    Attributes:
        steps: optimizer steps. One step takes ``batch_size`` media of *every* modality.
        batch_size: media per modality per step (in-batch negatives of InfoNCE).
        lr: peak AdamW learning rate, reached after ``warmup_steps`` and decayed along a cosine
            to ``min_lr_ratio * lr``.
        weight_decay: AdamW decay of matrices (not of biases, norms, positional embeddings,
            class tokens or the logit scale, as CLIP).
        betas: AdamW betas (CLIP's 0.98 second moment for small batches).
        warmup_steps: linear warm-up.
        min_lr_ratio: the final learning rate as a fraction of ``lr``.
        max_grad_norm: gradient clipping (0: none).
        train_text: train ImageBind's text trunk, its token embedding and its head; False keeps
            the text side at its random initialisation (then the caption embeddings are fixed
            targets, computed once).
        text_lr: peak learning rate of the text side (None: ``lr``). Trained from scratch at
            the media side's rate, the text side can merge captions that differ only in an
            attribute the media side does not see yet (a clip's direction), which removes the
            very signal that would teach it; a lower rate keeps them apart meanwhile.
        text_frozen_steps: keep the text side at its initialisation for this many first steps
            (the media side first learns to reach the random caption embeddings).
        logit_scale: initial temperature scale of the logits; None keeps the model's own
            (ImageBind's text postprocessor starts at 1/0.07). It is learnt either way.
        caption_templates: the caption phrasings training draws from, one per medium and step:
            ``"canonical"`` (the world's ``item.caption()``) or ``"train"`` (the canonical one and
            the world's other train phrasings, :data:`anygpt.alignment.world.CAPTIONS`).
        caption_bank: add the canonical caption of every item of the modality to each batch's
            captions as extra negatives (the world has at most 72 captions a modality), so that
            a medium is contrasted with every caption, not only those its batch holds.
        items_per_caption: world renders of each caption per modality (training set sizes:
            54, 9 and 72 captions times these), for :func:`train_world_encoder`.
        render_seed: seed of the training renders (positions, sizes, detuning).
        storage_dtype: dtype the preprocessed training media are kept in (``"float16"`` halves
            the memory: about 1 GB for the default sets; batches are cast to the encoder's).
        seed: seed of the batch order and the caption phrasings.
        log_every: log the running loss every this many steps (0: only at the end).
        progress: show a tqdm progress bar.
    """

    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    max_grad_norm: float = 1.0
    train_text: bool = True
    text_lr: float | None = None
    text_frozen_steps: int = 0
    logit_scale: float | None = None
    caption_templates: str = "canonical"
    caption_bank: bool = False
    items_per_caption: dict[str, int] = field(
        default_factory=lambda: {"image": 8, "audio": 24, "video": 6})
    render_seed: int = 0
    storage_dtype: str = "float16"
    seed: int = 0
    log_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        if self.caption_templates not in ("canonical", "train"):
            raise ValueError("caption_templates must be 'canonical' or 'train', "
                             f"got {self.caption_templates!r}")
        if not isinstance(getattr(torch, self.storage_dtype, None), torch.dtype):
            raise ValueError(f"storage_dtype must name a torch dtype (float16, float32), got {self.storage_dtype!r}")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")


@dataclass
class TrainingResult:
    """What :func:`train_encoder` did.

    Attributes:
        encoder: the trained encoder, frozen (a new :class:`~anygpt.encoders.ImageBindEncoder`).
        losses: the loss of every step (mean over the modalities).
        modality_losses: per modality, the loss of every step.
        seconds: wall-clock training time (data preparation excluded).
        logit_scale: the learnt temperature scale at the end.
        path: where the weights were saved, if they were.
        data_seconds: time spent rendering and preprocessing (:func:`train_world_encoder`).
    """

    encoder: ImageBindEncoder
    losses: list[float]
    modality_losses: dict[str, list[float]]
    seconds: float
    logit_scale: float
    path: Path | None = None
    data_seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def mean_loss(self, start: float, end: float) -> float:
        """Mean loss of the steps in the fraction [start, end) of training (e.g. 0.9, 1.0)."""
        n = len(self.losses)
        window = self.losses[int(start * n): max(int(start * n) + 1, int(end * n))]
        return sum(window) / len(window)


@dataclass
class Retrieval:
    """Media → caption retrieval: how often the nearest caption is the medium's own.

    Attributes:
        modality: the modality judged.
        accuracy: fraction of media whose nearest caption is their own.
        attributes: per attribute (e.g. ``colour``), how often the nearest caption names the
            medium's value of it.
        num_media: media judged.
        num_captions: the candidate captions.
        margin: mean over media of (similarity to the own caption) - (best other caption).
    """

    modality: str
    accuracy: float
    attributes: dict[str, float]
    num_media: int
    num_captions: int
    margin: float


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _simple_tokenizer() -> Any:
    from anygpt.encoders import import_imagebind_model

    import_imagebind_model()  # registers the bare ``imagebind`` package
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    spec = importlib.util.find_spec("imagebind")
    folder = list(spec.submodule_search_locations)[0]  # type: ignore[union-attr]
    return SimpleTokenizer(os.path.join(folder, "bpe", "bpe_simple_vocab_16e6.txt.gz"),
                           context_length=CONTEXT_LENGTH)


@functools.lru_cache(maxsize=4096)
def _token_row(caption: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _simple_tokenizer()([caption]).reshape(-1).tolist())


def tokenize(captions: Sequence[str]) -> Tensor:
    """Captions → (N, 77) int64 CLIP BPE ids as ImageBind tokenises text: start token, text,
    end token (the highest id, where ImageBind's text head pools), zero padding."""
    if isinstance(captions, str):
        raise TypeError("tokenize takes a sequence of captions, not one string")
    return torch.tensor([_token_row(str(c)) for c in captions], dtype=torch.long).view(-1, CONTEXT_LENGTH)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass
class MediaSet:
    """Media of one modality, preprocessed for an encoder, with the item each one shows.

    Attributes:
        modality: the AnyGPT modality (``image``, ``audio``, ``video``).
        encoder_input: its ImageBind input (``vision``, ``audio``).
        inputs: (N, ...) encoder inputs, exactly what ``ImageBindEncoder.encode`` takes
            (possibly with fewer identical clips, see :func:`media_set`), stored as
            ``inputs.dtype`` and cast to the encoder's dtype per batch.
        items: the item (anything hashable with a ``caption()``; world items also have
            ``attributes()``) of each medium.
    """

    modality: str
    encoder_input: str
    inputs: Tensor
    items: list[Any]

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.items):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.items)} items")
        if not self.items:
            raise ValueError(f"a MediaSet needs at least one {self.modality} medium")

    def __len__(self) -> int:
        return len(self.items)


def _compact(inputs: Tensor, encoder_input: str) -> Tensor:
    """The clips of one preprocessed medium, one only if they are all identical."""
    multi_clip = (encoder_input == "audio" and inputs.ndim == 4) or (encoder_input == "vision" and inputs.ndim == 5)
    if multi_clip and inputs.shape[0] > 1 and bool((inputs == inputs[:1]).all()):
        return inputs[:1]
    return inputs


def media_set(encoder: ImageBindEncoder, modality: str, values: Iterable[Any], items: Sequence[Any], *,
              compact_clips: bool = True, dtype: torch.dtype = torch.float32,
              progress: bool = False) -> MediaSet:
    """Preprocess media values once at the encoder's geometry.

    Args:
        encoder: gives the geometry (:meth:`~anygpt.encoders.ImageBindEncoder.preprocess_options`).
        modality: a registered modality name.
        values: loaded values or paths (images: PIL images or paths; numpy arrays are taken as
            RGB pixels), one per item.
        items: what each medium shows (its ``caption()`` is the positive text).
        compact_clips: keep one clip of a medium whose clips are all identical. The embedding
            is unchanged (the encoder averages its clips' unit-length embeddings) and the
            memory and compute of training drop by the number of clips (5 for video, 3 for
            audio of 1 s media). When the clip counts then differ between media, every medium
            keeps all its clips.
        dtype: storage dtype (float16 halves the memory).
        progress: show a tqdm bar.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from anygpt.modalities import get_modality

    spec = get_modality(modality)
    geometry = encoder.preprocess_options(spec.encoder_input)
    full, rows = [], []
    for value in tqdm(values, desc=f"preprocess {modality}", disable=not progress, leave=False,
                      total=len(items)):
        if isinstance(value, np.ndarray) and modality == "image":
            from PIL import Image

            value = Image.fromarray(value)
        tensor = spec.preprocess(value, **geometry)
        full.append(tensor.shape[0])
        rows.append((_compact(tensor, spec.encoder_input) if compact_clips else tensor).to(dtype))
    if len({tuple(r.shape) for r in rows}) > 1 and compact_clips:
        # Some media had distinct clips: keep every clip of every medium (re-expand).
        rows = [r.expand(n, *r.shape[1:]) if r.shape[0] == 1 and n > 1 else r for r, n in zip(rows, full)]
    if len(rows) != len(items):
        raise ValueError(f"{len(rows)} {modality} values but {len(items)} items")
    return MediaSet(modality, spec.encoder_input, torch.stack(rows) if rows else torch.empty(0), list(items))


def world_media_set(encoder: ImageBindEncoder, modality: str, items_per_caption: int, seed: int, *,
                    items: Sequence[Any] | None = None, compact_clips: bool = True,
                    dtype: torch.dtype = torch.float32, progress: bool = False) -> MediaSet:
    """Render ``items_per_caption`` media of every world item of ``modality`` and preprocess them.

    The renders are balanced (each item the same number of times, in rounds over
    ``all_items(modality)``) and drawn from ``numpy.random.default_rng(seed)``: their positions,
    sizes and detuning. A seed that training did not use gives held-out media.

    Args:
        items: the items to render (default: every item of the world for ``modality``).
    """
    import numpy as np

    from anygpt.alignment.world import all_items, render_item

    rng = np.random.default_rng(seed)
    chosen = list(items) if items is not None else all_items(modality)
    order = [item for _ in range(items_per_caption) for item in chosen]
    values = (render_item(item, rng) for item in order)
    return media_set(encoder, modality, values, order, compact_clips=compact_clips, dtype=dtype,
                     progress=progress)


def world_media_sets(encoder: ImageBindEncoder, items_per_caption: Mapping[str, int], seed: int, *,
                     compact_clips: bool = True, dtype: torch.dtype = torch.float32,
                     progress: bool = False) -> dict[str, MediaSet]:
    """:func:`world_media_set` for each modality of ``items_per_caption`` (one seed each,
    derived from ``seed``, so that adding a modality does not change another's renders)."""
    sets = {}
    for offset, modality in enumerate(WORLD_MODALITIES):
        if items_per_caption.get(modality, 0) > 0:
            sets[modality] = world_media_set(encoder, modality, items_per_caption[modality],
                                             seed * 1000 + offset, compact_clips=compact_clips,
                                             dtype=dtype, progress=progress)
    return sets


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------
def embed(model: nn.Module, encoder_input: str, batch: Tensor) -> Tensor:
    """The embedding ``ImageBindEncoder.encode`` computes, differentiably, on a raw
    ``ImageBindModel``: preprocessor → trunk → head → L2 normalisation per clip, clips averaged.

    ``batch`` is what ``encode`` takes: images (B, 3, 224, 224), videos (B, clips, 3, T, 224,
    224), audio (B, clips, 1, mel, frames) or (B, 1, mel, frames), text (B, 77).
    """
    multi_clip = ((encoder_input == "vision" and batch.ndim == 6)
                  or (encoder_input == "audio" and batch.ndim == 5))
    if multi_clip:
        items, clips = batch.shape[:2]
        batch = batch.flatten(0, 1)
    tokens = model.modality_preprocessors[encoder_input](**{encoder_input: batch})
    hidden = model.modality_trunks[encoder_input](**tokens["trunk"])
    pooled = model.modality_heads[encoder_input](hidden, **tokens["head"])
    embeddings = F.normalize(pooled, dim=-1, p=2)
    if multi_clip:
        embeddings = embeddings.view(items, clips, -1).mean(dim=1)
    return embeddings


def embed_text_prefix(model: nn.Module, tokens: Tensor) -> Tensor:
    """``embed(model, "text", tokens)`` computed on the first ``L`` positions only, where ``L``
    is one past the last end-of-text token of the batch (12 rather than 77 for the world's
    captions, a sixth of the text trunk's cost).

    ImageBind's text trunk is causal (no position attends to a later one) and its head reads
    the end-of-text position, so the positions after it never reach the embedding: the result
    is the full computation's up to float rounding (summation order). Used for training; the
    frozen encoder's :meth:`~anygpt.encoders.ImageBindEncoder.encode` is unchanged. Falls back to
    :func:`embed` for a text preprocessor that is not causal or has class tokens.
    """
    pre = model.modality_preprocessors["text"]
    if not getattr(pre, "causal_masking", False) or getattr(pre, "num_cls_tokens", 0):
        return embed(model, "text", tokens)
    ends = tokens.argmax(dim=-1)
    length = int(ends.max()) + 1
    hidden = model.modality_trunks["text"](
        tokens=pre.token_embedding(tokens[:, :length]) + pre.pos_embed[:, :length],
        attn_mask=pre.mask[:length, :length])
    return F.normalize(model.modality_heads["text"](hidden, seq_len=ends), dim=-1, p=2)


def _logit_scaling(model: nn.Module) -> nn.Module:
    """ImageBind's learnable temperature: the ``LearnableLogitScaling`` of the text postprocessor."""
    for module in model.modality_postprocessors["text"].modules():
        if hasattr(module, "log_logit_scale") and hasattr(module, "max_logit_scale"):
            return module
    raise ValueError("the model's text postprocessor has no LearnableLogitScaling")


def _scale(scaling: nn.Module) -> Tensor:
    """The inverse temperature, as ``LearnableLogitScaling.forward`` computes it (clipped at its max)."""
    return torch.clip(scaling.log_logit_scale.exp(), max=scaling.max_logit_scale)


def _scale_value(scaling: nn.Module) -> float:
    with torch.no_grad():
        return float(_scale(scaling))


def contrastive_loss(media: Tensor, text: Tensor, media_labels: Tensor, text_labels: Tensor,
                     logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE between media and caption embeddings, with shared captions allowed.

    ``logits = logit_scale * media @ text.T``. Media → text: each medium's loss is
    ``-log`` of the softmax probability (over all texts) of the texts with its label. Text →
    media: likewise for each text that has a medium with its label in the batch (texts added
    only as negatives, such as a caption bank, have none). The loss is the mean of the two
    directions. With one text per medium and all labels distinct, this is CLIP's loss.

    Args:
        media: (B, D) embeddings.
        text: (T, D) embeddings.
        media_labels: (B,) item ids; every label must occur in ``text_labels``.
        text_labels: (T,) item ids.
        logit_scale: the inverse temperature.
    """
    logits = logit_scale * media @ text.T
    positive = media_labels[:, None] == text_labels[None, :]
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every medium needs at least one text with its label")
    lowest = torch.finfo(logits.dtype).min
    to_text = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, lowest), 1)
    has_media = positive.any(dim=0)
    by_text, positive_t = logits.T[has_media], positive.T[has_media]
    to_media = torch.logsumexp(by_text, 1) - torch.logsumexp(by_text.masked_fill(~positive_t, lowest), 1)
    return (to_text.mean() + to_media.mean()) / 2


class _Batches:
    """Index batches of one set, without replacement within each shuffled epoch."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = size, min(batch_size, size), generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> Tensor:
        if len(self.order) < self.batch_size:
            self.order = torch.cat([self.order, torch.randperm(self.size, generator=self.generator)])
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return batch


def _templates(modality: str, which: str) -> tuple[str | None, ...]:
    """The caption templates a world modality trains with (None: the item's own ``caption()``)."""
    if which == "canonical":
        return (None,)
    from anygpt.alignment.world import CAPTIONS

    phrasings = CAPTIONS.get(modality)
    return tuple(phrasings.train) if phrasings else (None,)


def _caption(item: Any, template: str | None) -> str:
    return item.caption() if template is None else item.caption(template)


def _parameter_groups(modules: Sequence[nn.Module], weight_decay: float, lr: float) -> list[dict]:
    """AdamW groups of ``modules`` at ``lr``: matrices decayed; biases, norms, positional
    embeddings, class tokens and the logit scale not (as CLIP)."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            flat = param.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "log_logit_scale"))
            (no_decay if flat else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train_encoder(encoder: ImageBindEncoder, sets: Mapping[str, MediaSet],
                  settings: EncoderTraining | None = None, *,
                  candidates: Mapping[str, Sequence[Any]] | None = None) -> TrainingResult:
    """Train a copy of ``encoder``'s ImageBind model contrastively; return it frozen.

    Each step draws ``settings.batch_size`` media of every set, embeds them with their trunk
    (:func:`embed`), embeds the captions of the batch with the text trunk (one phrasing per
    medium, see ``caption_templates``; identical captions once), and minimises the mean over
    the modalities of :func:`contrastive_loss` at the learnt temperature. AdamW, linear
    warm-up, cosine decay, gradient clipping.

    Args:
        encoder: the starting point (random or pretrained); it is not modified.
        sets: modality → its training media (:func:`media_set`).
        settings: see :class:`EncoderTraining`.
        candidates: modality → the items whose captions form the caption bank (with
            ``settings.caption_bank``); default: the distinct items of the set.

    Returns:
        A :class:`TrainingResult` whose ``encoder`` is a new frozen ``ImageBindEncoder``
        holding the trained model (same ``arch``).
    """
    from tqdm.auto import tqdm

    from anygpt.encoders import ImageBindEncoder

    settings = settings or EncoderTraining()
    if not sets:
        raise ValueError("train_encoder needs at least one MediaSet")
    generator = torch.Generator().manual_seed(settings.seed)
    model = copy.deepcopy(encoder.model)  # the caller's frozen encoder stays as it is
    model.requires_grad_(False)
    scaling = _logit_scaling(model)
    if settings.logit_scale is not None:
        scaling.log_logit_scale.data.fill_(math.log(settings.logit_scale))
    scaling.log_logit_scale.requires_grad_(True)

    def parts(key: str) -> list[nn.Module]:
        return [model.modality_preprocessors[key], model.modality_trunks[key], model.modality_heads[key]]

    media_modules = [m for key in sorted({s.encoder_input for s in sets.values()}) for m in parts(key)]
    text_modules = parts("text") if settings.train_text else []
    for module in media_modules + text_modules:
        module.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = _parameter_groups(media_modules, settings.weight_decay, settings.lr)
    groups += _parameter_groups(text_modules, settings.weight_decay,
                                settings.lr if settings.text_lr is None else settings.text_lr)
    groups.append({"params": [scaling.log_logit_scale], "weight_decay": 0.0, "lr": settings.lr})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, betas=tuple(settings.betas))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay("cosine", settings.warmup_steps, settings.steps, settings.min_lr_ratio))

    # Labels: one id per distinct item of each modality.
    labels, banks = {}, {}
    for modality, data in sets.items():
        distinct = list(dict.fromkeys(candidates[modality] if candidates and modality in candidates else data.items))
        index = {item: i for i, item in enumerate(distinct)}
        missing = [item for item in data.items if item not in index]
        for item in missing:
            index[item] = len(index)
            distinct.append(item)
        labels[modality] = torch.tensor([index[item] for item in data.items])
        banks[modality] = distinct
    batches = {m: _Batches(len(s), settings.batch_size, generator) for m, s in sets.items()}
    templates = {m: _templates(m, settings.caption_templates) for m in sets}
    text_cache: dict[str, Tensor] = {}

    def text_embeddings(captions: list[str], step: int) -> Tensor:
        if settings.train_text and step >= settings.text_frozen_steps:
            return embed_text_prefix(model, tokenize(captions))
        if settings.train_text:  # frozen for now; its embeddings change later: no cache
            with torch.no_grad():
                return embed_text_prefix(model, tokenize(captions))
        todo = [c for c in dict.fromkeys(captions) if c not in text_cache]
        if todo:
            with torch.no_grad():
                model.eval()
                for caption, row in zip(todo, embed(model, "text", tokenize(todo))):
                    text_cache[caption] = row
                model.train()
        return torch.stack([text_cache[c] for c in captions])

    losses: list[float] = []
    per_modality: dict[str, list[float]] = {m: [] for m in sets}
    logger.info("training the encoder: %d steps, %d media a modality a step (%s), text %s, %d trainable "
                "parameters", settings.steps, settings.batch_size,
                ", ".join(f"{m} {len(s)}" for m, s in sets.items()),
                "trained" if settings.train_text else "frozen", sum(p.numel() for p in params))
    start = time.perf_counter()
    bar = tqdm(total=settings.steps, desc="encoder", disable=not settings.progress, dynamic_ncols=True,
               leave=False)
    try:
        for step in range(settings.steps):
            total = torch.zeros(())
            for modality, data in sets.items():
                index = batches[modality].next()
                media_labels = labels[modality][index]
                batch = data.inputs[index].to(dtype=encoder.dtype)
                media = embed(model, data.encoder_input, batch)
                choice = torch.randint(len(templates[modality]), (len(index),), generator=generator)
                pairs = dict.fromkeys(
                    (int(label), _caption(data.items[int(i)], templates[modality][int(c)]))
                    for i, label, c in zip(index, media_labels, choice))
                if settings.caption_bank:
                    pairs.update(dict.fromkeys((i, item.caption()) for i, item in enumerate(banks[modality])))
                text_labels = torch.tensor([label for label, _ in pairs])
                text = text_embeddings([caption for _, caption in pairs], step)
                loss = contrastive_loss(media, text, media_labels, text_labels, _scale(scaling))
                per_modality[modality].append(float(loss.detach()))
                total = total + loss / len(sets)
            optimizer_step(total, optimizer, schedule, params, settings.max_grad_norm)
            losses.append(float(total.detach()))
            bar.update(1)
            if (step + 1) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}", scale=f"{_scale_value(scaling):.1f}")
            if settings.log_every and (step + 1) % settings.log_every == 0:
                window = losses[-settings.log_every:]
                logger.info("encoder step %d/%d: loss %.4f (%s), logit scale %.2f, %.2f steps/s", step + 1,
                            settings.steps, sum(window) / len(window),
                            ", ".join(f"{m} {sum(v[-settings.log_every:]) / len(window):.3f}"
                                      for m, v in per_modality.items()),
                            _scale_value(scaling), (step + 1) / (time.perf_counter() - start))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    model.requires_grad_(False)
    trained = ImageBindEncoder(model, encoder.arch)  # freezes it and sets eval mode
    tenth = max(1, len(losses) // 10)
    logger.info("encoder: %d steps in %.1f s (%.2f steps/s), loss %.4f -> %.4f, logit scale %.2f",
                len(losses), seconds, len(losses) / seconds, sum(losses[:tenth]) / tenth,
                sum(losses[-tenth:]) / tenth, _scale_value(scaling))
    return TrainingResult(trained, losses, per_modality, seconds, _scale_value(scaling))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def caption_embeddings(encoder: ImageBindEncoder, captions: Sequence[str], batch_size: int = 256) -> Tensor:
    """(N, D) unit-length text embeddings of ``captions`` by the (frozen) encoder."""
    tokens = tokenize(captions)
    return torch.cat([encoder.encode("text", tokens[i: i + batch_size]) for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def media_embeddings(encoder: ImageBindEncoder, data: MediaSet, batch_size: int = 32) -> Tensor:
    """(N, D) embeddings of a :class:`MediaSet` by the (frozen) encoder, ``encode`` batch by batch."""
    return torch.cat([encoder.encode(data.encoder_input, data.inputs[i: i + batch_size])
                      for i in range(0, len(data), batch_size)])


@torch.no_grad()
def retrieval_accuracy(encoder: ImageBindEncoder, data: MediaSet, candidates: Sequence[Any] | None = None, *,
                       template: str | None = None, batch_size: int = 32) -> Retrieval:
    """Media → caption retrieval among the captions of ``candidates``.

    Each medium's embedding is compared (dot product: the captions are unit length, so this
    ranks by cosine) with the caption embedding of every candidate item; it is right when
    the nearest is its own item's.

    Args:
        encoder: the encoder judged.
        data: the media and the items they show.
        candidates: items whose captions compete (default: every world item of
            ``data.modality``: 54 images, 9 sounds, 72 clips). Must include every item of
            ``data``.
        template: caption template of the candidates (default: the canonical ``caption()``);
            e.g. a held-out phrasing of :data:`anygpt.alignment.world.CAPTIONS`.
    """
    if candidates is None:
        from anygpt.alignment.world import all_items

        candidates = all_items(data.modality)
    candidates = list(candidates)
    index = {item: i for i, item in enumerate(candidates)}
    missing = [item for item in data.items if item not in index]
    if missing:
        raise ValueError(f"{len(missing)} media show items that are not candidates, e.g. {missing[0]!r}")
    text = caption_embeddings(encoder, [_caption(item, template) for item in candidates])
    similarity = media_embeddings(encoder, data, batch_size).float() @ text.float().T
    truth = torch.tensor([index[item] for item in data.items])
    best = similarity.argmax(dim=1)
    own = similarity.gather(1, truth[:, None]).squeeze(1)
    others = similarity.scatter(1, truth[:, None], float("-inf")).max(dim=1).values
    attributes: dict[str, float] = {}
    if all(hasattr(item, "attributes") for item in candidates):
        for name in candidates[0].attributes():
            hits = [candidates[int(b)].attributes()[name] == item.attributes()[name]
                    for b, item in zip(best, data.items)]
            attributes[name] = sum(hits) / len(hits)
    return Retrieval(data.modality, float((best == truth).float().mean()), attributes, len(data),
                     len(candidates), float((own - others).mean()))


# --------------------------------------------------------------------------------------------
# The world's encoder, end to end
# --------------------------------------------------------------------------------------------
def train_world_encoder(arch: Mapping[str, Any], settings: EncoderTraining | None = None, *,
                        init_seed: int = 0, output: str | Path | None = None,
                        modalities: Sequence[str] = WORLD_MODALITIES) -> TrainingResult:
    """Build a random ``arch`` encoder, train it on rendered world media, save it.

    Args:
        arch: ``EncoderConfig.arch`` (``ImageBindModel`` keyword arguments).
        settings: training settings, including the training set sizes
            (``items_per_caption``) and their render seed.
        init_seed: ``EncoderConfig.seed`` of the random initialisation.
        output: where to save the weights (``.safetensors`` or ``.pth``); None: not saved.
            ``EncoderConfig(pretrained=output, arch=arch)`` reloads them bit-exactly.
        modalities: the world modalities to train on.
    """
    from anygpt.config import EncoderConfig
    from anygpt.encoders import ImageBindEncoder

    settings = settings or EncoderTraining()
    encoder = ImageBindEncoder.from_config(EncoderConfig(arch=dict(arch), seed=init_seed))
    start = time.perf_counter()
    sizes = {m: settings.items_per_caption.get(m, 0) for m in modalities}
    sets = world_media_sets(encoder, sizes, settings.render_seed, dtype=getattr(torch, settings.storage_dtype),
                            progress=settings.progress)
    data_seconds = time.perf_counter() - start
    logger.info("rendered and preprocessed %s in %.1f s",
                ", ".join(f"{len(s)} {m}" for m, s in sets.items()), data_seconds)
    from anygpt.alignment.world import all_items

    result = train_encoder(encoder, sets, settings, candidates={m: all_items(m) for m in sets})
    result.data_seconds = data_seconds
    if output is not None:
        result.path = result.encoder.save_weights(output)
        logger.info("saved the encoder to %s (%.2f MB)", result.path, result.path.stat().st_size / 1e6)
    return result

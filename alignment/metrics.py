"""Real-data metrics of generated media, with injectable feature extractors.

``anygpt eval --metrics fid,clip,fad,clap,clipsim`` (and :func:`media_metrics`): for each caption
row of a manifest with a real file of an output modality, the model generates that modality from
the caption (the stage-2 request, with the modality's output forced, as
``pipe(..., outputs=(modality,))`` does), and

* ``fid/image``: Fréchet distance between Gaussians fitted to the features of the generated and
  the real images (with CLIP image features, this is the CLIP-FID of clean-fid and Kynkäänniemi
  et al. 2023; inject another extractor, e.g. Inception, for the classic FID);
* ``clip/image``: CLIP score, ``100 · max(cos(image, caption), 0)`` averaged (torchmetrics'
  definition);
* ``fad/audio``: the same Fréchet distance on audio features (CLAP embeddings, as fadtk's
  ``clap-laion`` models);
* ``clap/audio``: CLAP score, the mean cosine between generated audio and its caption;
* ``clipsim/video``: CLIPSIM, the mean over videos of the mean cosine between each frame and the
  caption.

An extractor is an object with ``embed_texts`` and ``embed_images`` (CLIP-like) or
``embed_audio`` (CLAP-like), see :class:`ImageTextEmbedder` and :class:`AudioTextEmbedder`;
a hub id or a local folder loads :class:`ClipEmbedder` / :class:`ClapEmbedder` from
``transformers``' ``CLIPModel`` / ``ClapModel``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from anygpt.alignment.data import STAGE2_PROMPTS, Sample
from anygpt.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from anygpt.modalities import get_modality
from anygpt.types import Audio

if TYPE_CHECKING:
    from anygpt.pipeline import AnyGPTPipeline

logger = logging.getLogger(__name__)

__all__ = ["MetricSpec", "METRICS", "EXTRACTORS", "ImageTextEmbedder", "AudioTextEmbedder", "ClipEmbedder",
           "ClapEmbedder", "ImageBindEmbedder", "OWN_ENCODER", "load_extractor", "frechet_distance",
           "caption_similarity", "media_metrics"]


@dataclass(frozen=True)
class MetricSpec:
    """One real-data metric.

    Attributes:
        modality: the output modality it scores.
        extractor: the :data:`EXTRACTORS` key of the features it uses.
        reference: ``"media"`` (Fréchet distance to the real files' features) or ``"caption"``
            (similarity to the caption's text features).
        scale, clamp: a caption metric is ``scale · cos``, floored at 0 when ``clamp``.
    """

    modality: str
    extractor: str
    reference: str
    scale: float = 1.0
    clamp: bool = False


#: The metrics ``--metrics`` accepts; the result key is ``<name>/<modality>``.
METRICS: dict[str, MetricSpec] = {
    "fid": MetricSpec("image", "clip", "media"),
    "clip": MetricSpec("image", "clip", "caption", scale=100.0, clamp=True),
    "fad": MetricSpec("audio", "clap", "media"),
    "clap": MetricSpec("audio", "clap", "caption"),
    "clipsim": MetricSpec("video", "clip", "caption"),
}

#: Extractor kind → the hub model loaded when none is given (downloaded on first use).
EXTRACTORS: dict[str, str] = {"clip": "openai/clip-vit-base-patch32", "clap": "laion/clap-htsat-unfused"}


@runtime_checkable
class ImageTextEmbedder(Protocol):
    """CLIP-like features: images (H, W, 3) uint8 arrays and texts, each to (N, D)."""

    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


@runtime_checkable
class AudioTextEmbedder(Protocol):
    """CLAP-like features: :class:`~anygpt.types.Audio` clips and texts, each to (N, D)."""

    def embed_audio(self, audio: Sequence[Audio]) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


_PROTOCOLS = {"clip": ImageTextEmbedder, "clap": AudioTextEmbedder}


# =============================================================================================
# Extractors backed by transformers
# =============================================================================================


class _PretrainedEmbedder:
    """A transformers dual encoder with its tokenizer and media processor; texts embed through
    ``get_text_features``. Subclasses name the transformers classes that load them."""

    kind: str
    model_class: str
    processor_class: str

    def __init__(self, model: Any, tokenizer: Any, processor: Any, batch_size: int = 32):
        self.model, self.tokenizer, self.processor = model.eval(), tokenizer, processor
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        batch_size: int = 32) -> Any:
        """Load the model, its tokenizer and its processor from a hub id or a local folder.

        Raises:
            WeightsNotFoundError: they cannot be found or loaded.
        """
        import transformers

        model_class = getattr(transformers, cls.model_class)
        try:
            model = model_class.from_pretrained(name_or_path).to(device or "cpu")
            tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
            processor = getattr(transformers, cls.processor_class).from_pretrained(name_or_path)
        except OSError as exc:
            raise WeightsNotFoundError(
                f"could not load the {cls.kind} feature extractor {str(name_or_path)!r}: {exc}. Pass a local "
                f"folder holding a {cls.model_class}, its tokenizer and processor (saved with save_pretrained), "
                f"e.g. --{cls.kind}-model DIR, or download the hub model once where the Hub is reachable") from exc
        return cls(model, tokenizer, processor, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text features (N, D), float32 on the CPU."""
        limit = self.model.config.text_config.max_position_embeddings
        return self._batched(list(texts), lambda chunk: self.model.get_text_features(**self.tokenizer(
            chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt").to(self.device)))

    def _batched(self, items: list, forward: Any) -> torch.Tensor:
        out = [_pooled(forward(items[i:i + self.batch_size])) for i in range(0, len(items), self.batch_size)]
        return torch.cat(out).float().cpu() if out else torch.empty(0)


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder(_PretrainedEmbedder):
    """:class:`ImageTextEmbedder` of a ``transformers.CLIPModel``.

    Args:
        model: the CLIP model. tokenizer: its tokenizer. processor: its image processor.
        batch_size: images or texts per forward pass.
    """

    kind, model_class, processor_class = "clip", "CLIPModel", "AutoImageProcessor"

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Projected image features (N, D), float32 on the CPU."""
        return self._batched(list(images), lambda chunk: self.model.get_image_features(
            **self.processor(images=chunk, return_tensors="pt").to(self.device)))


class ClapEmbedder(_PretrainedEmbedder):
    """:class:`AudioTextEmbedder` of a ``transformers.ClapModel``.

    Audio is mixed to mono, resampled to the feature extractor's rate and cut to its longest
    input, so that the extractor never crops at random (which would draw on numpy's global RNG).

    Args:
        model: the CLAP model. tokenizer: its tokenizer. processor: its ``ClapFeatureExtractor``.
        batch_size: clips or texts per forward pass.
    """

    kind, model_class, processor_class = "clap", "ClapModel", "AutoFeatureExtractor"

    @torch.no_grad()
    def embed_audio(self, audio: Sequence[Audio]) -> torch.Tensor:
        """Projected audio features (N, D), float32 on the CPU."""
        extractor = self.processor
        rate = extractor.sampling_rate
        waves = [_mono_at(clip, rate)[: extractor.nb_max_samples] for clip in audio]
        fused = getattr(self.model.config.audio_config, "enable_fusion", False)

        def forward(chunk: list[np.ndarray]) -> Any:
            inputs = extractor(chunk, sampling_rate=rate, truncation="fusion" if fused else "rand_trunc",
                               return_tensors="pt")
            return self.model.get_audio_features(**inputs.to(self.device))

        return self._batched(waves, forward)


def _mono_at(audio: Audio, rate: int) -> np.ndarray:
    import torchaudio.functional as AF

    wave = torch.as_tensor(np.asarray(audio.waveform, dtype=np.float32))
    if wave.ndim == 2:
        wave = wave.mean(0)
    if audio.sample_rate != rate:
        wave = AF.resample(wave, audio.sample_rate, rate)
    return wave.numpy()


class ImageBindEmbedder:
    """Both protocols from an AnyGPT model's own ImageBind encoder, which binds images, video
    frames, audio and text in one space: the only trained extractor of a world that CLIP and
    CLAP never saw (the miniature's). Its scores are comparable between models only when they
    share the encoder.

    Args:
        model: an :class:`~anygpt.model.AnyGPTModel` (``pipe.model``) with an ImageBind encoder.
        batch_size: items per encoder call.
    """

    def __init__(self, model: Any, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit-length image embeddings (N, D), float32 on the CPU."""
        from PIL import Image

        return self._media("image", [Image.fromarray(image) for image in images])

    @torch.no_grad()
    def embed_audio(self, audio: Sequence[Audio]) -> torch.Tensor:
        """Unit-length audio embeddings (N, D), float32 on the CPU."""
        return self._media("audio", list(audio))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings (N, D) from ImageBind's text trunk, float32 on the CPU."""
        from anygpt.alignment.encoder_training import caption_embeddings

        return caption_embeddings(self.model.encoder, list(texts), self.batch_size).float().cpu()

    def _media(self, modality: str, values: list[Any]) -> torch.Tensor:
        chunks = [self.model.encode_items(modality, values[i:i + self.batch_size])
                  for i in range(0, len(values), self.batch_size)]
        return torch.cat(chunks).float().cpu() if chunks else torch.empty(0)


#: The extractor name that means the evaluated model's own encoder (:class:`ImageBindEmbedder`).
OWN_ENCODER = "encoder"

_EMBEDDERS = {"clip": ClipEmbedder, "clap": ClapEmbedder}


def load_extractor(kind: str, value: Any = None, device: str | torch.device | None = None,
                   model: Any = None) -> Any:
    """The ``kind`` (``"clip"`` or ``"clap"``) extractor: ``value`` itself if it has the methods
    of its protocol, :data:`OWN_ENCODER` for ``model``'s own encoder (:class:`ImageBindEmbedder`),
    else loaded from a hub id or folder (``None``: :data:`EXTRACTORS`' default).

    Raises:
        UnknownNameError: ``kind`` is not an extractor kind.
        ConfigError: ``value`` is neither a name nor an object with the protocol's methods, or
            is :data:`OWN_ENCODER` without a ``model``.
        WeightsNotFoundError: the named model cannot be loaded.
    """
    if kind not in EXTRACTORS:
        raise UnknownNameError("feature extractor", kind, list(EXTRACTORS))
    if isinstance(value, _PROTOCOLS[kind]):
        return value
    if value == OWN_ENCODER:
        if model is None:
            raise ConfigError(f"the {kind} feature extractor {OWN_ENCODER!r} is the evaluated model's own "
                              "encoder: pass the model (media_metrics does), or name a hub id or folder")
        return ImageBindEmbedder(model)
    if value is None or isinstance(value, (str, os.PathLike)):
        return _EMBEDDERS[kind].from_pretrained(value or EXTRACTORS[kind], device=device)
    protocol = _PROTOCOLS[kind]
    methods = [m for m in vars(protocol) if m.startswith("embed_")]
    raise ConfigError(f"the {kind} feature extractor must be a hub id, a folder, or an object with "
                      f"{' and '.join(methods)} (see {protocol.__name__}); got {type(value).__name__}")


# =============================================================================================
# The measures
# =============================================================================================


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D):
    ``|mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½)``, in float64.

    The square roots come from symmetric eigendecompositions (eigenvalues floored at 0), which
    stay exact for the singular covariances of sets smaller than the feature width.

    Raises:
        ConfigError: a set has fewer than 2 rows, or the widths differ.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ConfigError(f"Fréchet distance needs two (N, D) feature sets of one width, got {tuple(a.shape)} "
                          f"and {tuple(b.shape)}")
    if min(len(a), len(b)) < 2:
        raise ConfigError(f"Fréchet distance needs at least 2 items per set (got {len(a)} and {len(b)}): "
                          "evaluate on more caption rows of the modality")
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    value = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp(min=0))  # rounding can leave a tiny negative for equal sets


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def caption_similarity(media: Sequence[torch.Tensor], texts: torch.Tensor, *, scale: float = 1.0,
                       clamp: bool = False) -> float:
    """Mean over items of the mean over each item's rows (video frames; one row for an image or
    a clip) of ``scale · cos(row, its caption)``, each floored at 0 when ``clamp``.

    Args:
        media: per item, its features (F, D).
        texts: the captions' features (N, D), one per item.
    """
    if len(media) != len(texts) or not len(media):
        raise ConfigError(f"caption similarity needs one caption per item and at least one item, got "
                          f"{len(media)} items and {len(texts)} captions")
    scores = []
    for rows, text in zip(media, texts):
        cosine = scale * F.cosine_similarity(rows.double(), text.double()[None], dim=-1)
        scores.append(float((cosine.clamp(min=0) if clamp else cosine).mean()))
    return float(np.mean(scores))


# =============================================================================================
# Generation and evaluation
# =============================================================================================


def media_metrics(pipe: "AnyGPTPipeline", samples: Sequence[Sample], metrics: Sequence[str], *,
                  extractors: Mapping[str, Any] | None = None, seed: int = 0, batch_size: int = 16,
                  max_new_tokens: int | None = None) -> dict[str, float]:
    """The requested :data:`METRICS` of media generated from ``samples``' captions.

    Each caption row with a file of a scored modality yields one generated item (seed
    ``seed + i`` for its ``i``-th row); every real file of those rows enters the Fréchet
    distances.

    Args:
        pipe: the model.
        samples: manifest rows (conversation rows are ignored).
        metrics: names from :data:`METRICS`.
        extractors: :data:`EXTRACTORS` kind → an extractor object, hub id or folder, or
            :data:`OWN_ENCODER` (absent: the default hub model).
        seed: generation seed of the first row.
        batch_size: prompts generated at once.
        max_new_tokens: the LLM's budget per answer (default: the model's generation setting).

    Raises:
        UnknownNameError: a metric name is unknown.
        ConfigError: the model does not generate a requested metric's modality.
    """
    specs = _check_metrics(pipe, metrics)
    loaded = {kind: load_extractor(kind, (extractors or {}).get(kind), device=pipe.device, model=pipe.model)
              for kind in sorted({spec.extractor for spec in specs.values()})}
    results: dict[str, float] = {}
    for modality in dict.fromkeys(spec.modality for spec in specs.values()):
        chosen = {name: spec for name, spec in specs.items() if spec.modality == modality}
        rows = [s for s in samples if s.caption is not None and s.media.get(modality)]
        if not rows:
            logger.warning("no caption row of the manifest has %s; skipping %s", get_modality(modality).noun,
                           ", ".join(chosen))
            continue
        features = _features(pipe, rows, modality, chosen, loaded, seed=seed, batch_size=batch_size,
                             max_new_tokens=max_new_tokens)
        results.update({f"{name}/{modality}": _score(spec, features) for name, spec in chosen.items()})
    return results


def _check_metrics(pipe: "AnyGPTPipeline", metrics: Sequence[str]) -> dict[str, MetricSpec]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UnknownNameError("metric", unknown[0], list(METRICS))
    specs = {name: METRICS[name] for name in dict.fromkeys(metrics)}
    missing = {name: s.modality for name, s in specs.items() if s.modality not in pipe.config.output_modalities}
    if missing:
        raise ConfigError(f"the model does not generate {', '.join(sorted(set(missing.values())))}, which "
                          f"{', '.join(missing)} score(s); its output modalities: "
                          f"{', '.join(pipe.config.output_modalities) or '(none)'}. Drop those metrics")
    return specs


@dataclass
class _Features:
    generated: list[torch.Tensor]  # per item (F, D)
    real: torch.Tensor | None = None  # (M, D)
    captions: torch.Tensor | None = None  # (N, D)


def _features(pipe: "AnyGPTPipeline", rows: Sequence[Sample], modality: str, specs: Mapping[str, MetricSpec],
              extractors: Mapping[str, Any], **generation: Any) -> _Features:
    """Features of the generated media, and of the real files and the captions where a metric
    needs them; media are embedded chunk by chunk, so that only features stay in memory."""
    # METRICS pairs each modality with one extractor.
    (kind,) = {spec.extractor for spec in specs.values()}
    extractor = extractors[kind]
    out = _Features(generated=_embed_all(extractor, kind, _generated(pipe, rows, modality, **generation)))
    if any(spec.reference == "media" for spec in specs.values()):
        paths = [path for row in rows for path in row.media[modality]]
        out.real = torch.cat(_embed_all(extractor, kind, _loaded(modality, paths, generation["batch_size"])))
    if any(spec.reference == "caption" for spec in specs.values()):
        out.captions = extractor.embed_texts([row.caption for row in rows])
    return out


def _loaded(modality: str, paths: Sequence[Path], batch_size: int) -> Iterator[list[Any]]:
    spec = get_modality(modality)
    for start in range(0, len(paths), batch_size):
        yield [spec.load(path) for path in paths[start:start + batch_size]]


def _generated(pipe: "AnyGPTPipeline", rows: Sequence[Sample], modality: str, *, seed: int, batch_size: int,
               max_new_tokens: int | None) -> Iterator[list[Any]]:
    """Yield lists of generated values, ``batch_size`` rows at a time (stage-2 requests, forced)."""
    noun = get_modality(modality).noun
    settings = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [STAGE2_PROMPTS[0].format(a_modality=noun, caption=row.caption) for row in chunk]
        answers = pipe.batch(prompts, outputs=(modality,), seed=[seed + start + i for i in range(len(chunk))],
                             **settings)
        yield [answer.media(modality)[0] for answer in answers]


def _embed_all(extractor: Any, kind: str, chunks: Iterable[Sequence[Any]]) -> list[torch.Tensor]:
    """Per value of every chunk, its features (F, D): one row for an image or an audio clip, one
    per video frame."""
    out = []
    for values in chunks:
        if kind == "clap":
            out.extend(extractor.embed_audio(values)[:, None])
            continue
        frames = [_frames(value) for value in values]
        flat = extractor.embed_images([frame for item in frames for frame in item])
        out.extend(flat.split([len(item) for item in frames]))
    return out


def _frames(value: Any) -> list[np.ndarray]:
    # Copies: PIL's and decoded frames' buffers are read-only, which torch.from_numpy warns about.
    if hasattr(value, "frames"):
        return list(np.array(value.frames, dtype=np.uint8))
    return [np.array(value.convert("RGB"), dtype=np.uint8)]


def _score(spec: MetricSpec, features: _Features) -> float:
    if spec.reference == "media":
        return frechet_distance(torch.cat(features.generated), features.real)
    return caption_similarity(features.generated, features.captions, scale=spec.scale, clamp=spec.clamp)

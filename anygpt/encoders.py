"""The frozen multimodal encoder: ImageBind, one pooled embedding per media item.

An :class:`ImageBindEncoder` wraps ``imagebind.models.imagebind_model.ImageBindModel`` and turns
a batch of preprocessed media into one L2-normalised embedding per item, the vector NExT-GPT's
input projector reads. It comes from one of three sources (``EncoderConfig.pretrained``):

* ``"imagebind_huge"``: Meta's released weights, kept in the AnyGPT cache
  (``$ANYGPT_CACHE/imagebind/imagebind_huge.pth``, default ``~/.cache/anygpt/...``) and
  downloaded once unless ``HF_HUB_OFFLINE`` or ``ANYGPT_OFFLINE`` is set;
* a path to a ``.pth``/``.pt``/``.safetensors`` state dict (what :meth:`ImageBindEncoder.save_weights`
  writes), built with ``EncoderConfig.arch`` (or the huge architecture when ``arch`` is empty);
* ``None``: the architecture ``arch`` with random weights seeded by ``EncoderConfig.seed``.

The ``imagebind`` package is imported only when an encoder is built, and without running its
``__init__.py`` (which imports pytorchvideo, broken with current torchvision): see
:func:`import_imagebind_model`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anygpt.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from anygpt.paths import cache_dir
from anygpt.registry import Registry
from anygpt.seeding import seeded
from anygpt.weightfiles import check_state, read_safetensors, read_torch_file

if TYPE_CHECKING:
    from anygpt.config import EncoderConfig

__all__ = [
    "ImageBindEncoder",
    "ENCODERS",
    "build_encoder",
    "import_imagebind_model",
    "imagebind_cache_path",
    "IMAGEBIND_HUGE_ARCH",
    "IMAGEBIND_HUGE_URL",
]

logger = logging.getLogger(__name__)

IMAGEBIND_HUGE = "imagebind_huge"
IMAGEBIND_HUGE_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
_HUGE_FILENAME = "imagebind_huge.pth"

#: ``ImageBindModel`` keyword arguments of ImageBind-huge (as in ``imagebind_model.imagebind_huge``).
#: Usable as ``EncoderConfig.arch`` to benchmark the real-size model with random weights.
IMAGEBIND_HUGE_ARCH: dict[str, Any] = {
    "vision_embed_dim": 1280,
    "vision_num_blocks": 32,
    "vision_num_heads": 16,
    "text_embed_dim": 1024,
    "text_num_blocks": 24,
    "text_num_heads": 16,
    "out_embed_dim": 1024,
    "audio_drop_path": 0.1,
    "imu_drop_path": 0.7,
}

# Modalities this wrapper encodes, and the rank of one clip of each without the batch dim.
# One more leading dim after the batch is a list of clips (audio, video), averaged per item.
_CLIP_RANK = {"vision": 4, "audio": 3, "text": 1}
_IMAGE_SIZE = 224  # ImageBind's vision preprocessor is built for 224 x 224
_TEXT_CONTEXT = 77  # ImageBind's text preprocessor: 77 CLIP BPE token ids
_TRUTHY = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# Importing ImageBind without its package __init__
# --------------------------------------------------------------------------------------------
def import_imagebind_model() -> types.ModuleType:
    """Import ``imagebind.models.imagebind_model`` without executing ``imagebind/__init__.py``.

    The package ``__init__`` imports ``imagebind.data`` → pytorchvideo → a torchvision module
    that no longer exists, so a plain ``import imagebind`` fails. The model code does not need
    it: we register a bare package module (only ``__path__``) under ``imagebind`` so that the
    submodule import finds its files. A real ``imagebind`` that is already imported is kept.

    Raises:
        ImportError: ``imagebind-unofficial`` (or its undeclared dependency ``einops``) is missing.
    """
    if "imagebind" not in sys.modules:
        spec = importlib.util.find_spec("imagebind")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "the ImageBind model code is not installed; run `pip install imagebind-unofficial "
                "einops timm` (the PyPI package named `imagebind` is an empty placeholder)"
            )
        package = types.ModuleType("imagebind", "ImageBind (bare package: __init__ not executed)")
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = "imagebind"
        # Keep the real spec so importlib.util.find_spec("imagebind") still works for others
        # (the decoders read the CLIP vocabulary file that ships in this package).
        package.__spec__ = spec
        sys.modules["imagebind"] = package
    try:
        return importlib.import_module("imagebind.models.imagebind_model")
    except ImportError as exc:
        raise ImportError(
            f"could not import ImageBind's model code ({exc}); run `pip install "
            "imagebind-unofficial einops timm`"
        ) from exc


# --------------------------------------------------------------------------------------------
# Where the released weights live
# --------------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUTHY


def _offline() -> bool:
    return _env_flag("ANYGPT_OFFLINE") or _env_flag("HF_HUB_OFFLINE")


def imagebind_cache_path() -> Path:
    """Where ``imagebind_huge.pth`` is kept: ``imagebind/`` in :func:`anygpt.paths.cache_dir`."""
    return cache_dir() / "imagebind" / _HUGE_FILENAME


def _huge_checkpoint() -> Path:
    """The cached ImageBind-huge checkpoint, downloaded first if absent and downloads are allowed."""
    path = imagebind_cache_path()
    if path.is_file():
        return path
    fix = (f"download {IMAGEBIND_HUGE_URL} (about 4.8 GB) to {path}, set ANYGPT_CACHE to a folder "
           f"holding imagebind/{_HUGE_FILENAME}, or set encoder.pretrained to the file's path")
    if _offline():
        raise WeightsNotFoundError(
            f"ImageBind-huge weights not found at {path} and downloads are disabled "
            f"(HF_HUB_OFFLINE or ANYGPT_OFFLINE is set); {fix}")
    logger.info("Downloading ImageBind-huge weights (about 4.8 GB) from %s to %s", IMAGEBIND_HUGE_URL, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file in the same folder and renames it when complete.
        torch.hub.download_url_to_file(IMAGEBIND_HUGE_URL, str(path), progress=True)
    except Exception as exc:  # network, disk, HTTP errors: all mean "no weights"
        raise WeightsNotFoundError(f"could not download ImageBind-huge weights ({exc}); {fix}") from exc
    return path


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------
def _constructor_defaults(model_cls: type) -> dict[str, Any]:
    params = inspect.signature(model_cls.__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def _resolve_arch(model_cls: type, arch: Mapping[str, Any]) -> dict[str, Any]:
    """The full constructor kwargs: defaults overridden by ``arch``; unknown keys are errors."""
    defaults = _constructor_defaults(model_cls)
    unknown = sorted(set(arch) - set(defaults))
    if unknown:
        raise ConfigError(
            f"encoder.arch: unknown key(s) {', '.join(unknown)}; valid ImageBindModel "
            f"parameters: {', '.join(defaults)}")
    resolved = {**defaults, **arch}
    # YAML gives lists; the convolution stems expect tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Construct modules with their parameters on the meta device: no memory, no init cost.

    Used before loading a state dict with ``assign=True``, so a 1.2 B-parameter model is not
    first initialised randomly. (``with torch.device("meta")`` cannot be used: ImageBind calls
    ``.item()`` on a tensor while it is built.) Buffers stay real; the state dict replaces them.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


_ENCODER_FIX = ("re-download or re-save it (ImageBindEncoder.save_weights), or check encoder.pretrained and "
                "encoder.arch in the config that names it")


def _check_arch_sizes(arch: dict[str, Any]) -> None:
    """Every ``*_embed_dim``, ``*_num_blocks``, ``*_num_heads`` a positive integer, each embedding
    width divisible by its number of heads."""
    for key, value in arch.items():
        if key.endswith(("_embed_dim", "_num_blocks", "_num_heads")) and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"encoder.arch.{key}: must be a positive integer, got {value!r}")
    for key, width in arch.items():
        heads = arch.get(key.replace("_embed_dim", "_num_heads")) if key.endswith("_embed_dim") else None
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            raise ConfigError(f"encoder.arch.{key}: {width} must be divisible by "
                              f"{key.replace('_embed_dim', '_num_heads')} ({heads})")


def _construct(model_cls: type, arch: dict[str, Any]) -> nn.Module:
    _check_arch_sizes(arch)
    try:
        return model_cls(**arch)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"encoder.arch: ImageBindModel cannot be built with these values: {exc}") from exc


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``'d state dict, on the CPU."""
    if path.suffix == ".safetensors":
        state = read_safetensors(path, what="encoder weights", fix=_ENCODER_FIX)
    else:  # memory-mapped where possible: the 4.8 GB checkpoint is not copied into RAM twice
        state = read_torch_file(path, what="encoder weights", fix=_ENCODER_FIX)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsNotFoundError(
            f"{path} is not a state dict (a mapping of parameter names to tensors); save one "
            "with ImageBindEncoder.save_weights or torch.save(model.state_dict(), path)")
    # Tensors sliced out of one file buffer can be misaligned for SIMD kernels, which then take
    # another code path and round differently: copy those so a reloaded model computes bitwise
    # the same as the one that was saved.
    return {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state.items()}


def _load_into(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    # Weights stored in another floating dtype (float16 files halve a shipped model) are loaded
    # in the dtype the model was built in: assign=True would otherwise adopt the file's dtype.
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    state = {name: tensor.to(dtypes[name]) if tensor.is_floating_point() and name in dtypes else tensor
             for name, tensor in state.items()}
    expected = model.state_dict()
    try:  # name the misshapen, missing and unexpected tensors and their shapes
        check_state(expected, state, source=path, what="encoder weights",
                    fix="set encoder.arch to the values the file was saved with (empty for ImageBind-huge), or "
                        + _ENCODER_FIX)
    except WeightsNotFoundError as exc:
        raise WeightsNotFoundError(f"the weights do not fit the encoder architecture: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        summary = " ".join(line.strip() for line in detail[:6])
        raise WeightsNotFoundError(
            f"the weights in {path} do not fit the encoder architecture ({summary}); set "
            "encoder.arch to the values the file was saved with (empty for ImageBind-huge)") from exc
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:  # strict loading should make this impossible; never run with uninitialised weights
        raise WeightsNotFoundError(f"{path} holds no values for {', '.join(leftover[:5])}")


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------
class ImageBindEncoder(nn.Module):
    """Frozen ImageBind: preprocessed media in, one pooled unit-length embedding per item out.

    Parameters never require gradients and the module stays in eval mode (``train()`` is a
    no-op), so dropout and drop-path never act. Whether to run under ``torch.no_grad()`` is the
    caller's choice (gradients with respect to the inputs remain possible).

    Args:
        model: an ``ImageBindModel``.
        arch: the full keyword arguments it was built with.
    """

    def __init__(self, model: nn.Module, arch: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.arch: dict[str, Any] = dict(arch)
        self.model.requires_grad_(False)
        self.train(False)

    # Construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EncoderConfig, base_dir: str | Path | None = None) -> ImageBindEncoder:
        """Build the encoder a config describes.

        Args:
            config: ``pretrained`` is ``"imagebind_huge"``, a weights path or None (random
                ``arch`` seeded with ``seed``).
            base_dir: folder that relative ``pretrained`` paths are resolved against (a saved
                model's directory); default: the current directory.

        Raises:
            ConfigError: ``arch`` has unknown keys or values ImageBindModel rejects.
            WeightsNotFoundError: the weights are missing, unreadable or do not fit ``arch``.
        """
        model_cls = import_imagebind_model().ImageBindModel
        if config.pretrained is None:
            return cls._random(model_cls, config.arch, config.seed)
        if config.pretrained == IMAGEBIND_HUGE:
            if config.arch:
                raise ConfigError("encoder.arch: must be empty when encoder.pretrained is "
                                  f"{IMAGEBIND_HUGE!r} (its architecture is fixed)")
            return cls._from_file(model_cls, IMAGEBIND_HUGE_ARCH, _huge_checkpoint())
        path = Path(config.pretrained).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise WeightsNotFoundError(
                f"encoder weights not found: {path} (encoder.pretrained={config.pretrained!r}); "
                f"give an existing .pth/.safetensors file (relative paths are resolved against "
                f"{base_dir if base_dir is not None else 'the current directory'}) or "
                f"{IMAGEBIND_HUGE!r} for Meta's released weights")
        return cls._from_file(model_cls, config.arch or IMAGEBIND_HUGE_ARCH, path)

    @classmethod
    def _random(cls, model_cls: type, arch: Mapping[str, Any], seed: int) -> ImageBindEncoder:
        resolved = _resolve_arch(model_cls, arch)
        with seeded(seed):  # leaves the caller's random state alone
            model = _construct(model_cls, resolved)
        encoder = cls(model, resolved)
        logger.info("Built ImageBind encoder with random weights (seed %d, %.2f M parameters)",
                    seed, encoder.num_parameters / 1e6)
        return encoder

    @classmethod
    def _from_file(cls, model_cls: type, arch: Mapping[str, Any], path: Path) -> ImageBindEncoder:
        resolved = _resolve_arch(model_cls, arch)
        state = _read_state_dict(path)
        with _parameters_on_meta():
            model = _construct(model_cls, resolved)
        _load_into(model, state, path)
        encoder = cls(model, resolved)
        logger.info("Loaded ImageBind encoder from %s (%.2f M parameters)", path, encoder.num_parameters / 1e6)
        return encoder

    def save_weights(self, path: str | Path) -> Path:
        """Write the ImageBind state dict (Meta's key names) to ``.safetensors``, else ``torch.save``.

        ``from_config`` with ``pretrained=path`` and the same ``arch`` reloads it bitwise.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(path))
        else:
            torch.save(state, path)
        return path

    # Properties ------------------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        """Width of the embeddings (``out_embed_dim``; 1024 for ImageBind-huge)."""
        return int(self.arch["out_embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def encoder_inputs(self) -> tuple[str, ...]:
        """The ImageBind modalities :meth:`encode` accepts."""
        return tuple(_CLIP_RANK)

    def preprocess_options(self, encoder_input: str) -> dict[str, Any]:
        """The input geometry that ``encoder_input``'s trunk was built for, as keyword arguments
        of the modality preprocessors (``ModalitySpec.preprocess(value, **options)``).

        * ``vision``: ``image_size`` (224: ImageBind's vision stem is fixed to it) and
          ``frames_per_clip`` (``arch["video_frames"]``), which only videos use: images and
          videos share this input, and the image preprocessor ignores it;
        * ``audio``: ``mel_bins`` (``arch["audio_num_mel_bins"]``) and ``target_frames``
          (``arch["audio_target_len"]``);
        * ``text``: none.

        Raises:
            UnknownNameError: ``encoder_input`` is not one of :attr:`encoder_inputs`.
        """
        if encoder_input not in _CLIP_RANK:
            raise UnknownNameError("encoder input", encoder_input, list(_CLIP_RANK),
                                   hint="Use the modality spec's `encoder_input`")
        arch = self.arch
        if encoder_input == "vision":
            return {"image_size": _IMAGE_SIZE, "frames_per_clip": int(arch["video_frames"])}
        if encoder_input == "audio":
            return {"mel_bins": int(arch["audio_num_mel_bins"]),
                    "target_frames": int(arch["audio_target_len"])}
        return {}

    # Frozen ------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ImageBindEncoder:
        """Stay in eval mode whatever ``mode`` says: the encoder is frozen."""
        if mode:
            logger.debug("ImageBindEncoder is frozen: train() keeps it in eval mode")
        return super().train(False)

    # Encoding ----------------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Encode several modalities: ``{encoder_input: batch}`` → ``{encoder_input: (B, D)}``."""
        return {key: self.encode(key, batch) for key, batch in inputs.items()}

    def encode(self, encoder_input: str, batch: Tensor) -> Tensor:
        """One embedding of width :attr:`output_dim` per item; only this modality's trunk runs.

        Accepted batches (ImageBind's fixed input sizes):

        * ``vision``: images (B, 3, 224, 224), or videos (B, clips, 3, frames, 224, 224);
        * ``audio``: (B, clips, 1, mel_bins, frames) log-mel clips (128 x 204 by default), or
          one clip per item (B, 1, mel_bins, frames);
        * ``text``: (B, 77) CLIP BPE token ids.

        Each clip is embedded and L2-normalised; the clips of an item are averaged, exactly as
        ImageBind does (an average of several clips is therefore slightly shorter than 1).
        """
        multi_clip = self._check_input(encoder_input, batch)
        if batch.is_floating_point():
            batch = batch.to(device=self.device, dtype=self.dtype)
        else:
            batch = batch.to(device=self.device)
        if multi_clip:
            items, clips = batch.shape[:2]
            batch = batch.flatten(0, 1)
        embeddings = self._embed_clips(encoder_input, batch)
        if multi_clip:
            embeddings = embeddings.view(items, clips, -1).mean(dim=1)
        return embeddings

    def _embed_clips(self, key: str, batch: Tensor) -> Tensor:
        """Preprocessor → trunk → head → L2 normalisation, for one modality.

        ImageBind's own postprocessors normalise and then multiply by a logit scale (audio 20,
        text ~14.3; vision has none). NExT-GPT feeds the normalised vector without the scale
        to its input projector. Rather than picking ``postprocessor[0]`` out of a module whose
        structure differs per modality (a bare ``Normalize`` for vision, a ``Sequential`` for
        the others), we skip the postprocessors and apply the same L2 normalisation ourselves:
        independent of how the postprocessors are assembled, and exactly ``Normalize(dim=-1)``.
        """
        model = self.model
        tokens = model.modality_preprocessors[key](**{key: batch})
        hidden = model.modality_trunks[key](**tokens["trunk"])
        pooled = model.modality_heads[key](hidden, **tokens["head"])
        return F.normalize(pooled, dim=-1, p=2)

    def _check_input(self, key: str, batch: Tensor) -> bool:
        """Validate a batch's shape; return whether it carries a clips dimension."""
        if key not in _CLIP_RANK:
            raise UnknownNameError("encoder input", key, list(_CLIP_RANK),
                                   hint="Use the modality spec's `encoder_input`")
        if not isinstance(batch, Tensor):
            raise TypeError(f"{key} batch must be a torch.Tensor, got {type(batch).__name__}")
        rank = _CLIP_RANK[key]
        shape = tuple(batch.shape)
        if key == "vision" and batch.ndim == 4:  # images: (B, 3, H, W)
            self._check_trailing(key, shape[1:], (3, _IMAGE_SIZE, _IMAGE_SIZE), "(B, 3, 224, 224)")
            return False
        if batch.ndim not in (rank + 1, rank + 2):
            raise ValueError(f"{key} batch has shape {shape}; expected {self._expected(key)}")
        multi_clip = batch.ndim == rank + 2
        item = shape[2:] if multi_clip else shape[1:]
        self._check_trailing(key, item, self._clip_shape(key), self._expected(key))
        if 0 in shape[: 2 if multi_clip else 1]:
            raise ValueError(f"{key} batch has shape {shape}: it holds no items or no clips")
        return multi_clip

    def _clip_shape(self, key: str) -> tuple[int, ...]:
        arch = self.arch
        if key == "vision":
            return (3, int(arch["video_frames"]), _IMAGE_SIZE, _IMAGE_SIZE)
        if key == "audio":
            return (1, int(arch["audio_num_mel_bins"]), int(arch["audio_target_len"]))
        return (_TEXT_CONTEXT,)

    def _expected(self, key: str) -> str:
        clip = ", ".join(str(d) for d in self._clip_shape(key))
        if key == "vision":
            return f"images (B, 3, 224, 224) or videos (B, clips, {clip})"
        if key == "audio":
            return f"(B, clips, {clip}) or (B, {clip})"
        return f"(B, {clip}) token ids"

    @staticmethod
    def _check_trailing(key: str, got: tuple[int, ...], want: tuple[int, ...], expected: str) -> None:
        if got != want:
            raise ValueError(f"{key} batch items have shape {got}, expected {want}: pass {expected}")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
ENCODERS: Registry[type[ImageBindEncoder]] = Registry("encoder")
ENCODERS.add("imagebind", ImageBindEncoder)


def build_encoder(config: EncoderConfig, base_dir: str | Path | None = None) -> ImageBindEncoder:
    """Build the encoder registered under ``config.name`` from ``config``.

    Raises:
        UnknownNameError: ``config.name`` is not registered (the message lists the names).
    """
    try:
        encoder_cls = ENCODERS.get(config.name)
    except UnknownNameError as exc:
        raise UnknownNameError("encoder", config.name, ENCODERS.names(),
                               hint="Fix `encoder.name` in the config") from exc
    return encoder_cls.from_config(config, base_dir=base_dir)

"""The decoder protocol and everything the diffusion decoders share.

A :class:`Decoder` wraps one diffusers pipeline and never forks it: text is encoded with the
pipeline's own prompt encoder, and generation calls the pipeline's public ``__call__`` with
``prompt_embeds=`` / ``negative_prompt_embeds=``. A subclass only says what differs for its
modality: which pipeline class it wraps, how its tiny components are built, which size options
the pipeline takes, how the pipeline's output becomes media values and how a media value becomes
a training sample.

Nothing here imports diffusers or transformers at module level; they are imported by the
methods that need them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from anygpt.config import DecodeOptions, DecoderConfig
from anygpt.dtypes import torch_dtype
from anygpt.errors import Cancelled, ConfigError, WeightsNotFoundError
from anygpt.options import Option, check_value, options_of
from anygpt.paths import looks_like_path, resolve_path
from anygpt.registry import Registry
from anygpt.seeding import fresh_seed
from anygpt.types import DecodeProgress
from anygpt.weightfiles import check_folder, is_size_mismatch
from anygpt.decoders import tiny

if TYPE_CHECKING:
    import threading

    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

__all__ = ["DECODERS", "DECODE_OPTIONS", "Decoder", "ClipConditionedDecoder", "register", "resolve_dtype",
           "image_tensor"]

logger = logging.getLogger(__name__)

DECODERS: Registry[type[Decoder]] = Registry("decoder")

#: The keyword options of :meth:`Decoder.decode`, declared once on :class:`DecodeOptions`.
DECODE_OPTIONS: Mapping[str, Option] = {opt.name: opt for opt in options_of(DecodeOptions)}

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def register(cls: type[Decoder]) -> type[Decoder]:
    """Class decorator: add a decoder class to :data:`DECODERS` under its ``name``."""
    DECODERS.add(cls.name, cls)
    return cls


def resolve_dtype(device: str | torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The weights dtype for ``device``: ``dtype`` on accelerators, always float32 on CPU.

    Half precision on CPU is slow and unsupported by some kernels, so it is replaced by float32
    (with a log message). ``None`` means float32.
    """
    dtype = torch.float32 if dtype is None else torch_dtype(dtype, "decoder dtype")
    if torch.device(device).type == "cpu" and dtype != torch.float32:
        logger.info("Decoders run in float32 on CPU; ignoring dtype %s.", dtype)
        return torch.float32
    return dtype


class Decoder:
    """A diffusion decoder: turns a conditioning tensor into images, audio clips or videos.

    The conditioning is the decoder's native text conditioning, of shape
    ``(batch, *condition_shape)``: what :meth:`encode_text` returns for a caption, and what the
    model's output projectors learn to produce from signal-token hidden states.

    Build one with :meth:`from_config` (or :func:`decoders.load_decoder`); a decoder is meant to
    be loaded once and reused. All weights are frozen.

    Attributes:
        name: registry name (``stable-diffusion``).
        modality: the media it produces (``image``, ``audio``, ``video``).
        pipeline: the wrapped diffusers pipeline.
        config: the config it was built from.
    """

    name: ClassVar[str]
    modality: ClassVar[str]
    #: diffusers class name of the wrapped pipeline.
    pipeline_class: ClassVar[str]
    #: transformers class name of the text encoder's config (read for :meth:`condition_shape_from_config`).
    text_config_class: ClassVar[str]
    #: extra keyword arguments for the pipeline's constructor and ``from_pretrained``.
    pipeline_kwargs: ClassVar[Mapping[str, Any]] = {}
    #: default sizes of the tiny random components; ``DecoderConfig.arch`` overrides keys.
    tiny_arch: ClassVar[Mapping[str, Any]]
    #: generation defaults used for decoders built from ``arch`` (where the pipeline's are too big).
    tiny_call_defaults: ClassVar[Mapping[str, Any]] = {}
    #: :meth:`decode` size option → the pipeline argument it sets.
    size_options: ClassVar[Mapping[str, str]] = {}
    #: the pipeline's ``output_type`` that :meth:`_to_media` converts.
    output_type: ClassVar[str]

    def __init__(self, pipeline: DiffusionPipeline, config: DecoderConfig):
        self.pipeline = pipeline
        self.config = config
        self._negative: torch.Tensor | None = None
        self._noise_scheduler: Any = None
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
        pipeline.set_progress_bar_config(disable=True)

    def __repr__(self) -> str:
        source = self.config.pretrained or "tiny random arch"
        return f"{type(self).__name__}({source!r}, condition_shape={self.condition_shape}, device={self.device})"

    # Construction --------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: DecoderConfig,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> Decoder:
        """Load ``config.pretrained`` (hub id or local directory) or build ``config.arch``.

        Args:
            config: the decoder's config.
            device: where to put the weights.
            dtype: weights dtype; default ``config.dtype`` on accelerators. Always float32 on CPU.

        Raises:
            WeightsNotFoundError: ``pretrained`` is neither a local pipeline directory nor a
                hub id available (in the cache, or online).
            ConfigError: ``arch`` has unknown keys or sizes the components cannot be built with.
        """
        dtype = resolve_dtype(device, config.dtype if dtype is None else dtype)
        start = time.perf_counter()
        if config.pretrained is not None:
            pipeline = cls._load_pipeline(config.pretrained, dtype)
        else:
            pipeline = cls._build_tiny_pipeline(config)
        decoder = cls(pipeline, config).to(device, dtype)
        decoder._check_condition_shape()
        logger.info("Decoder %r ready (%s) in %.1f s.", cls.name,
                    config.pretrained or "tiny random arch", time.perf_counter() - start)
        return decoder

    @classmethod
    def _pipeline_type(cls) -> type[DiffusionPipeline]:
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    @classmethod
    def _load_pipeline(cls, pretrained: str, dtype: torch.dtype) -> DiffusionPipeline:
        source = _resolve_source(pretrained)
        fix = (f"re-download or re-save the pipeline (save_pretrained), or check `pretrained` of decoder "
               f"{cls.name!r} in the config that names it")
        shapes = check_folder(source, what=f"weights of decoder {cls.name!r}", fix=fix)
        with _weights_errors(cls.name, source, "pipeline"):
            try:
                return cls._pipeline_type().from_pretrained(source, dtype=dtype, **cls.pipeline_kwargs)
            except (RuntimeError, ValueError) as exc:
                if not is_size_mismatch(exc):
                    raise
                raise WeightsNotFoundError(_mismatch_message(cls.name, source, shapes, exc, fix)) from exc

    @classmethod
    def _build_tiny_pipeline(cls, config: DecoderConfig) -> DiffusionPipeline:
        arch = cls.resolve_arch(config.arch)
        try:
            components = cls._tiny_components(arch, config.seed)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"decoder {cls.name!r} arch: cannot build the tiny components from "
                              f"{arch}: {exc}") from exc
        return cls._pipeline_type()(**components, **cls.pipeline_kwargs)

    @classmethod
    def resolve_arch(cls, arch: Mapping[str, Any] | None) -> dict[str, Any]:
        """``tiny_arch`` with the keys of ``arch`` overridden (lists become tuples).

        Raises:
            ConfigError: a key is not one of ``tiny_arch``'s, or a named choice is unknown.
        """
        arch = dict(arch or {})
        unknown = sorted(set(arch) - set(cls.tiny_arch))
        if unknown:
            raise ConfigError(f"decoder {cls.name!r} arch: unknown key(s) {', '.join(unknown)}; "
                              f"valid keys: {', '.join(sorted(cls.tiny_arch))}")
        resolved = {**cls.tiny_arch, **{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}}
        _check_choice(cls.name, "scheduler", resolved["scheduler"], tuple(tiny.SCHEDULERS))
        _check_choice(cls.name, "prediction_type", resolved["prediction_type"], PREDICTION_TYPES)
        return resolved

    @classmethod
    def _tiny_components(cls, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        """The pipeline's constructor arguments, each built with seeded random weights."""
        raise NotImplementedError

    # Conditioning shape --------------------------------------------------------------------

    @classmethod
    def condition_shape_from_config(cls, config: DecoderConfig) -> tuple[int, int]:
        """The conditioning shape ``config`` will give, without building or loading any weights.

        It is ``config.condition_shape`` where set (nothing is read). Otherwise, for ``arch``
        configs it follows from the tiny sizes; for ``pretrained`` ones only the text encoder's
        ``config.json`` and the tokenizer's ``tokenizer_config.json`` are read.
        """
        if config.condition_shape is not None:
            return tuple(config.condition_shape)
        if config.pretrained is None:
            arch = cls.resolve_arch(config.arch)
            return cls._condition_shape(cls._tiny_text_config(arch), arch["model_max_length"])
        source = _resolve_source(config.pretrained)
        with _weights_errors(cls.name, source, "text encoder config"):
            import transformers

            text_config = getattr(transformers, cls.text_config_class).from_pretrained(
                source, subfolder="text_encoder")
            max_length = _tokenizer_max_length(source, default=text_config.max_position_embeddings)
        return cls._condition_shape(text_config, max_length)

    def _check_condition_shape(self) -> None:
        declared = self.config.condition_shape
        if declared is not None and tuple(declared) != self.condition_shape:
            source = self.config.pretrained or "its arch"
            raise ConfigError(
                f"decoder {self.name!r} from {source!r} conditions on {_shape(self.condition_shape)} states, "
                f"but its config's condition_shape says {_shape(declared)}, which the output projector was "
                f"built for; set condition_shape to {list(self.condition_shape)} (and retrain or reconvert "
                f"the output projector), or point `pretrained` at the decoder the model was trained for")

    @property
    def condition_shape(self) -> tuple[int, int]:
        """Shape of one item's conditioning (SD-1.5: (77, 768); AudioLDM: (1, 512))."""
        return self._condition_shape(self.pipeline.text_encoder.config, self.pipeline.tokenizer.model_max_length)

    @staticmethod
    def _condition_shape(text_config: Any, max_length: int) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def _tiny_text_config(arch: dict[str, Any]) -> Any:
        raise NotImplementedError

    # Text conditioning ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """The decoder's native conditioning of ``captions``, exactly as its pipeline computes it.

        Returns:
            A tensor of shape ``(len(captions), *condition_shape)`` on the decoder's device.
        """
        if isinstance(captions, str) or not captions:
            raise ValueError("encode_text expects a non-empty list of captions, e.g. ['a photo of a cat']")
        embeds = self._encode_prompt(list(captions))
        return embeds.reshape(len(captions), *self.condition_shape)

    def _encode_prompt(self, captions: list[str]) -> torch.Tensor:
        """The pipeline's own prompt encoding of ``captions`` (no classifier-free guidance)."""
        raise NotImplementedError

    @property
    def negative_condition(self) -> torch.Tensor:
        """``encode_text([""])``, the unconditional embedding, computed once per decoder."""
        if self._negative is None:
            self._negative = self.encode_text([""])
        return self._negative

    def _pipeline_embeds(self, condition: torch.Tensor) -> torch.Tensor:
        """``condition`` as the pipeline's ``prompt_embeds`` argument expects it."""
        return condition

    def _unet_condition(self, condition: torch.Tensor) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for ``condition``."""
        return {"encoder_hidden_states": condition}

    # Generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        condition: torch.Tensor,
        *,
        negative_condition: torch.Tensor | None = None,
        seed: int | Sequence[int | None] | None = None,
        progress: bool = False,
        progress_label: str | None = None,
        on_progress: Callable[[DecodeProgress], None] | None = None,
        cancel: threading.Event | None = None,
        **options: Any,
    ) -> list[Any]:
        """Generate one media item per conditioning row.

        Args:
            condition: ``(batch, *condition_shape)``, e.g. :meth:`encode_text`'s output or an
                output projector's.
            negative_condition: the unconditional embedding for classifier-free guidance, with
                batch 1 or ``batch``; default :attr:`negative_condition` (the empty caption).
            seed: seeds a ``torch.Generator`` on the decoder's device; None draws fresh noise. A
                list gives one seed per row, so that each row matches a batch-1 call with it.
            progress: show the pipeline's progress bar.
            progress_label: the bar's label (e.g. ``image 1/2``); default: the modality. It is
                also the ``label`` of the :class:`~anygpt.types.DecodeProgress` events.
            on_progress: called after each denoising step with a
                :class:`~anygpt.types.DecodeProgress` (steps done, steps in all, seconds so
                far, and from them an ETA), from diffusers' per-step callback.
            cancel: an event that another thread may set to stop decoding: it is checked after
                each denoising step, and once it is set the call raises
                :class:`~anygpt.errors.Cancelled` there (no thread is left running).
            **options: any :class:`~anygpt.config.DecodeOptions` field (``steps``, ``guidance``,
                ``height``, ``width``, ``num_frames``, ``fps``, ``audio_length_s``); see
                :meth:`resolve_options` for the defaults. A ``guidance`` of 1 or less disables
                classifier-free guidance; options that do not apply to this modality are ignored.

        Returns:
            ``PIL.Image.Image`` (image), :class:`anygpt.types.Audio` (audio) or
            :class:`anygpt.types.Video` (video) items, one per row of ``condition``.

        Raises:
            ConfigError: an unknown option, or a value of the wrong type or out of range.
            ValueError: ``condition`` or ``negative_condition`` has the wrong shape.
            Cancelled: ``cancel`` was set.
        """
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{progress_label or self.modality}: stopped before decoding")
        condition = self._check_condition(condition, "condition")
        resolved = self.resolve_options(options)
        negative = None
        if resolved["guidance"] > 1.0:
            negative = self._negative_for(condition, negative_condition)
        self.pipeline.set_progress_bar_config(disable=not progress, desc=f"{progress_label or self.modality} · steps",
                                              leave=False)
        try:
            output = self.pipeline(
                prompt_embeds=self._pipeline_embeds(condition),
                negative_prompt_embeds=None if negative is None else self._pipeline_embeds(negative),
                num_inference_steps=resolved["steps"],
                guidance_scale=resolved["guidance"],
                generator=self._generator(seed, len(condition)),
                output_type=self.output_type,
                **self._size_arguments(resolved),
                **self._step_callback(progress_label or self.modality, resolved["steps"], on_progress, cancel),
            )
        except Cancelled:
            # The pipeline's own end-of-call cleanup did not run: offloaded models go back now.
            self.pipeline.maybe_free_model_hooks()
            raise
        return self._to_media(output, fps=resolved["fps"])

    def _step_callback(self, label: str, steps: int, on_progress: Callable[[DecodeProgress], None] | None,
                       cancel: threading.Event | None) -> dict[str, Any]:
        """The pipeline's per-step callback arguments reporting progress and honouring ``cancel``.

        ``callback_on_step_end`` where the pipeline has it (Stable Diffusion); the deprecated
        pipelines (AudioLDM, text-to-video) only have the legacy ``callback``/``callback_steps``.
        Raising from either stops the denoising loop at that step boundary.
        """
        if on_progress is None and cancel is None:
            return {}
        start, done = time.perf_counter(), 0

        def step_done() -> None:
            nonlocal done
            done += 1
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{label}: stopped after {min(done, steps)} of {steps} denoising steps")
            # Some schedulers (PNDM) run one step more than asked: it is not reported twice.
            if on_progress is not None and done <= steps:
                on_progress(DecodeProgress(self.modality, label, done, steps, time.perf_counter() - start))

        if "callback_on_step_end" in inspect.signature(self.pipeline.__call__).parameters:
            def on_step_end(pipeline: Any, index: int, timestep: Any, tensors: dict) -> dict:
                step_done()
                return {}  # no tensor is changed

            return {"callback_on_step_end": on_step_end}
        return {"callback": lambda index, timestep, latents: step_done(), "callback_steps": 1}

    def resolve_options(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every decode option a :meth:`decode` call with ``options`` uses.

        Each is the given value, else the config's, else (for decoders built from ``arch``)
        :attr:`tiny_call_defaults`; None left means the pipeline's own default (the model's
        native size).

        Raises:
            ConfigError: a name that is not a :class:`~anygpt.config.DecodeOptions` field (the
                message lists the valid ones), or a value of the wrong type or out of range.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(DECODE_OPTIONS))
        if unknown:
            raise ConfigError(f"decoder {self.name!r}: unknown decode option(s) {', '.join(unknown)}; "
                              f"valid options: {', '.join(DECODE_OPTIONS)}")
        resolved = {}
        for name, opt in DECODE_OPTIONS.items():
            value = options.get(name)
            if value is None:
                value = getattr(self.config, name)
            if value is None and self.config.pretrained is None:
                value = self.tiny_call_defaults.get(name)
            resolved[name] = check_value(opt, value, f"decode option {name!r}")
        return resolved

    def _check_condition(self, condition: torch.Tensor, name: str) -> torch.Tensor:
        shape = tuple(self.condition_shape)
        if not isinstance(condition, torch.Tensor) or condition.dim() != 3 or tuple(condition.shape[1:]) != shape:
            got = tuple(condition.shape) if isinstance(condition, torch.Tensor) else type(condition).__name__
            raise ValueError(f"{name} must be a tensor of shape (batch, {shape[0]}, {shape[1]}) for the "
                             f"{self.name!r} decoder, got {got}")
        return condition.to(self.device, self.dtype)

    def _negative_for(self, condition: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        if negative is None:
            negative = self.negative_condition
        else:
            negative = self._check_condition(negative, "negative_condition")
        if len(negative) not in (1, len(condition)):
            raise ValueError(f"negative_condition has batch {len(negative)}; expected 1 or {len(condition)} "
                             "(the batch of condition)")
        return negative.expand(len(condition), -1, -1)

    def _size_arguments(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline's size arguments (:attr:`size_options`) that have a value."""
        return {argument: resolved[option] for option, argument in self.size_options.items()
                if resolved[option] is not None}

    def _generator(self, seed: int | Sequence[int | None] | None,
                   batch: int) -> torch.Generator | list[torch.Generator] | None:
        """One generator for the batch, or one per row (each row's noise then equals that of a
        batch-1 call with its seed)."""
        if seed is None or isinstance(seed, int):
            return None if seed is None else torch.Generator(self.device).manual_seed(seed)
        seeds = list(seed)
        if len(seeds) != batch:
            raise ValueError(f"seed: {len(seeds)} seeds for a batch of {batch}; give one per row of condition "
                             "or a single integer")
        if all(s is None for s in seeds):
            return None
        return [torch.Generator(self.device).manual_seed(fresh_seed() if s is None else s) for s in seeds]

    def _to_media(self, output: Any, fps: float | None) -> list[Any]:
        """The pipeline's output (of :attr:`output_type`) as a list of media values."""
        raise NotImplementedError

    # Training ------------------------------------------------------------------------------

    def training_sample(self, value: Any, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """One loaded media value of :attr:`modality` as a :meth:`denoising_loss` sample.

        The sample is what the decoder's VAE encodes, in the range and at the size the decoder
        generates (images ``(3, H, W)`` and videos ``(3, F, H, W)`` in [-1, 1], mel spectrograms
        ``(1, T, mels)``), as a float32 CPU tensor without a batch dimension.

        Args:
            value: what ``anygpt.modalities.get_modality(modality).load`` returns for a file.
            options: decode options the sample is sized for, as a :meth:`decode` call with them
                would generate (e.g. ``{"num_frames": 4}``); None: the decoder's defaults.
        """
        raise NotImplementedError(f"decoder {self.name!r} does not turn {self.modality} media into "
                                  "training samples; implement training_sample")

    def denoising_loss(
        self,
        condition: torch.Tensor,
        samples: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The frozen UNet's denoising loss of ``samples`` under ``condition`` (DDPM training loss).

        Noise is added at one random timestep per item with the pipeline's noise schedule, and the
        UNet's prediction is compared (MSE) with the target of the scheduler's ``prediction_type``
        (the noise, the velocity or the clean latents). Gradients flow to ``condition``.

        Args:
            condition: ``(batch, *condition_shape)``, typically an output projector's output.
            samples: latents with the UNet's ``in_channels`` (``(B, C, h, w)``, or
                ``(B, C, F, h, w)`` for video), or a batch of :meth:`training_sample` outputs
                (media with the VAE's ``in_channels``), which are encoded with the frozen VAE
                first.
            generator: source of the noise, the timesteps and the VAE's latent sample.

        Returns:
            A scalar float32 tensor.
        """
        condition = self._check_condition(condition, "condition")
        latents = self._latents(samples, generator)
        if len(condition) != len(latents):
            raise ValueError(f"condition has batch {len(condition)} but samples have batch {len(latents)}")
        scheduler = self.noise_scheduler
        noise = _randn(latents.shape, generator, latents.device, latents.dtype)
        timesteps = _randint(scheduler.config.num_train_timesteps, len(latents), generator, latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self.pipeline.unet(noisy, timesteps, **self._unet_condition(condition)).sample
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return F.mse_loss(prediction.float(), target.float())

    @property
    def noise_scheduler(self) -> Any:
        """A ``DDPMScheduler`` with the pipeline scheduler's noise schedule, for training."""
        if self._noise_scheduler is None:
            from diffusers import DDPMScheduler

            self._noise_scheduler = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        return self._noise_scheduler

    @torch.no_grad()
    def _latents(self, samples: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        unet_channels = self.pipeline.unet.config.in_channels
        vae_channels = self.pipeline.vae.config.in_channels
        samples = samples.to(self.device, self.dtype)
        if samples.shape[1] == unet_channels:
            return samples
        if samples.shape[1] != vae_channels:
            raise ValueError(f"samples must have {unet_channels} channels (latents) or {vae_channels} "
                             f"(media for the VAE), got shape {tuple(samples.shape)}")
        if samples.dim() == 5:  # video (B, C, F, H, W): encode frame by frame
            batch, frames = samples.shape[0], samples.shape[2]
            flat = samples.transpose(1, 2).flatten(0, 1)
            latents = self._encode_media(flat, generator)
            return latents.unflatten(0, (batch, frames)).transpose(1, 2)
        return self._encode_media(samples, generator)

    def _encode_media(self, media: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        vae = self.pipeline.vae
        return vae.encode(media).latent_dist.sample(generator) * vae.config.scaling_factor

    # Speed ---------------------------------------------------------------------------------

    def optimize(self, *, compile: bool = False, channels_last: bool = False, backend: str = "inductor",
                 mode: str | None = None) -> Decoder:
        """Speed options for the denoising loop, through torch's and diffusers' public API.

        Args:
            compile: ``torch.compile`` the UNet: regionally (diffusers'
                ``compile_repeated_blocks``, each transformer block compiled once) where the model
                declares its repeated blocks, else as a whole. Compiling happens on the first call.
            channels_last: keep the UNet's and VAE's 4-D weights in channels-last memory order
                (faster convolutions on GPUs with tensor cores).
            backend, mode: passed to ``torch.compile`` (``mode`` only with inductor).
        """
        unet, vae = self.pipeline.unet, self.pipeline.vae
        if channels_last:
            for model in (unet, vae):
                model.to(memory_format=torch.channels_last)
        if compile:
            options = {"backend": backend, **({"mode": mode} if mode and backend == "inductor" else {})}
            blocks = set(getattr(unet, "_repeated_blocks", None) or ())
            if any(type(m).__name__ in blocks for m in unet.modules()):
                unet.compile_repeated_blocks(**options)
            else:
                unet.compile(**options)
        return self

    # Devices and saving --------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.dtype

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Decoder:
        """Move the weights; ``dtype`` is kept float32 on CPU (see :func:`resolve_dtype`)."""
        device = torch.device(device) if device is not None else self.device
        dtype = resolve_dtype(device, dtype if dtype is not None else self.dtype)
        if device != self.device or dtype != self.dtype:
            self.pipeline.to(device, dtype)
        if self._negative is not None:
            self._negative = self._negative.to(device, dtype)
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save the pipeline (``DiffusionPipeline.save_pretrained``); reload it with
        ``DecoderConfig(name=..., pretrained=directory)``."""
        directory = Path(directory)
        self.pipeline.save_pretrained(directory)
        return directory


class ClipConditionedDecoder(Decoder):
    """A decoder conditioned on CLIP text hidden states ``(tokenizer max length, hidden size)``
    through the UNet's cross-attention (Stable Diffusion, text-to-video)."""

    text_config_class = "CLIPTextConfig"

    @staticmethod
    def _condition_shape(text_config: Any, max_length: int) -> tuple[int, int]:
        return (int(max_length), int(text_config.hidden_size))

    @staticmethod
    def _tiny_text_config(arch: dict[str, Any]) -> Any:
        return tiny.text_config(arch, tiny.clip_text_config)

    @staticmethod
    def _tiny_text_components(arch: dict[str, Any], seed: int) -> dict[str, Any]:
        return {"text_encoder": tiny.clip_text_encoder(arch, seed),
                "tokenizer": tiny.clip_tokenizer(arch["model_max_length"])}

    def _encode_prompt(self, captions: list[str]) -> torch.Tensor:
        prompt_embeds, _ = self.pipeline.encode_prompt(captions, self.device, 1, False)
        return prompt_embeds

    def pixel_size(self, options: Mapping[str, Any] | None = None) -> tuple[int, int]:
        """``(height, width)`` of the frames :meth:`decode` generates with ``options`` (None: by
        default): the options' values, else the UNet's native size (its ``sample_size`` × the
        VAE's scale factor)."""
        options = self.resolve_options(options)
        native = int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)
        return options["height"] or native, options["width"] or native


# Helpers -----------------------------------------------------------------------------------


def _check_choice(decoder: str, key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"decoder {decoder!r} arch.{key}: must be one of {', '.join(valid)}, got {value!r}")


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(n) for n in shape)


def _resolve_source(pretrained: str) -> str:
    """``pretrained`` as a local pipeline directory or a hub id; a missing path raises early."""
    path = Path(resolve_path(pretrained, None))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise WeightsNotFoundError(
                f"{pretrained!r} is a directory but not a diffusers pipeline (it has no model_index.json). "
                "Point `pretrained` to a directory written by DiffusionPipeline.save_pretrained "
                "(or Decoder.save_pretrained), or to a hub id.")
        return str(path)
    if looks_like_path(pretrained):
        raise WeightsNotFoundError(
            f"decoder weights directory {pretrained!r} does not exist. Fix `pretrained` to point to a "
            "diffusers pipeline directory, or to a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5.")
    return pretrained


@contextlib.contextmanager
def _weights_errors(decoder: str, source: str, what: str) -> Iterator[None]:
    """Turn the ``OSError`` of a failed load into a :class:`WeightsNotFoundError` saying how to fix it."""
    try:
        yield
    except OSError as exc:
        if Path(source).is_dir():
            hint = ("The directory must hold a complete diffusers pipeline (model_index.json and one "
                    "subfolder per component), such as one written by save_pretrained.")
        else:
            hint = (f"{source!r} is not in the local Hugging Face cache and could not be downloaded. "
                    f"Download it where the hub is reachable (`huggingface-cli download {source}`), then "
                    "either copy the cache here and set HF_HUB_OFFLINE=1, or point `pretrained` to the "
                    "downloaded directory.")
        raise WeightsNotFoundError(f"Cannot load the {what} of decoder {decoder!r} from {source!r}: {exc}. "
                                   f"{hint}") from exc


def _mismatch_message(decoder: str, source: str, shapes: Mapping[Path, Mapping[str, tuple]], exc: BaseException,
                      fix: str) -> str:
    """Name the file holding the misshapen tensor diffusers reports, with both shapes."""
    text = " ".join(str(exc).split())
    match = re.search(r"(?:because|for) ([\w.]+)[: ].*?expected shape (?:torch\.Size\()?\[([\d, ]*)\]", text)
    key = match.group(1) if match else None
    files = [str(p) for p, found in shapes.items() if key in found] if key else []
    where = ", ".join(files) or source
    if match:
        found = next((shapes[Path(f)][key] for f in files), None)
        detail = (f"tensor {key!r} has shape {list(found) if found is not None else '?'} in the file, the model "
                  f"expects [{match.group(2)}]")
    else:
        detail = text[:300]
    return f"{where}: weights of decoder {decoder!r} do not fit its config: {detail}; {fix}"


def _tokenizer_max_length(source: str, default: int) -> int:
    """``model_max_length`` from the pipeline's ``tokenizer/tokenizer_config.json``."""
    from transformers.utils import cached_file

    path = cached_file(source, "tokenizer_config.json", subfolder="tokenizer")
    max_length = json.loads(Path(path).read_text()).get("model_max_length")
    # Tokenizers without a limit store a huge sentinel (transformers' VERY_LARGE_INTEGER).
    if not isinstance(max_length, int) or max_length > 1_000_000:
        return default
    return max_length


def image_tensor(image: Image.Image | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An image (PIL, or a uint8 ``(H, W, 3)`` array) as a ``(3, height, width)`` float32 tensor
    in [-1, 1], resized (bicubic) to ``size = (height, width)``: the range the VAEs encode."""
    import numpy as np
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    height, width = size
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def _randn(shape: torch.Size, generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def _randint(high: int, size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``size`` integers in ``[0, high)`` drawn on the generator's device, then moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.randint(0, high, (size,), generator=generator, device=source).to(device)

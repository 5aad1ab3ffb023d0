"""Memory plans: where each component lives for a GPU memory budget, and the peak to expect.

A plan is computed from the components' sizes, which come from the modules themselves: a loaded
pipeline's (:func:`pipeline_components`), or a real preset built on the meta device with its
public architectures (:func:`preset_components`, no download). :func:`plan_memory` tries, in
order, the plans that cost the least speed and keeps the first that fits:

1. ``resident``: everything on the GPU;
2. ``decoders offloaded``: the encoder, LLM and projectors stay on the GPU; each decoder lives
   on the CPU and moves to the GPU one sub-model at a time while it runs (diffusers'
   ``enable_model_cpu_offload``);
3. ``encoder on CPU``: the encoder also runs on the CPU, in float32 (it runs once per
   attached medium);
4. ``LLM split``: as 3, with as many of the LLM's layers on the GPU as fit and the rest on the
   CPU (an accelerate ``device_map``); decoders that still do not fit are offloaded layer by
   layer (``enable_sequential_cpu_offload``).

Working memory (activations, the KV cache) is estimated from each component's config and the
decode options; the estimate is labelled as such where it is printed. Video decoders decode
their VAE frame by frame (VAE slicing) in every plan but the first.

:func:`apply_plan` puts a loaded pipeline where a plan says, through accelerate and diffusers'
public offload API.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from anygpt.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


logger = logging.getLogger(__name__)

__all__ = ["GIB", "parse_memory", "ComponentMemory", "Placement", "MemoryPlan", "plan_memory",
           "pipeline_components", "preset_components", "apply_plan", "STRATEGIES"]

#: A gigabyte as GPU memory is quoted (a "24 GB" card holds 24 GiB): 2**30 bytes.
GIB = 2**30
#: What the CUDA context and the allocator's fragmentation take before any tensor: kept free.
RESERVED = int(0.75 * GIB)
STRATEGIES = ("resident", "decoders offloaded", "encoder on CPU", "LLM split")
#: Live activation tensors per feature map while a UNet step or VAE decode runs (an estimate:
#: a resnet block's input, output, norm and two convolutions, and SDPA attention's output).
_LIVE_MAPS = {"unet": 12, "vae": 6}

_UNITS = {"": GIB, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": GIB, "gb": GIB, "gib": GIB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(value: str | int | float) -> int:
    """``"24GB"``, ``"12 GiB"``, ``"11000MB"`` or a number of bytes → bytes.

    GB and GiB both mean 2**30 bytes, as GPU memory is quoted; a bare number is in GB.

    Raises:
        ConfigError: not a positive size.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"memory must be positive, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"memory {value!r}: give a size such as '24GB', '12GiB' or '11000MB'")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class ComponentMemory:
    """What one component needs.

    Attributes:
        name: ``encoder``, ``llm``, ``projectors`` or ``decoder/<modality>``.
        parts: weights bytes of each sub-model at the dtype it runs in (a decoder's ``unet``,
            ``vae``, ``text_encoder`` …; one entry for the others).
        working: estimated bytes of activations (and the LLM's KV cache) while it runs.
        largest_layer: weights bytes of its largest single layer (what sequential offload
            holds on the GPU at a time).
        sliced_working: ``working`` with VAE slicing, where it differs (video).
        layers: the LLM's decoder layers' bytes, in order (how a ``device_map`` splits it).
    """

    name: str
    parts: Mapping[str, int]
    working: int
    largest_layer: int
    sliced_working: int | None = None
    layers: tuple[int, ...] = ()

    @property
    def weights(self) -> int:
        return sum(self.parts.values())

    @property
    def largest_part(self) -> int:
        return max(self.parts.values(), default=0)


@dataclass(frozen=True)
class Placement:
    """Where a component lives under a plan.

    Attributes:
        where: ``gpu``, ``cpu``, ``cpu → gpu`` (moved in while it runs) or ``gpu + cpu`` (split).
        offload: ``none``, ``model`` (one sub-model on the GPU at a time), ``sequential`` (one
            layer at a time) or ``split`` (an LLM ``device_map``).
        resident: bytes it keeps on the GPU between uses.
        peak: bytes on the GPU while it runs (its own, on top of what stays resident).
        gpu_layers: for a split LLM, how many of its layers are on the GPU.
    """

    component: str
    where: str
    offload: str
    resident: int
    peak: int
    gpu_layers: int | None = None
    vae_slicing: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    """A plan: one :class:`Placement` per component, and the peak GPU memory to expect."""

    strategy: str
    budget: int
    placements: tuple[Placement, ...]
    peak: int
    fits: bool
    components: tuple[ComponentMemory, ...] = field(default=(), repr=False)

    def placement(self, component: str) -> Placement:
        for placement in self.placements:
            if placement.component == component:
                return placement
        raise KeyError(component)

    def max_decode_batch(self, component: str) -> int:
        """How many media items ``component`` (a ``decoder/<modality>``) may generate in one call:
        the plan's peak holds one item's working memory, and each further item needs as much
        again out of what the budget leaves (an estimate, as the working memory is)."""
        sizes = {c.name: c for c in self.components}
        if component not in sizes:
            raise KeyError(component)
        per_item = _working(sizes[component], self.placement(component).vae_slicing)
        headroom = self.budget - RESERVED - self.peak
        return 1 + max(0, headroom) // per_item if per_item > 0 else 1

    def format(self) -> str:
        """The plan as a table: each component's weights, where it lives, and the peaks."""
        sizes = {c.name: c for c in self.components}
        lines = [f"plan: {self.strategy} (budget {_gb(self.budget)}, of which {_gb(RESERVED)} kept free "
                 f"for the CUDA context)",
                 f"{'component':<16} {'weights':>9} {'working*':>9}  {'lives':<30} {'offload':<15} "
                 f"{'resident':>9} {'peak':>9}"]
        for p in self.placements:
            c = sizes.get(p.component)
            weights = _gb(c.weights) if c else "-"
            working = _gb(_working(c, p.vae_slicing)) if c else "-"
            where = p.where + (f" ({p.gpu_layers} layers on GPU)" if p.gpu_layers is not None else "")
            offload = p.offload + (" +slicing" if p.vae_slicing else "")
            lines.append(f"{p.component:<16} {weights:>9} {working:>9}  {where:<30} {offload:<15} "
                         f"{_gb(p.resident):>9} {_gb(p.peak):>9}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"expected peak: {_gb(self.peak + RESERVED)} with the reserve, "
                     f"{verdict} in {_gb(self.budget)}")
        lines.append("* working memory is estimated from the configs (activations, KV cache at the full context)")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GIB:.2f} GB"


def _working(component: ComponentMemory, sliced: bool) -> int:
    if sliced and component.sliced_working is not None:
        return component.sliced_working
    return component.working


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def plan_memory(components: list[ComponentMemory], budget: int | str) -> MemoryPlan:
    """The first of :data:`STRATEGIES` whose expected peak fits ``budget`` (else the last one,
    with ``fits=False``)."""
    budget = parse_memory(budget)
    available = budget - RESERVED
    plan = None
    for strategy in STRATEGIES:
        plan = _plan(strategy, components, budget, available)
        if plan.fits:
            return plan
    return plan


def _plan(strategy: str, components: list[ComponentMemory], budget: int, available: int) -> MemoryPlan:
    level = STRATEGIES.index(strategy)
    placements: dict[str, Placement] = {}
    for c in components:
        if c.name.startswith("decoder/"):
            continue
        if c.name == "encoder" and level >= 2:
            placements[c.name] = Placement(c.name, "cpu", "none", 0, 0)
        else:
            placements[c.name] = Placement(c.name, "gpu", "none", c.weights, c.working)
    decoders = [c for c in components if c.name.startswith("decoder/")]
    for c in decoders:
        if level == 0:
            placements[c.name] = Placement(c.name, "gpu", "none", c.weights, c.working)
        else:
            placements[c.name] = Placement(c.name, "cpu → gpu", "model", 0, c.largest_part + _working(c, True),
                                           vae_slicing=c.sliced_working is not None)
    if level == 3:
        _split_llm(placements, components, available)
        for c in decoders:  # what still does not fit goes layer by layer
            if _peak(placements) > available:
                placements[c.name] = Placement(c.name, "cpu → gpu", "sequential", 0,
                                               c.largest_layer + _working(c, True),
                                               vae_slicing=c.sliced_working is not None)
    ordered = tuple(placements[c.name] for c in components)
    peak = _peak(placements)
    return MemoryPlan(strategy, budget, ordered, peak, peak <= available, tuple(components))


def _peak(placements: Mapping[str, Placement]) -> int:
    """Everything resident, plus the largest extra of whatever runs (components run one at a time)."""
    resident = sum(p.resident for p in placements.values())
    return resident + max((p.peak for p in placements.values()), default=0)


def _split_llm(placements: dict[str, Placement], components: list[ComponentMemory], available: int) -> None:
    """Give the LLM as many of its layers on the GPU as leave room for the rest of the plan."""
    llm = next((c for c in components if c.name == "llm"), None)
    if llm is None or not llm.layers:
        return
    others = {k: v for k, v in placements.items() if k != "llm"}
    fixed = llm.weights - sum(llm.layers)  # embeddings, norm, head: kept on the GPU
    room = available - sum(p.resident for p in others.values()) - max(
        [p.peak for p in others.values()] + [llm.working]) - fixed
    count, used = 0, 0
    for size in llm.layers:
        if used + size > room:
            break
        count, used = count + 1, used + size
    placements["llm"] = Placement("llm", "gpu + cpu", "split", fixed + used, llm.working, gpu_layers=count)


# --------------------------------------------------------------------------------------------
# Component sizes
# --------------------------------------------------------------------------------------------
def _dtype_size(dtype: "torch.dtype") -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _bytes(module: "nn.Module", dtype: "torch.dtype | None", recurse: bool = True) -> int:
    """Weights bytes of ``module`` with its floating-point tensors in ``dtype`` (None: as they
    are); ``recurse=False``: its own tensors only, not its submodules'."""
    total = 0
    for tensor in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
        size = _dtype_size(dtype) if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def _largest_layer(module: "nn.Module", dtype: "torch.dtype | None") -> int:
    """Bytes of the module (``module`` or within it) with the most weights of its own."""
    return max(_bytes(sub, dtype, recurse=False) for sub in module.modules())


def _llm_memory(model: "nn.Module", dtype: "torch.dtype", context: int) -> ComponentMemory:
    config = model.config
    size = _dtype_size(dtype)
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * context * size
    # A prefill of the whole context: the MLP's widest activation, a few times over.
    intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
    prefill = 3 * intermediate * context * size + config.vocab_size * 4
    layers = _decoder_layers(model)
    return ComponentMemory("llm", {"llm": _bytes(model, dtype)}, kv + prefill, _largest_layer(model, dtype),
                           layers=tuple(_bytes(layer, dtype) for layer in layers))


def _decoder_layers(model: "nn.Module") -> list["nn.Module"]:
    """The transformer blocks of a causal LM: the longest ``ModuleList`` in it."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _diffusion_working(unet_config: Mapping, vae_config: Mapping, options: Mapping, dtype: "torch.dtype",
                       frames: int) -> tuple[int, int | None]:
    """Estimated activations of a denoising step (batch 2: classifier-free guidance) and of the
    VAE decode, ``(working, working with VAE slicing or None)``; sizes from the configs."""
    size = _dtype_size(dtype)
    scale = 2 ** (len(vae_config.get("block_out_channels", [1])) - 1)
    height = options.get("height") or unet_config.get("sample_size", 64) * scale
    width = options.get("width") or unet_config.get("sample_size", 64) * scale
    latent = (height // scale) * (width // scale)
    unet = 2 * unet_config["block_out_channels"][0] * latent * frames * size * _LIVE_MAPS["unet"]
    per_frame = vae_config["block_out_channels"][0] * height * width * size * _LIVE_MAPS["vae"]
    working = max(unet, per_frame * frames)
    return working, (max(unet, per_frame) if frames > 1 else None)


def _audio_geometry(options: Mapping, parts: Mapping[str, "nn.Module"]) -> dict[str, int]:
    """AudioLDM's mel spectrogram as the VAE's image: 100 frames a second (16 kHz, hop 160)
    high and the vocoder's mel bins wide."""
    seconds = float(options.get("audio_length_s") or 5.0)
    vocoder = parts.get("vocoder")
    mels = int(getattr(getattr(vocoder, "config", None), "model_in_dim", 64))
    return {"height": int(seconds * 100) // 8 * 8, "width": mels}


def _decoder_memory(modality: str, parts: Mapping[str, "nn.Module"], options: Mapping,
                    dtype: "torch.dtype") -> ComponentMemory:
    unet_config, vae_config = dict(parts["unet"].config), dict(parts["vae"].config)
    frames = int(options.get("num_frames") or 1) if modality == "video" else 1
    geometry = _audio_geometry(options, parts) if modality == "audio" else options
    working, sliced = _diffusion_working(unet_config, vae_config, geometry, dtype, frames)
    sizes = {name: _bytes(part, dtype) for name, part in parts.items()}
    largest = max(_largest_layer(part, dtype) for part in parts.values())
    return ComponentMemory(f"decoder/{modality}", sizes, working, largest, sliced)


def _components(encoder: "nn.Module", llm: "nn.Module", projectors: list["nn.Module"],
                decoders: Mapping[str, tuple[Mapping[str, "nn.Module"], Mapping, "torch.dtype"]],
                llm_dtype: "torch.dtype", context: int) -> list[ComponentMemory]:
    import torch

    half = torch.float16
    encoder_memory = ComponentMemory("encoder", {"encoder": _bytes(encoder, half)},
                                     _bytes(encoder, half) // 8, _largest_layer(encoder, half))
    projector_bytes = sum(_bytes(p, half) for p in projectors)
    components = [encoder_memory, _llm_memory(llm, llm_dtype, context),
                  ComponentMemory("projectors", {"projectors": projector_bytes}, projector_bytes // 4,
                                  max(_largest_layer(p, half) for p in projectors))]
    for modality, (parts, options, dtype) in decoders.items():
        components.append(_decoder_memory(modality, parts, options, dtype))
    return components


def _decoder_options(config: Any, modality: str) -> dict[str, Any]:
    from anygpt.config import DECODE_OPTIONS

    decoder = config.modalities[modality].decoder
    return {opt.name: getattr(decoder, opt.name, None) for opt in DECODE_OPTIONS}


def _weighted_parts(pipeline: Any) -> dict[str, "nn.Module"]:
    import torch

    return {name: part for name, part in pipeline.components.items() if isinstance(part, torch.nn.Module)}


def pipeline_components(pipe: Any) -> list[ComponentMemory]:
    """The sizes of a loaded :class:`~anygpt.pipeline.AnyGPTPipeline`'s components (its decoders
    are loaded to be measured)."""
    from anygpt.dtypes import torch_dtype

    model, config = pipe.model, pipe.config
    decoders = {}
    for modality in config.output_modalities:
        decoder = pipe.decoder(modality)
        decoders[modality] = (_weighted_parts(decoder.pipeline), _decoder_options(config, modality),
                              torch_dtype(config.modalities[modality].decoder.dtype, "decoder.dtype"))
    # As loaded: `from_pretrained(memory=...)` casts the LLM (to float16) before planning.
    return _components(model.encoder, model.lm.model, _projector_modules(model), decoders,
                       model.lm.dtype, model.lm.max_context)


def _projector_modules(model: Any) -> list["nn.Module"]:
    return [model.input_projectors, model.output_projectors]


def preset_components(name: str = "nextgpt-7b") -> list[ComponentMemory]:
    """The sizes of a real preset at full size, built on the meta device from the public
    architectures it names (no weights are read or downloaded)."""
    from anygpt.architectures import architecture_for, build_component, load_architecture
    from anygpt.config import AnyGPTConfig
    from anygpt.dtypes import torch_dtype
    from anygpt import realsize

    if name != realsize.PRESET:
        raise ConfigError(f"preset_components knows the full-size architectures of {realsize.PRESET!r} only; "
                          f"for {name!r}, load it and use pipeline_components")
    preset = AnyGPTConfig.from_name(name)
    with tempfile.TemporaryDirectory() as folder:
        config = realsize.full_size_config(realsize.vicuna_tokenizer(folder), llm_dtype=preset.llm.dtype)
        model = realsize.meta_model(config)
    decoders = {}
    for modality in preset.output_modalities:
        decoder = preset.modalities[modality].decoder
        specs = load_architecture(architecture_for(decoder.pretrained))["components"]
        with realsize.on_meta():
            parts = {part: build_component(spec) for part, spec in specs.items()
                     if part not in ("tokenizer", "scheduler", "safety_checker", "feature_extractor")}
        decoders[modality] = ({k: v for k, v in parts.items() if hasattr(v, "parameters")},
                              _decoder_options(preset, modality), torch_dtype(decoder.dtype, "decoder.dtype"))
    context = int(getattr(model.lm.model.config, "max_position_embeddings", 2048))
    return _components(model.encoder, model.lm.model, _projector_modules(model), decoders,
                       torch_dtype(preset.llm.dtype, "llm.dtype"), context)


# --------------------------------------------------------------------------------------------
# Applying a plan
# --------------------------------------------------------------------------------------------
def apply_plan(pipe: Any, plan: MemoryPlan, device: "str | torch.device" = "cuda") -> None:
    """Put an :class:`~anygpt.pipeline.AnyGPTPipeline`'s components where ``plan`` says, on
    ``device`` (a CUDA device).

    Decoders get diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``
    and, where planned, VAE slicing; an encoder planned on the CPU runs there in float32; a
    split LLM is dispatched with an accelerate ``device_map``.
    """
    import torch

    device = torch.device(device)
    for placement in plan.placements:
        if placement.component.startswith("decoder/"):
            _place_decoder(pipe.decoder(placement.component.split("/", 1)[1]), placement, device)
        elif placement.component == "encoder" and placement.where == "cpu":
            pipe.model.encoder.to("cpu", torch.float32)
        elif placement.component == "llm" and placement.offload == "split":
            _split_llm_onto(pipe.model.lm.model, placement.gpu_layers or 0, device)
        else:
            _module_of(pipe, placement.component).to(device)
    logger.info("memory plan %r applied: expected peak %s of %s", plan.strategy, _gb(plan.peak + RESERVED),
                _gb(plan.budget))


def _module_of(pipe: Any, component: str) -> "nn.Module":
    model = pipe.model
    if component == "projectors":
        return _module_list([model.input_projectors, model.output_projectors])
    return {"encoder": model.encoder, "llm": model.lm.model}[component]


def _module_list(modules: list["nn.Module"]) -> "nn.Module":
    import torch

    return torch.nn.ModuleList(modules)


def _place_decoder(decoder: Any, placement: Placement, device: "torch.device") -> None:
    pipeline = decoder.pipeline
    if placement.vae_slicing:
        pipeline.vae.enable_slicing()
    if placement.offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif placement.offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)


def llm_device_map(model: "nn.Module", gpu_layers: int, device: "torch.device") -> dict[str, Any]:
    """A ``device_map`` (non-overlapping module names → device) with the first ``gpu_layers``
    decoder layers, the embeddings, final norm and head on ``device`` and the other layers on
    the CPU."""
    layers = _decoder_layers(model)
    on_cpu = {id(layer) for layer in layers[gpu_layers:]}
    holders = {id(m) for m in model.modules() if any(id(s) in on_cpu for s in m.modules())}
    target = (device.index or 0) if device.type == "cuda" else str(device)
    device_map: dict[str, Any] = {}

    def visit(module: "nn.Module", prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if id(child) in on_cpu:
                device_map[path] = "cpu"
            elif id(child) in holders:
                visit(child, path + ".")
            else:
                device_map[path] = target
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise ConfigError("the LLM keeps weights outside its submodules; it cannot be split by layer")

    if not on_cpu:
        return {"": target}
    visit(model, "")
    return device_map


def _split_llm_onto(model: "nn.Module", gpu_layers: int, device: "torch.device") -> None:
    from accelerate import dispatch_model

    dispatch_model(model, device_map=llm_device_map(model, gpu_layers, device))

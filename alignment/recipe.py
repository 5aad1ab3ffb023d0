"""The alignment recipe: one training loop, three stages that differ by config only.

    anygpt train --config alignment/configs/stage2_decoding.yaml data.train=… optim.lr=1e-3
    accelerate launch --num_processes 2 -m anygpt.cli train --config … [--resume]

:func:`train` composes the parts: the model (:class:`~anygpt.pipeline.AnyGPTPipeline`), the
trainable set (:mod:`alignment.trainable`), the examples (:mod:`alignment.data`), the cached
decoder conditionings (:mod:`alignment.targets`), the loss terms (:mod:`alignment.objective`),
AdamW with a warmup + decay schedule, and ``accelerate`` for devices, DDP / DeepSpeed, mixed
precision, gradient accumulation and trackers (``logs/metrics.csv``, TensorBoard); FSDP
(``train.engine: fsdp``) is :mod:`alignment.fsdp`. Checkpoints are resumable and atomic
(:mod:`alignment.checkpointing`), and each one redraws ``loss.png`` and ``eval.png`` in the run
folder (:mod:`alignment.plots`); the result is a model directory that
``AnyGPTPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from anygpt.alignment.checkpointing import (Checkpointer, TrainState, check_room, check_writable, checkpoint_bytes,
                                            write_error)
from anygpt.alignment.config import TrainConfig, is_shard_source
from anygpt.alignment.data import AlignmentDataset, collate, read_manifest
from anygpt.alignment.fsdp import (FullStateAdamW, ShardedObjective, check_engine, full_weights, release,
                                   shard_objective, uses_fsdp)
from anygpt.alignment.optim import WarmupDecay
from anygpt.alignment.objective import AlignmentObjective, ConditionTargets, MediaTargets
from anygpt.alignment.plots import MetricHistory, RunPlots
from anygpt.alignment.shards import ShardStream, StreamBatcher, collate_raw, list_shards, stream_plan
from anygpt.alignment.targets import TargetCache
from anygpt.alignment.tracking import METRICS_FILE, build_trackers
from anygpt.alignment.trainable import TrainableParameters, configure_trainable, merge_into_model

if TYPE_CHECKING:
    from accelerate import Accelerator

    from anygpt.model import AnyGPTModel
    from anygpt.pipeline import AnyGPTPipeline

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "build_optimizer", "build_scheduler", "save_model", "EpochSampler"]

MODEL_DIR = "model"


@dataclass
class TrainResult:
    """What :func:`train` returns: the final model directory, the step reached, and the last
    evaluation metrics (empty without ``data.val``)."""

    model_dir: Path
    step: int
    metrics: dict[str, float]


@dataclass
class _Data:
    train: Dataset
    val: Dataset | None
    samples: list  # every caption row (train and val), for targets and denoising media
    train_items: list = dataclasses.field(default_factory=list)  # a shard stream's examples (targets only)


# =============================================================================================
# Entry point
# =============================================================================================


def train(config: TrainConfig, *, resume: bool | str | os.PathLike = False) -> TrainResult:
    """Run one stage of the recipe described by ``config``.

    Args:
        config: the stage config.
        resume: True: continue from the newest checkpoint under ``<output_dir>/checkpoints``; a
            path: from that checkpoint folder.

    Returns:
        The final model directory (``<output_dir>/model``), step and last evaluation metrics.

    Raises:
        ConfigError: ``output_dir`` is not writable, or has no room for one checkpoint.
        CheckpointError: a checkpoint cannot be written (disk full, no permission) or read back.
    """
    output = check_writable(config.output_dir)  # before minutes of model loading
    accelerator = _accelerator(config, output)
    torch.manual_seed(config.seed)
    pipe = _load_pipeline(config, accelerator)
    model = pipe.model
    trainable = configure_trainable(model, config.trainable, seed=config.seed)
    data = build_data(config, model, rank=accelerator.process_index, world_size=accelerator.num_processes)
    objective = AlignmentObjective(model, config.loss, extra=trainable.modules,
                                   frozen_prefix=config.train.frozen_prefix,
                                   prefix_cache_mb=config.train.prefix_cache_mb,
                                   **_output_side(config, pipe, data, accelerator))
    sharded = _shard(config, objective, trainable, accelerator)
    optimizer = build_optimizer(trainable, config, FullStateAdamW if sharded is not None else torch.optim.AdamW)
    if config.checkpoint.every:
        check_room(output, checkpoint_bytes(trainable, optimizer))
    scheduler = build_scheduler(optimizer, config)
    # An FSDP root is not given to accelerate, which would wrap it in DDP.
    models = [objective] if sharded is None else []
    if isinstance(data.train, ShardStream):
        # Not through accelerator.prepare: the stream already gives each process its own shards.
        *prepared, optimizer, scheduler = accelerator.prepare(*models, optimizer, scheduler)
        batches = functools.partial(_stream_batches, config, data.train, model, accelerator)
    else:
        loader, sampler = _train_loader(config, data.train, model)
        *prepared, optimizer, loader, scheduler = accelerator.prepare(*models, optimizer, loader, scheduler)
        batches = functools.partial(_batches, loader, sampler, accelerator)
    prepared = sharded if sharded is not None else prepared[0]
    checkpointer = Checkpointer(accelerator, output / "checkpoints", trainable, config, keep=config.checkpoint.keep)
    if resume:
        state = checkpointer.load(None if resume is True else Path(resume))
    else:
        state = TrainState(num_processes=accelerator.num_processes, batch_size=config.train.batch_size,
                           grad_accum=config.train.grad_accum)
    if accelerator.is_main_process:
        config.to_yaml(_mkdir(output) / "train_config.yaml")
    plots = _plots(config, output, accelerator, state.step if resume else None)
    loop = _Loop(config, accelerator, prepared, objective, optimizer, scheduler, trainable, checkpointer, plots)
    metrics = loop.run(batches(state.batches), state, data.val)
    card = {"training": _training_summary(config, state.step), "metrics": metrics}
    if sharded is not None:
        release(sharded, trainable)  # whole tensors again, to merge and save
    model_dir = save_model(pipe, trainable, output / MODEL_DIR, accelerator, card=card)
    accelerator.end_training()
    return TrainResult(model_dir=model_dir, step=state.step, metrics=metrics)


def _accelerator(config: TrainConfig, output: Path) -> "Accelerator":
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        from anygpt.errors import ConfigError

        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    logging_dir = output / "logs"
    accelerator = Accelerator(
        cpu=_distributed_without_gpu(),
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.train.grad_accum,
                                                                sync_with_dataloader=False),
        # A batch may lack a modality, leaving its projector unused in that step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the world size
        log_with=build_trackers(config.log.trackers, logging_dir),
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(logging_dir)),
    )
    check_engine(config.train.engine, accelerator)
    if accelerator.trackers is not None:
        accelerator.init_trackers("alignment", config={"stage": config.stage, "lr": config.optim.lr,
                                                       "batch_size": config.train.batch_size})
    return accelerator


def _shard(config: TrainConfig, objective: AlignmentObjective, trainable: TrainableParameters,
           accelerator: "Accelerator") -> "ShardedObjective | None":
    """The FSDP root when ``train.engine: fsdp`` runs on several processes, else None."""
    if uses_fsdp(config.train.engine, accelerator):
        return shard_objective(objective, trainable, accelerator)
    if config.train.engine == "fsdp":
        logger.info("train.engine=fsdp on one process: nothing to shard, training unsharded")
    return None


def _plots(config: TrainConfig, output: Path, accelerator: "Accelerator", resumed_at: int | None) -> RunPlots | None:
    """The run's pictures (main process, ``log.plots``); a resumed run's history starts with the
    metrics its earlier part logged to ``logs/metrics.csv`` up to the checkpoint's step."""
    if not (config.log.plots and accelerator.is_main_process):
        return None
    history = MetricHistory()
    if resumed_at is not None:
        history = MetricHistory.from_csv(output / "logs" / METRICS_FILE, up_to=resumed_at)
    return RunPlots(output, history)


def _distributed_without_gpu() -> bool:
    """True when launched as several processes (torchrun / ``accelerate launch --multi_gpu``) on a
    machine without CUDA: accelerate then needs ``cpu=True`` to set up a gloo process group;
    otherwise every process would silently train alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _load_pipeline(config: TrainConfig, accelerator: "Accelerator") -> "AnyGPTPipeline":
    from anygpt.pipeline import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained(config.model, device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# =============================================================================================
# Data
# =============================================================================================


def build_data(config: TrainConfig, model: "AnyGPTModel", *, rank: int = 0, world_size: int = 1) -> _Data:
    """The stage's training and validation datasets (and the caption rows behind them).

    ``data.train`` as WebDataset shards gives a :class:`ShardStream` of process ``rank`` of
    ``world_size``; a manifest, an :class:`AlignmentDataset`.
    """
    stage, modalities = config.stage, config.data.modalities
    captions: list = []
    if is_shard_source(config.data.train):
        train: Dataset = _shard_stream(config, model, rank, world_size)
    else:
        train_rows = read_manifest(config.data.train, on_error=config.data.on_error)
        train = AlignmentDataset(train_rows, stage, model, modalities=modalities)
        captions += [s for s in train_rows if s.caption is not None]
    if config.data.decoding_train:
        rows = read_manifest(config.data.decoding_train, on_error=config.data.on_error)
        train = ConcatDataset([train, AlignmentDataset(rows, 2, model)])
        captions += rows
    val = None
    if config.data.val:
        val_rows = read_manifest(config.data.val, on_error=config.data.on_error)
        val = AlignmentDataset(val_rows, stage, model, modalities=modalities)
        captions += [s for s in val_rows if s.caption is not None]
    if not isinstance(train, ShardStream):
        logger.info("stage %d: %d training and %d validation examples", stage, len(train), len(val) if val else 0)
    return _Data(train=train, val=val, samples=captions)


def _shard_stream(config: TrainConfig, model: "AnyGPTModel", rank: int, world_size: int) -> ShardStream:
    shards = list_shards(config.data.train)
    decode, keep = stream_plan(model, config.stage, config.data.modalities)
    stream = ShardStream(shards, batch_size=config.train.batch_size, decode=decode, keep=keep, rank=rank,
                         world_size=world_size, seed=config.seed, shuffle_buffer=config.data.shuffle_buffer)
    logger.info("stage %d: %d samples in %d shard(s), %d per process in epoch 0", config.stage,
                sum(s.count for s in shards), len(shards), stream.samples_per_epoch(0))
    return stream


class EpochSampler(Sampler[int]):
    """A random order per epoch, a pure function of ``(seed, epoch)``: resuming mid-epoch
    replays exactly the order an uninterrupted run would have used."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def _pad_id(model: "AnyGPTModel") -> int:
    tokenizer = model.lm.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _train_loader(config: TrainConfig, dataset: Dataset, model: "AnyGPTModel") -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(len(dataset), config.seed)
    loader = DataLoader(dataset, batch_size=config.train.batch_size, sampler=sampler,
                        collate_fn=functools.partial(collate, pad_id=_pad_id(model)),
                        num_workers=config.data.num_workers,
                        # worker seeds come from this generator, not the global RNG (exact resume)
                        generator=torch.Generator().manual_seed(config.seed))
    return loader, sampler


def eval_loader(dataset: Dataset, model: "AnyGPTModel", batch_size: int) -> DataLoader:
    """Batches of ``dataset`` in order (evaluation)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      collate_fn=functools.partial(collate, pad_id=_pad_id(model)))


def _batches(loader: DataLoader, sampler: EpochSampler, accelerator: "Accelerator",
             consumed: int) -> Iterator[dict]:
    """An endless stream of micro-batches, starting after the first ``consumed`` ones."""
    per_epoch = len(loader)
    if per_epoch == 0:
        from anygpt.errors import ConfigError

        raise ConfigError("the training set gives no batch; add rows or lower train.batch_size")
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        current = accelerator.skip_first_batches(loader, skip) if skip else loader
        current.set_epoch(epoch)
        yield from current
        epoch, skip = epoch + 1, 0


def _stream_batches(config: TrainConfig, stream: ShardStream, model: "AnyGPTModel", accelerator: "Accelerator",
                    consumed: int) -> Iterator[dict]:
    """An endless stream of micro-batches from shards, starting after the first ``consumed``: the
    workers decode and preprocess, the main process encodes (:class:`StreamBatcher`)."""
    from accelerate.utils import send_to_device

    batcher = StreamBatcher(model, config.stage, _pad_id(model), config.data.modalities)
    epoch, skip = stream.locate(consumed)
    while True:
        stream.set_position(epoch, skip)  # before iter(): the workers take a copy of the stream
        loader = DataLoader(stream, batch_size=config.train.batch_size, collate_fn=collate_raw,
                            num_workers=config.data.num_workers,
                            # the loader's seed comes from this generator, not the global RNG (exact resume)
                            generator=torch.Generator().manual_seed(config.seed))
        for raw in loader:
            yield send_to_device(batcher(raw), accelerator.device)
        epoch, skip = epoch + 1, 0


# =============================================================================================
# Output-side targets
# =============================================================================================


def _output_side(config: TrainConfig, pipe: "AnyGPTPipeline", data: _Data,
                 accelerator: "Accelerator") -> dict[str, Any]:
    """The objective's conditioning targets, decoders and denoising media, as the config needs."""
    kwargs: dict[str, Any] = {}
    if config.loss.condition_mse == 0 and config.loss.denoising == 0:
        return kwargs  # a shard set's captions are not read for nothing
    if isinstance(data.train, ShardStream):
        # The stream's examples, as the batcher builds them, for the targets built up front.
        rows = data.train.caption_samples()
        data.train_items = AlignmentDataset(rows, config.stage, pipe.model, modalities=config.data.modalities,
                                            encode_batch_size=None).items
    modalities = _captioned_output_modalities(data)
    if config.loss.condition_mse > 0 and modalities:
        kwargs["targets"] = build_targets(config, pipe, data, modalities, accelerator)
    denoise = [m for m in config.loss.denoising_modalities if m in modalities]
    if config.loss.denoising > 0 and denoise:
        kwargs["decoders"] = {m: pipe.decoder(m) for m in denoise}
        kwargs["media"] = MediaTargets(data.samples, kwargs["decoders"])
    return kwargs


def _items(dataset: Dataset | None) -> list:
    if dataset is None:
        return []
    if isinstance(dataset, ConcatDataset):
        return [item for part in dataset.datasets for item in _items(part)]
    return list(getattr(dataset, "items", []))


def _captioned_output_modalities(data: _Data) -> dict[str, list[str]]:
    """Output modality → every caption an example asks it for (training and validation)."""
    found: dict[str, list[str]] = defaultdict(list)
    for item in data.train_items + _items(data.train) + _items(data.val):
        if item.output_modality is not None and item.caption is not None:
            found[item.output_modality].append(item.caption)
    return {m: list(dict.fromkeys(c)) for m, c in found.items()}


def build_targets(config: TrainConfig, pipe: "AnyGPTPipeline", data: _Data, modalities: dict[str, list[str]],
                  accelerator: "Accelerator") -> ConditionTargets:
    """Encode every caption once with each decoder's text encoder, split across the processes.

    Every process loads the decoders and encodes its slice of the missing captions into its own
    shards; the main process merges the index (:meth:`TargetCache.build` with the accelerator).
    Targets are stored in ``data.target_dtype`` (default each decoder's dtype), in shards of at
    most ``data.target_shard_size`` rows.
    """
    directory = Path(config.data.target_cache or Path(config.output_dir) / "targets")
    cache = TargetCache(directory)
    layout = {"dtype": config.data.target_dtype}
    if config.data.target_shard_size is not None:
        layout["shard_size"] = config.data.target_shard_size
    start, built = time.perf_counter(), 0
    decoder_ids = {}
    for modality, captions in modalities.items():
        decoder = pipe.decoder(modality)
        decoder_ids[modality] = TargetCache.decoder_id(decoder)
        built += cache.build(decoder, captions, accelerator=accelerator, **layout)
    if accelerator.is_main_process:
        logger.info("target cache %s: %d new of %d caption targets in %.1f s on %d process(es)", directory, built,
                    sum(map(len, modalities.values())), time.perf_counter() - start, accelerator.num_processes)
    return ConditionTargets(cache, decoder_ids)


# =============================================================================================
# Optimizer and schedule
# =============================================================================================


def build_optimizer(trainable: TrainableParameters, config: TrainConfig,
                    kind: type[torch.optim.AdamW] = torch.optim.AdamW) -> torch.optim.Optimizer:
    """AdamW (or the subclass ``kind``) with one group per trainable part; the signal-embedding
    group never decays."""
    optim = config.optim
    groups = []
    for name, params in trainable.groups.items():
        decay = 0.0 if name == "signal_embeddings" else optim.weight_decay
        groups.append({"params": [p for _, p in params], "lr": optim.group_lr.get(name, optim.lr),
                       "weight_decay": decay, "name": name})
    return kind(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The config's schedule over ``train.max_steps`` optimizer steps."""
    s = config.schedule
    factor = WarmupDecay(s.name, s.warmup_steps, config.train.max_steps, s.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# =============================================================================================
# The loop
# =============================================================================================


class _Meter:
    """Running means of the metrics since the last report."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, metrics: dict[str, torch.Tensor], weight: int = 1) -> None:
        for key, value in metrics.items():
            self.sums[key] += float(value) * weight
            self.counts[key] += weight

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: self.sums[k] / self.counts[k] for k in self.sums}


class _Loop:
    """The training loop of one run (see :func:`train`)."""

    def __init__(self, config: TrainConfig, accelerator: "Accelerator", prepared: torch.nn.Module,
                 objective: AlignmentObjective, optimizer, scheduler, trainable: TrainableParameters,
                 checkpointer: Checkpointer, plots: RunPlots | None = None):
        self.config, self.acc, self.prepared, self.objective = config, accelerator, prepared, objective
        self.optimizer, self.scheduler, self.trainable, self.checkpointer = optimizer, scheduler, trainable, checkpointer
        self.plots = plots
        self.params = [p for _, p in trainable.named_parameters()]

    def run(self, batches: Iterator[dict], state: TrainState, val: Dataset | None) -> dict[str, float]:
        """Train until ``train.max_steps``; returns the last evaluation metrics."""
        cfg, acc = self.config, self.acc
        progress = _progress(cfg, acc, state.step)
        meter, last_eval, start = _Meter(), {}, time.perf_counter()
        self._train_mode()
        while state.step < cfg.train.max_steps:
            meter.update(self._micro_step(next(batches), state))
            if not acc.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % cfg.log.every == 0 or state.step == cfg.train.max_steps:
                self._log(meter, state, start, progress)
                meter, start = _Meter(), time.perf_counter()
            if val is not None and cfg.eval.every and state.step % cfg.eval.every == 0:
                last_eval = self._evaluate(val, state.step)
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                self.checkpointer.save(state)
                self._show()
        progress.close()
        if val is not None and not (cfg.eval.every and state.step % cfg.eval.every == 0):
            last_eval = self._evaluate(val, state.step)
        self._show()
        return last_eval

    def _show(self) -> None:
        """Make what was logged visible now: flush TensorBoard's events (its writer otherwise
        waits up to two minutes) and redraw the plots."""
        if not self.acc.is_main_process:
            return
        for tracker in self.acc.trackers or ():
            if tracker.name == "tensorboard":
                tracker.tracker.flush()
        if self.plots is not None:
            self.plots.write()

    def _train_mode(self) -> None:
        self.prepared.train()
        self.objective.model.encoder.eval()  # frozen; no dropout or statistics updates

    def _micro_step(self, batch: dict, state: TrainState) -> dict[str, torch.Tensor]:
        acc, cfg = self.acc, self.config
        noise_seed = (cfg.seed * 1_000_003 + state.batches * acc.num_processes + acc.process_index) % 2**63
        state.batches += 1
        with acc.accumulate(self.prepared):
            metrics = self.prepared(**batch, noise_seed=noise_seed)
            acc.backward(metrics["loss"])
            if acc.sync_gradients and cfg.optim.max_grad_norm:
                acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in metrics.items()}

    def _log(self, meter: _Meter, state: TrainState, start: float, progress) -> None:
        acc = self.acc
        values = meter.means("train/")
        loss = torch.tensor(values.get("train/loss", 0.0), device=acc.device)
        values["train/loss"] = float(acc.reduce(loss, reduction="mean"))
        for group in self.optimizer.param_groups:
            values[f"lr/{group.get('name', 'default')}"] = group["lr"]
        values["train/steps_per_s"] = self.config.log.every / max(time.perf_counter() - start, 1e-9)
        acc.log(values, step=state.step)
        if self.plots is not None:
            self.plots.history.add(values, state.step)
        progress.set_postfix(loss=f"{values['train/loss']:.4f}")
        logger.info("step %d: %s", state.step, _format(values))

    def _evaluate(self, val: Dataset, step: int) -> dict[str, float]:
        """Mean loss terms on the validation set, computed on the main process."""
        acc, metrics = self.acc, {}
        acc.wait_for_everyone()
        with full_weights(self.prepared):  # FSDP: the main process evaluates with whole tensors
            if acc.is_main_process:
                metrics = evaluate_objective(self.objective, val, self.config.eval.batch_size,
                                             self.config.eval.max_batches, acc)
                acc.log(metrics, step=step)
                if self.plots is not None:
                    self.plots.history.add(metrics, step)
                logger.info("eval at step %d: %s", step, _format(metrics))
        acc.wait_for_everyone()
        self._train_mode()
        return metrics


def evaluate_objective(objective: AlignmentObjective, dataset: Dataset, batch_size: int = 16,
                       max_batches: int | None = None, accelerator: "Accelerator | None" = None) -> dict[str, float]:
    """Mean of every loss term over ``dataset`` (weighted by batch size), prefixed ``eval/``."""
    from accelerate.utils import send_to_device

    objective.eval()
    meter = _Meter()
    device = objective.model.device
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        for index, batch in enumerate(eval_loader(dataset, objective.model, batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            metrics = objective(**send_to_device(batch, device), noise_seed=index)
            for key, value in metrics.items():
                meter.update({key: value}, weight=_weight(key, batch))
    return meter.means("eval/")


def _weight(key: str, batch: dict) -> int:
    """How many examples a batch metric averages over: the runs of its modality for per-modality
    terms (``condition_mse/image``), else the batch size."""
    if "/" not in key:
        return len(batch["input_ids"])
    modality = key.rsplit("/", 1)[1]
    return sum(m == modality and c is not None for m, c in zip(batch["output_modalities"], batch["captions"]))


def _progress(config: TrainConfig, accelerator: "Accelerator", initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.train.max_steps, initial=initial, desc=config.log.name or f"stage {config.stage}",
                disable=not (accelerator.is_main_process and config.log.progress_bar), dynamic_ncols=True)


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))


# =============================================================================================
# The final model
# =============================================================================================


def _training_summary(config: TrainConfig, steps: int) -> dict[str, Any]:
    """What the model card says trained the model."""
    data = [p for p in (config.data.train, config.data.decoding_train) if p]
    return {"recipe stage": config.stage, "started from": config.model, "training data": data,
            "validation data": config.data.val or "none", "steps": steps,
            "batch size": config.train.batch_size * config.train.grad_accum, "learning rate": config.optim.lr}


def save_model(pipe: "AnyGPTPipeline", trainable: TrainableParameters, directory: Path,
               accelerator: "Accelerator | None" = None, card: dict[str, Any] | None = None) -> Path:
    """Fold the trained signal rows into the embedding matrices, merge LoRA into the LLM, and
    write a model directory that ``AnyGPTPipeline.from_pretrained`` loads.

    The main process writes it with :func:`anygpt.checkpoint.save_model_directory` (atomically:
    a temporary sibling renamed into place). When LoRA changed an LLM that the directory only
    references (a hub id, a path or a package), the LoRA factors are saved (megabytes) and merged
    again at load time, rather than the whole LLM. ``card`` adds ``training`` and ``metrics`` to
    the directory's model card.
    """
    from anygpt.checkpoint import save_model_directory

    if accelerator is not None:
        accelerator.wait_for_everyone()
    lora = merge_into_model(pipe.model, trainable)
    if accelerator is None or accelerator.is_main_process:
        # Only decoders built from `arch` are written; pretrained ones are referenced, not loaded.
        decoders = {m: pipe.decoder(m) for m in pipe.config.output_modalities
                    if pipe.config.modalities[m].decoder.pretrained is None}
        try:
            save_model_directory(pipe.model, directory, decoders=decoders, base_dir=pipe.base_dir, llm_lora=lora,
                                 card=card)
        except Exception as exc:  # the partial directory is already removed
            error = write_error(exc, Path(directory).parent, f"the trained model {directory}")
            if error is None:
                raise
            raise error from exc
        logger.info("saved the trained model to %s", directory)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return directory

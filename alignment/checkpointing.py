"""Resumable, atomic training checkpoints.

A checkpoint folder ``<output_dir>/checkpoints/checkpoint-<step>`` holds:

* ``trainable.safetensors`` — the trainable tensors only (projectors, LoRA adapters, the signal
  rows of the embedding matrices), never the frozen model;
* ``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl`` — written by
  ``accelerator.save_state`` (DeepSpeed: its own sharded files);
* ``train_state.json`` — the step and the data position (micro-batches consumed);
* ``train_config.yaml`` — the config it was trained with.

It is written to a hidden temporary folder and renamed when complete, so an interrupted save
never leaves a checkpoint that looks valid. ``--resume`` picks the newest complete one;
``--resume-from`` names one.

Faults end in a :class:`~anygpt.errors.CheckpointError` that names the file or folder and what to
do: a full disk, a folder without write permission or on a read-only disk (the partial checkpoint
is removed; earlier ones stay intact), or a missing or corrupt file on resume (the message names
the newest earlier checkpoint that loads). :func:`check_writable` and :func:`check_room` check
the output folder before training starts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from anygpt.errors import AnyGPTError, CheckpointError, ConfigError, WeightsNotFoundError
from anygpt.weightfiles import read_safetensors, read_torch_file

from anygpt.alignment.config import TrainConfig, is_shard_source
from anygpt.alignment.trainable import TrainableParameters

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

__all__ = ["TrainState", "Checkpointer", "latest_checkpoint", "checkpoint_problem", "last_good_checkpoint",
           "write_error", "check_writable", "check_room", "checkpoint_bytes",
           "TRAINABLE_FILE", "STATE_FILE", "CONFIG_FILE"]

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.yaml"
_NAME = re.compile(r"^checkpoint-(\d+)$")
#: The files accelerate writes besides ours (DeepSpeed writes its own, which are not checked).
_STATE_PATTERNS = (("optimizer*.bin", "optimizer state"), ("scheduler*.bin", "scheduler state"),
                   ("random_states_*.pkl", "random-number-generator state"), ("scaler.pt", "gradient-scaler state"))
#: errno → the words its error has in an OSError's or a library's message.
_WRITE_ERRNOS = {code: os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                                       errno.EROFS)}
#: torch.save's writer (PyTorchStreamWriter) reports a failed write without its errno.
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos")
#: What a checkpoint holds besides the tensors (RNG states, schedule, JSON and YAML).
_CHECKPOINT_OVERHEAD = 1 << 20


@dataclass
class TrainState:
    """Where training is: optimizer steps done and micro-batches consumed (per process), and the
    layout that consumed them (``batch_size`` / ``grad_accum`` 0: not recorded, older checkpoints)."""

    step: int = 0
    batches: int = 0
    num_processes: int = 1
    batch_size: int = 0
    grad_accum: int = 0


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (None if there is none)."""
    found = _checkpoints(Path(directory))
    return found[-1] if found else None


def _checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _step(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def _read_state(path: Path) -> TrainState:
    """The ``train_state.json`` of checkpoint ``path``.

    Raises:
        CheckpointError: the file is missing, not JSON, or lacks the fields of :class:`TrainState`.
    """
    file = path / STATE_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: no such file (train state)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: train state: the file is corrupt or truncated, not JSON ({exc})") from exc
    names = {f.name for f in fields(TrainState)}
    if not (isinstance(data, dict) and set(data) <= names and all(isinstance(v, int) for v in data.values())):
        raise CheckpointError(f"{file}: train state: the file is corrupt (expected integers "
                              f"{', '.join(sorted(names))}, got {str(data)[:120]})")
    return TrainState(**data)


def _probe(file: Path, what: str) -> None:
    """Read ``file`` as resuming would; raises WeightsNotFoundError naming it when it cannot be read."""
    if file.suffix == ".safetensors":
        read_safetensors(file, what=what, fix="the checkpoint is damaged")
        return
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    # accelerate loads these with numpy's RNG types allowed; so must the check.
    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        read_torch_file(file, what=what, fix="the checkpoint is damaged")


def checkpoint_problem(path: str | os.PathLike, rank: int | None = None) -> str | None:
    """What keeps checkpoint ``path`` from loading: the first missing or unreadable file and why
    (None when every file reads). ``rank``: check only that process's RNG file (default: all)."""
    path = Path(path)
    try:
        _read_state(path)
        if not (path / TRAINABLE_FILE).is_file():
            return f"{path / TRAINABLE_FILE}: no such file (trainable weights)"
        _probe(path / TRAINABLE_FILE, "trainable weights")
        for pattern, what in _STATE_PATTERNS:
            if rank is not None and pattern.startswith("random_states"):
                pattern = f"random_states_{rank}.pkl"
            for file in sorted(path.glob(pattern)):
                _probe(file, what)
    except (CheckpointError, WeightsNotFoundError) as exc:
        return str(exc)
    return None


def last_good_checkpoint(directory: str | os.PathLike, before: Path | None = None) -> Path | None:
    """The newest checkpoint under ``directory`` (older than ``before``, if given) whose files all
    read, or None."""
    limit = _step(before) if before is not None else None
    for path in reversed(_checkpoints(Path(directory))):
        if (limit is None or _step(path) < limit) and checkpoint_problem(path) is None:
            return path
    return None


def _resume_hint(bad: Path) -> str:
    good = last_good_checkpoint(bad.parent, before=bad)
    if good is None:
        return (f"No earlier checkpoint under {bad.parent} loads either: train without --resume (from step 0), "
                f"or restore {bad.name} from a backup")
    return (f"The last good checkpoint is {good}: resume from it with --resume-from {good} "
            f"(or delete {bad} so that --resume picks it)")


class Checkpointer:
    """Saves and restores the training state through ``accelerator.save_state`` / ``load_state``.

    The model's weights in those calls are replaced by :class:`TrainableParameters` (a pre-save
    hook writes only the trainable tensors; a pre-load hook reads them back).

    Args:
        accelerator: the run's accelerator (model, optimizer and scheduler already prepared).
        directory: where checkpoints go (``<output_dir>/checkpoints``).
        trainable: the trainable parameters.
        config: the run's config, saved with each checkpoint.
        keep: how many checkpoints to keep (the oldest are deleted).
    """

    def __init__(self, accelerator: "Accelerator", directory: Path, trainable: TrainableParameters,
                 config: TrainConfig, keep: int = 2):
        self.accelerator, self.directory = accelerator, Path(directory)
        self.trainable, self.config, self.keep = trainable, config, keep
        accelerator.register_save_state_pre_hook(self._save_weights)
        accelerator.register_load_state_pre_hook(self._load_weights)

    # accelerate hooks ---------------------------------------------------------------------------
    def _save_weights(self, models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # accelerate would otherwise write the whole model
        state = self.trainable.state_dict()  # on every process: FSDP shards are gathered
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(state, os.path.join(output_dir, TRAINABLE_FILE))

    def _load_weights(self, models: list, input_dir: str) -> None:
        self.trainable.load_state_dict(read_safetensors(os.path.join(input_dir, TRAINABLE_FILE),
                                                        what="trainable weights", fix="the checkpoint is damaged"))
        models.clear()  # loaded; accelerate must not look for model.safetensors

    # Saving -------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> Path:
        """Write a checkpoint of ``state`` atomically; returns its folder. Call on every process.

        Raises:
            CheckpointError: the disk is full, or the folder is not writable or on a read-only
                disk. The partial checkpoint is removed; earlier checkpoints stay intact.
        """
        final = self.directory / f"checkpoint-{state.step:08d}"
        tmp = self.directory / f".tmp-checkpoint-{state.step:08d}"
        try:
            self._write(state, tmp, final)
        except Exception as exc:
            error = write_error(exc, self.directory, f"checkpoint {final}")
            shutil.rmtree(tmp, ignore_errors=True)
            if error is None:
                raise
            raise error from exc
        self.accelerator.wait_for_everyone()
        return final

    def _write(self, state: TrainState, tmp: Path, final: Path) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        # Every process writes its own files (random_states_<rank>.pkl): all must be done before
        # the main process renames the folder, or a slower rank's file lands nowhere.
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            self.config.to_yaml(tmp / CONFIG_FILE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            logger.info("saved checkpoint %s", final)

    def _prune(self) -> None:
        found = sorted((int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    # Loading ------------------------------------------------------------------------------------
    def load(self, path: Path | None = None) -> TrainState:
        """Restore the newest checkpoint (or ``path``): weights, optimizer, scheduler, RNG.

        Raises:
            ConfigError: there is no checkpoint (at ``path``), or it was written by a different
                number of processes (the data position would not match).
            CheckpointError: a file of the checkpoint is missing or corrupt; the message names it
                and the newest earlier checkpoint that loads.
        """
        path = Path(path) if path is not None else latest_checkpoint(self.directory)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint under {self.directory}; train without --resume "
                              f"first, or set checkpoint.every so that checkpoints are written")
        if not path.is_dir():
            found = ", ".join(p.name for p in _checkpoints(self.directory)) or "none"
            raise ConfigError(f"--resume-from: no checkpoint folder {path}; checkpoints under {self.directory}: "
                              f"{found}")
        # The files are read before anything is restored: accelerate would silently skip an
        # unreadable RNG file, and its own errors do not name the file.
        problem = checkpoint_problem(path, rank=self.accelerator.process_index)
        if problem is None:
            state = _read_state(path)
            regrouped = state.num_processes != self.accelerator.num_processes
            if regrouped:
                state = _regroup(state, path, self.config, self.accelerator.num_processes)
            try:
                self.accelerator.load_state(str(path))
            except (FileNotFoundError, WeightsNotFoundError) as exc:  # a file the check does not know
                problem = str(exc)
            if regrouped and problem is None:
                # accelerate restores its micro-step count, which places the accumulation
                # boundaries; the writer's count is per process of the old layout.
                self.accelerator.step = state.batches
        if problem is not None:
            raise CheckpointError(f"cannot resume from {path.name}: {problem}. {_resume_hint(path)}")
        logger.info("resumed from %s (step %d)", path, state.step)
        return state


def _regroup(state: TrainState, path: Path, config: TrainConfig, world: int) -> TrainState:
    """``state`` as ``world`` processes continue it: the same examples per optimizer step when
    ``world × train.grad_accum`` equals the writer's (same batch size), the micro-batch position
    rescaled. Manifest data only: each process of a shard stream keeps its own position.

    Raises:
        ConfigError: the layouts do not match; the message gives the grad_accum that does.
    """
    written = state.num_processes
    same = f"resume with {written} process(es)"
    if not state.batch_size or is_shard_source(config.data.train):
        why = "its data position is per process" if state.batch_size else "it does not record its batch layout"
        raise ConfigError(f"{path} was written by {written} process(es) but this run has {world} ({why}); {same}")
    examples, accum = written * state.grad_accum, config.train.grad_accum
    if config.train.batch_size != state.batch_size or world * accum != examples:
        fix = (f"set train.grad_accum={examples // world}" if examples % world == 0
               else f"use a number of processes dividing {examples}")
        raise ConfigError(f"{path} was written by {written} process(es) × train.grad_accum={state.grad_accum} × "
                          f"train.batch_size={state.batch_size}, but this run has {world} × {accum} × "
                          f"{config.train.batch_size}: keep train.batch_size={state.batch_size} and {fix}, "
                          f"or {same}")
    logger.info("resuming a %d-process checkpoint on %d process(es) with train.grad_accum=%d", written, world, accum)
    return TrainState(step=state.step, batches=state.batches * written // world, num_processes=world,
                      batch_size=state.batch_size, grad_accum=accum)


# Write faults and the check before training ------------------------------------------------------


def _errno(exc: BaseException) -> int | None:
    """The errno of a write fault behind ``exc`` (its own, a cause's, or named in a library's message)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _WRITE_ERRNOS:
            return current.errno
        text = str(current)
        for code, words in _WRITE_ERRNOS.items():
            if words in text or f"os error {code})" in text:
                return code
        current = current.__cause__ or current.__context__
    return None


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(_existing(folder)).free
    except OSError:
        return None


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent (disk_usage needs one that exists)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _size(count: int | None) -> str:
    if count is None:
        return "unknown"
    value, unit = float(count), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{count:,} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({count:,} bytes)"


def write_error(exc: BaseException, folder: str | os.PathLike, what: str) -> CheckpointError | None:
    """A :class:`CheckpointError` saying what went wrong writing ``what`` into ``folder`` and what
    to do, when ``exc`` is a full disk, a missing permission or a read-only disk; else None.

    ``torch.save`` reports a failed write as ``[enforce fail at inline_container.cc:…] unexpected
    pos …``, without the errno; that is read as a full disk unless the folder is not writable.
    """
    if isinstance(exc, AnyGPTError):  # already says what is wrong
        return None
    folder = Path(folder)
    code, guessed = _errno(exc), False
    if code is None and _TORCH_WRITE_FAILED.search(str(exc)):
        code = errno.ENOSPC if os.access(_existing(folder), os.W_OK) else errno.EACCES
        guessed = True
    if code is None:
        return None
    again = ("then rerun, with --resume to continue from the last checkpoint (earlier checkpoints are intact; "
             "the partial write was removed)")
    if code in (errno.ENOSPC, errno.EDQUOT):
        lack = ("the disk quota is exhausted" if code == errno.EDQUOT else
                "the write failed, most likely for lack of space" if guessed else "no space left")
        problem = f"{lack} on the disk holding {folder}, {_size(_free(folder))} free"
        fix = ("free some space there (or lower checkpoint.keep), or set output_dir= to a folder on a disk "
               "with room (moving the checkpoints along)")
    elif code == errno.EROFS:
        problem, fix = f"{folder} is on a read-only file system", "set output_dir= to a writable folder"
    else:
        problem = f"permission denied in {folder}"
        fix = "make it writable (chmod / chown), or set output_dir= to a folder you can write"
    error = CheckpointError(f"cannot write {what}: {problem} ({exc}); {fix}, {again}")
    error.errno = code
    return error


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (the run's ``output_dir``) and check that a file can be written there.

    Raises:
        ConfigError: naming the folder and why (permission denied, read-only disk, ...).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"output_dir {folder}: cannot write there ({exc.strerror or exc}); make it writable, "
                          f"or set output_dir= to a folder you can write") from exc
    return folder


def checkpoint_bytes(trainable: TrainableParameters, optimizer: "torch.optim.Optimizer") -> int:
    """About how many bytes one checkpoint takes: the trainable tensors, the optimizer's state
    (before the first step, Adam's two moments per tensor: three with amsgrad) and the rest."""
    import torch

    weights = sum(p.numel() * p.element_size() for _, p in trainable.named_parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    if state:
        moments = sum(v.numel() * v.element_size() for v in state)
    else:  # allocated on the first step
        moments = weights * (3 if optimizer.defaults.get("amsgrad") else 2)
    return weights + moments + _CHECKPOINT_OVERHEAD


def check_room(folder: str | os.PathLike, needed: int) -> None:
    """Check that the disk holding ``folder`` has ``needed`` bytes free (one checkpoint).

    Raises:
        ConfigError: naming the folder, the bytes needed and the bytes free.
    """
    folder = Path(folder)
    free = _free(folder)
    if free is not None and free < needed:
        raise ConfigError(f"output_dir {folder}: one checkpoint needs about {_size(needed)}, but the disk holding "
                          f"it has {_size(free)} free; free some space, set output_dir= to a folder on a disk "
                          f"with room, or set checkpoint.every=0 to write no checkpoints")

"""Resumable, atomic training checkpoints.

A checkpoint folder ``<output_dir>/checkpoints/checkpoint-<step>`` holds:

* ``trainable.safetensors`` — the trainable tensors only (projectors, LoRA adapters, the signal
  rows of the embedding matrices), never the frozen model;
* ``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl`` — written by
  ``accelerator.save_state`` (DeepSpeed: its own sharded files);
* ``train_state.json`` — the step and the data position (micro-batches consumed);
* ``train_config.yaml`` — the config it was trained with.

It is written to a hidden temporary folder and renamed when complete, so an interrupted save
never leaves a checkpoint that looks valid. ``--resume`` picks the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anygpt.errors import ConfigError

from anygpt.alignment.config import TrainConfig
from anygpt.alignment.trainable import TrainableParameters

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

__all__ = ["TrainState", "Checkpointer", "latest_checkpoint", "TRAINABLE_FILE", "STATE_FILE", "CONFIG_FILE"]

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.yaml"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where training is: optimizer steps done and micro-batches consumed (per process)."""

    step: int = 0
    batches: int = 0
    num_processes: int = 1


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (None if there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))
             and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


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
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(self.trainable.state_dict(), os.path.join(output_dir, TRAINABLE_FILE))

    def _load_weights(self, models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        self.trainable.load_state_dict(load_file(os.path.join(input_dir, TRAINABLE_FILE)))
        models.clear()  # loaded; accelerate must not look for model.safetensors

    # Saving -------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> Path:
        """Write a checkpoint of ``state`` atomically; returns its folder. Call on every process."""
        acc = self.accelerator
        final = self.directory / f"checkpoint-{state.step:08d}"
        tmp = self.directory / f".tmp-checkpoint-{state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            self.config.to_yaml(tmp / CONFIG_FILE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        found = sorted((int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    # Loading ------------------------------------------------------------------------------------
    def load(self, path: Path | None = None) -> TrainState:
        """Restore the newest checkpoint (or ``path``): weights, optimizer, scheduler, RNG.

        Raises:
            ConfigError: there is no checkpoint, or it was written by a different number of
                processes (the data position would not match).
        """
        path = Path(path) if path is not None else latest_checkpoint(self.directory)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint under {self.directory}; train without --resume "
                              f"first, or set checkpoint.every so that checkpoints are written")
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        if state.num_processes != self.accelerator.num_processes:
            raise ConfigError(f"{path} was written by {state.num_processes} process(es) but this run has "
                              f"{self.accelerator.num_processes}; resume with the same number of processes")
        self.accelerator.load_state(str(path))
        logger.info("resumed from %s (step %d)", path, state.step)
        return state

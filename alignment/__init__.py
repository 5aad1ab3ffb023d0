"""Alignment: datasets and manifests, decoding-side targets, and the three-stage training recipe.

Importing ``alignment`` is light; each name below is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ManifestError": "anygpt.alignment.data",
    "Sample": "anygpt.alignment.data",
    "read_manifest": "anygpt.alignment.data",
    "AlignmentDataset": "anygpt.alignment.data",
    "collate": "anygpt.alignment.data",
    "ShardStream": "anygpt.alignment.shards",
    "list_shards": "anygpt.alignment.shards",
    "write_shards": "anygpt.alignment.shards",
    "TargetCache": "anygpt.alignment.targets",
    "MissingTargetsError": "anygpt.alignment.targets",
    "make_synthetic_dataset": "anygpt.alignment.synthetic",
    "TrainConfig": "anygpt.alignment.config",
    "load_train_config": "anygpt.alignment.config",
    "train": "anygpt.alignment.recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignment' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

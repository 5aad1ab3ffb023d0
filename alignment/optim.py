"""Optimisation pieces every training loop here shares: the learning-rate schedule and one step."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["WarmupDecay", "optimizer_step"]


class WarmupDecay:
    """Learning-rate factor: linear warmup, then constant / linear / cosine decay to ``min_ratio``
    at step ``total`` (for ``torch.optim.lr_scheduler.LambdaLR``)."""

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float):
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
                   params: Sequence[torch.nn.Parameter], max_grad_norm: float | None) -> None:
    """Backpropagate ``loss``, clip the gradients' norm (unless 0 or None), step, advance the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    schedule.step()

"""Seeded random initialisation that leaves the caller's random state alone."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

__all__ = ["seeded", "fresh_seed"]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU generator seeded with ``seed``, restoring its state afterwards.

    Only the CPU generator is seeded (not ``torch.manual_seed``, which also reseeds every CUDA
    generator): components are initialised on the CPU, and the caller's random state, CPU and
    CUDA, is as it was when the block ends.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def fresh_seed() -> int:
    """A seed from the operating system's entropy, for calls that ask for no particular seed
    (``torch.seed()`` would reseed the global generator as a side effect)."""
    return secrets.randbits(63)

"""ImageBind preprocessing shared by the modalities: the temporal clip sampler and the check
on the geometry (sizes) that the encoder's ``arch`` passes in."""

from __future__ import annotations

import numbers
from fractions import Fraction


def _clip_bounds(
    duration: float, clip_seconds: float, clips: int
) -> list[tuple[Fraction, Fraction]]:
    """Clip (start, end) times of pytorchvideo's ``ConstantClipsPerVideoSampler``."""
    length = Fraction(clip_seconds)
    step = Fraction(max(duration - clip_seconds, 0)) / clips
    return [(step * i, step * i + length) for i in range(clips)]


def _check_sizes(**sizes: int) -> None:
    """Refuse sizes that are not positive integers (they usually come from ``encoder.arch``)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(
                f"{name} must be a positive integer, got {value!r}; fix the encoder's arch"
                " (encoder.arch in the config) or the value passed"
            )

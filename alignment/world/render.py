"""Draw the world's items: random items and their pixels or samples.

Sampling an item and rendering it take their draws from the same generator, in that order (the
attributes first, then position, size or detuning), so a seed fixes both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .spec import (BACKGROUNDS, CLIP_BACKGROUND, COLOURS, DIRECTIONS, FPS, FRAMES, PITCHES, SAMPLE_RATE,
                   SHAPES, SIZE, STEP, WAVEFORMS, ClipItem, ImageItem, Item, SoundItem)

if TYPE_CHECKING:
    from anygpt.types import Audio, Video

__all__ = ["pick", "sample_image", "sample_sound", "sample_clip", "sample_item", "render_image",
           "render_sound", "render_clip", "render_item", "draw_shape"]

#: Radius range of an image's shape, the radius of a clip's shape, and the clip's margin to the edge.
IMAGE_RADIUS = (18.0, 24.0)
CLIP_RADIUS = 10.0
CLIP_MARGIN = CLIP_RADIUS + 2
#: A tone's peak amplitude and its detuning range around the nominal pitch.
AMPLITUDE = 0.4
DETUNE = (0.97, 1.03)


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """A uniformly random one of ``options`` (one integer draw, the way every sampler draws)."""
    return options[int(rng.integers(len(options)))]


# Items ----------------------------------------------------------------------------------------


def sample_image(rng: np.random.Generator) -> ImageItem:
    """A uniformly random image item."""
    return ImageItem(pick(rng, SHAPES), pick(rng, list(COLOURS)), pick(rng, list(BACKGROUNDS)))


def sample_sound(rng: np.random.Generator) -> SoundItem:
    """A uniformly random sound item."""
    return SoundItem(pick(rng, list(PITCHES)), pick(rng, WAVEFORMS))


def sample_clip(rng: np.random.Generator) -> ClipItem:
    """A uniformly random clip item."""
    return ClipItem(pick(rng, SHAPES), pick(rng, list(COLOURS)), pick(rng, list(DIRECTIONS)))


def sample_item(modality: str, rng: np.random.Generator) -> Item:
    """A uniformly random item of ``modality`` ("image", "audio" or "video")."""
    return {"image": sample_image, "audio": sample_sound, "video": sample_clip}[modality](rng)


# Media ----------------------------------------------------------------------------------------


def draw_shape(canvas: np.ndarray, shape: str, centre: tuple[float, float], radius: float,
               colour: tuple[int, int, int]) -> None:
    """Paint a filled ``shape`` into the (H, W, 3) uint8 ``canvas`` in place (no anti-aliasing).

    A circle of ``radius``; a square of half-side 0.85 ``radius``; an upward triangle from
    ``radius`` above the centre to a base 0.8 ``radius`` below it, 2.16 ``radius`` wide.
    """
    ys, xs = np.mgrid[: canvas.shape[0], : canvas.shape[1]] + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= radius ** 2
    elif shape == "square":
        inside = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    else:  # an upward triangle: apex at the top, base at the bottom
        inside = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    canvas[inside] = colour


def render_image(item: ImageItem, rng: np.random.Generator) -> np.ndarray:
    """A (SIZE, SIZE, 3) uint8 picture of ``item`` at a random size and position."""
    radius = float(rng.uniform(*IMAGE_RADIUS))
    centre = tuple(float(v) for v in rng.uniform(radius, SIZE - radius, size=2))
    canvas = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    canvas[:] = BACKGROUNDS[item.background]
    draw_shape(canvas, item.shape, centre, radius, COLOURS[item.colour])
    return canvas


def render_sound(item: SoundItem, rng: np.random.Generator) -> Audio:
    """A 1 s mono tone of ``item`` at SAMPLE_RATE, slightly detuned at random."""
    from anygpt.types import Audio

    frequency = PITCHES[item.pitch] * float(rng.uniform(*DETUNE))
    phase = frequency * np.arange(SAMPLE_RATE) / SAMPLE_RATE
    if item.waveform == "sine":
        wave = np.sin(2 * np.pi * phase)
    elif item.waveform == "square":
        wave = np.sign(np.sin(2 * np.pi * phase))
    else:
        wave = 2.0 * (phase - np.floor(phase + 0.5))
    return Audio((AMPLITUDE * wave).astype(np.float32), SAMPLE_RATE)


def render_clip(item: ClipItem, rng: np.random.Generator) -> Video:
    """FRAMES frames of ``item`` moving STEP pixels a frame from a random start, at FPS."""
    from anygpt.types import Video

    travel = STEP * (FRAMES - 1)
    ux, uy = DIRECTIONS[item.direction]
    start = [float(rng.uniform(CLIP_MARGIN, SIZE - CLIP_MARGIN)) for _ in range(2)]
    for axis, unit in enumerate((ux, uy)):  # leave room for the motion along the moving axis
        if unit:
            start[axis] = (CLIP_MARGIN + travel / 2 - unit * travel / 2
                           + float(rng.uniform(0, SIZE - 2 * CLIP_MARGIN - travel)))
    frames = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    frames[:] = BACKGROUNDS[CLIP_BACKGROUND]
    for t, frame in enumerate(frames):
        centre = (start[0] + ux * STEP * t, start[1] + uy * STEP * t)
        draw_shape(frame, item.shape, centre, CLIP_RADIUS, COLOURS[item.colour])
    return Video(frames, float(FPS))


def render_item(item: Item, rng: np.random.Generator) -> np.ndarray | Audio | Video:
    """The medium of any item: :func:`render_image`, :func:`render_sound` or :func:`render_clip`."""
    if isinstance(item, ImageItem):
        return render_image(item, rng)
    if isinstance(item, SoundItem):
        return render_sound(item, rng)
    if isinstance(item, ClipItem):
        return render_clip(item, rng)
    raise TypeError(f"not a world item: {item!r}")

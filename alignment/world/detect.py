"""Detectors that read a world attribute off any medium, knowing only the world's spec.

They learn nothing: each measures one quantity and names the nearest value of the spec.

* image: the background is the border's median colour; the foreground is the pixels nearer
  the foreground's colour than the background's (after a first cut at pixels clearly far from
  the background), cleaned of speckle and one-pixel spurs and reduced to its largest connected
  part; the colour is the median colour of that part's interior; the shape comes from the share
  of its bounding box that the part fills (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2, each
  measured on the world's own shape drawn at the part's size and cleaned the same way);
* audio: the pitch is the spectrum's peak between the lowest and highest pitch (± half an
  octave), compared in octaves; the waveform comes from the 2nd…5th harmonics' amplitudes
  relative to the fundamental (sine: none; square: odd ones, 1/3 and 1/5; sawtooth: all, 1/k);
* video: shape and colour as for images, over all frames; the direction from the least-squares
  track of the foreground's centroid (its dominant axis and sign).

Every attribute comes as a :class:`Detection`: the nearest world value and a score in [0, 1].
A value scores ``1 - d / D``, with ``d`` its measurement's distance to that value and ``D``
the distance from that value to its nearest rival, so half-way to a rival scores 0.5; the score
is capped by how well the measurement itself holds (the border agreeing on one colour, the
foreground being one solid part, the sound's energy lying on a harmonic series, the shape
moving along one axis). Below :data:`MIN_SCORE` the value is ``None``: noise is refused
rather than scored right by chance.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .render import draw_shape
from .spec import BACKGROUNDS, COLOURS, DIRECTIONS, PITCHES, SAMPLE_RATE, SIZE

if TYPE_CHECKING:
    from PIL.Image import Image

    from anygpt.types import Audio, Video

__all__ = ["Detection", "MIN_SCORE", "detect_image", "detect_sound", "detect_clip", "detect_media"]

#: A detection below this score reports no value.
MIN_SCORE = 0.5

#: RGB distance within which a border pixel agrees with the border's median colour, and beyond
#: which a pixel is clearly not background (the closest colour–background pair is ~94 apart).
COLOUR_TOLERANCE = 60.0
#: The foreground's share of the frame that counts as a shape (the world's smallest, a clip's
#: triangle, is ~5 %; more than 70 % means the "background" was not one).
AREA_RANGE = (0.01, 0.7)
#: Each shape's area in units of its radius squared (see :func:`.render.draw_shape`); its
#: bounding box's fill ratio is about 1 (square), π/4 (circle) and 1/2 (triangle).
AREAS = {"square": 1.7 ** 2, "circle": math.pi, "triangle": 0.5 * 2.16 * 1.8}
#: Relative harmonic amplitudes (2nd to 5th) of each waveform.
HARMONICS = {"sine": (0.0, 0.0, 0.0, 0.0), "square": (0.0, 1 / 3, 0.0, 1 / 5),
             "sawtooth": (1 / 2, 1 / 3, 1 / 4, 1 / 5)}
#: The displacement, as a share of the frame side, over which a shape counts as moving.
MIN_TRAVEL = 0.1


@dataclass(frozen=True)
class Detection:
    """One attribute as measured.

    Attributes:
        guess: the nearest world value, or None when nothing could be measured.
        score: confidence in [0, 1].
    """

    guess: str | None
    score: float

    @property
    def value(self) -> str | None:
        """``guess`` if ``score`` reaches :data:`MIN_SCORE`, else None (unknown)."""
        return self.guess if self.score >= MIN_SCORE else None


_UNKNOWN = Detection(None, 0.0)


def detect_image(image: Image | np.ndarray) -> dict[str, Detection]:
    """``shape``, ``colour`` and ``background`` of a PIL image or (H, W[, C]) array."""
    scene = _Scene.of(_as_frames(image)[None])
    return {"shape": scene.shape(), "colour": scene.colour(), "background": scene.background()}


def detect_clip(video: Video | np.ndarray | Sequence[Any]) -> dict[str, Detection]:
    """``shape``, ``colour`` and ``direction`` of a Video, (F, H, W, 3) array or list of frames."""
    frames = getattr(video, "frames", video)
    scene = _Scene.of(np.stack([_as_frames(frame) for frame in frames]))
    return {"shape": scene.shape(), "colour": scene.colour(), "direction": scene.direction()}


def detect_sound(audio: Audio | np.ndarray, sample_rate: int | None = None) -> dict[str, Detection]:
    """``pitch`` and ``waveform`` of an Audio (any rate) or of a waveform at ``sample_rate``.

    A (C, T) waveform is mixed down to mono first.
    """
    wave = np.asarray(getattr(audio, "waveform", audio), dtype=np.float64)
    rate = float(getattr(audio, "sample_rate", None) or sample_rate or SAMPLE_RATE)
    return _Spectrum.of(wave.reshape(-1, wave.shape[-1]).mean(axis=0), rate).detections()


def detect_media(modality: str, value: Any) -> dict[str, Detection]:
    """The detections of ``value``, a medium of ``modality`` ("image", "audio" or "video")."""
    detectors = {"image": detect_image, "audio": detect_sound, "video": detect_clip}
    if modality not in detectors:
        raise ValueError(f"modality must be one of {tuple(detectors)}, got {modality!r}")
    return detectors[modality](value)


def _nearest(measured: np.ndarray | float, prototypes: Mapping[str, Any], cap: float = 1.0) -> Detection:
    """The prototype nearest ``measured``, scored ``1 - d / D`` (see the module doc), at most ``cap``."""
    names = list(prototypes)
    points = np.array([np.atleast_1d(prototypes[n]) for n in names], dtype=np.float64)
    distances = np.linalg.norm(points - np.atleast_1d(measured), axis=1)
    best = int(distances.argmin())
    rival = np.delete(np.linalg.norm(points - points[best], axis=1), best).min()
    return Detection(names[best], float(np.clip(min(1 - distances[best] / rival, cap), 0.0, 1.0)))


# Images and clips -------------------------------------------------------------------------------


def _as_frames(image: Any) -> np.ndarray:
    """A float (H, W, 3) array in [0, 255], at most about 2 × SIZE pixels on its shorter side."""
    if hasattr(image, "convert"):  # a PIL image
        image = image.convert("RGB")
    raw = np.asarray(image)
    pixels = raw.astype(np.float64)
    if raw.dtype.kind == "f" and pixels.max(initial=0.0) <= 1.0:  # floats in [0, 1]
        pixels *= 255.0
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] < 3:  # grey, or grey and alpha
        pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    pixels = pixels[..., :3]
    # A large image is sampled, not averaged, down to about SIZE: averaging would smooth pixel
    # noise into a plain grey background.
    factor = max(1, min(pixels.shape[:2]) // SIZE)
    return pixels[factor // 2::factor, factor // 2::factor]


# The mask helpers take one (H, W) mask or a stack (F, H, W) of them.


def _neighbourhoods(mask: np.ndarray, outside: bool) -> list[np.ndarray]:
    """The 9 shifts of ``mask`` that put each pixel's 3×3 neighbours on it (``outside`` beyond the edge)."""
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)], constant_values=outside)
    h, w = mask.shape[-2:]
    return [padded[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``mask`` less ``steps`` pixels along its edges (3×3 erosion; the frame's edge does not erode)."""
    for _ in range(steps):
        mask = np.logical_and.reduce(_neighbourhoods(mask, True))
    return mask


def _clean(mask: np.ndarray) -> np.ndarray:
    """``mask`` without speckle (a 3×3 majority vote) nor one-pixel spurs along its edges (an opening).

    Noise flips pixels along a blurred edge; left in, they would widen the bounding box.
    """
    kept = np.sum(_neighbourhoods(mask.astype(np.int8), False), axis=0) >= 5
    return np.logical_or.reduce(_neighbourhoods(_erode(kept), False))


def _fill_ratio(part: np.ndarray) -> float:
    """The share of its bounding box that ``part`` covers."""
    ys, xs = np.nonzero(part)
    return float(part.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))


@functools.lru_cache(maxsize=1024)
def _fill_ratios(area: int) -> dict[str, float]:
    """Each shape's fill ratio when drawn over ``area`` pixels and cleaned like a measured part.

    Small shapes lose a relatively larger tip and corners to the cleaning, so the ratios that a
    part is compared with are measured at its own size rather than taken from the ideal shapes.
    """
    ratios = {}
    for shape, unit in AREAS.items():
        radius = math.sqrt(area / unit)
        side = int(2.6 * radius) + 6
        fills = []
        for phase in (0.0, 0.25, 0.5, 0.75):  # pixel grid offsets: rasterising a small shape is jittery
            canvas = np.zeros((side, side, 3), dtype=np.uint8)
            draw_shape(canvas, shape, (side / 2 + phase, side / 2 + phase / 2), radius, (255, 255, 255))
            fills.append(_fill_ratio(_clean(canvas[..., 0] > 0)))
        ratios[shape] = float(np.mean(fills))
    return ratios


def _largest_components(masks: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of each (H, W) mask in ``masks`` (F, H, W).

    Label propagation: every pixel starts with its own index and takes its largest neighbour's
    until nothing changes, so each part ends up labelled by its largest index.
    """
    labels = np.where(masks, np.arange(1, masks.size + 1).reshape(masks.shape), 0)
    padded = np.zeros((*masks.shape[:-2], masks.shape[-2] + 2, masks.shape[-1] + 2), dtype=labels.dtype)
    while True:
        padded[..., 1:-1, 1:-1] = labels
        spread = np.maximum.reduce([padded[..., 1:-1, 1:-1], padded[..., :-2, 1:-1], padded[..., 2:, 1:-1],
                                    padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]])
        spread = np.where(masks, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    largest = np.zeros_like(masks)
    for index, frame in enumerate(labels):
        counts = np.bincount(frame.ravel())
        counts[0] = 0
        if counts.any():
            largest[index] = frame == counts.argmax()
    return largest


@dataclass
class _Scene:
    """A stack of frames split into one background colour and one foreground part per frame.

    Attributes:
        frames: float (F, H, W, 3).
        reference: the border's median colour.
        agreement: the share of border pixels within COLOUR_TOLERANCE of ``reference``.
        masks: (F, H, W) the foreground's largest part per frame (all False when there is none).
        solidity: the least, over frames with a part, of that part's share of the foreground.
    """

    frames: np.ndarray
    reference: np.ndarray
    agreement: float
    masks: np.ndarray
    solidity: float

    @classmethod
    def of(cls, frames: np.ndarray) -> _Scene:
        width = max(1, min(frames.shape[1:3]) // 32)
        border = np.concatenate([frames[:, :width].reshape(-1, 3), frames[:, -width:].reshape(-1, 3),
                                 frames[:, :, :width].reshape(-1, 3), frames[:, :, -width:].reshape(-1, 3)])
        reference = np.median(border, axis=0)
        agreement = float(np.mean(np.linalg.norm(border - reference, axis=1) <= COLOUR_TOLERANCE))
        scene = cls(frames, reference, agreement, np.zeros(frames.shape[:3], dtype=bool), 0.0)
        if agreement >= MIN_SCORE:  # otherwise there is no background to tell a foreground from
            scene._segment()
        return scene

    def _segment(self) -> None:
        offsets = self.frames - self.reference
        candidates = np.linalg.norm(offsets, axis=-1) > COLOUR_TOLERANCE
        if not candidates.any():
            return
        # Nearer the foreground's colour than the background's: blur moves no edge.
        axis = np.median(offsets[candidates], axis=0)
        foreground = offsets @ axis > 0.5 * float(axis @ axis)
        cleaned = _clean(foreground)
        parts = _largest_components(cleaned)
        areas = parts.mean(axis=(1, 2))
        kept = (areas >= AREA_RANGE[0]) & (areas <= AREA_RANGE[1])
        self.masks[kept] = parts[kept]
        if kept.any():
            self.solidity = float(np.min(parts[kept].sum(axis=(1, 2)) / cleaned[kept].sum(axis=(1, 2))))

    @property
    def _quality(self) -> float:
        """How far the segmentation holds: a consistent border, solid parts, in every frame."""
        coverage = float(self.masks.any(axis=(1, 2)).mean())
        return min(self.agreement, self.solidity) * coverage

    def background(self) -> Detection:
        return _nearest(self.reference, BACKGROUNDS, cap=self.agreement)

    def colour(self) -> Detection:
        if not self.masks.any():
            return _UNKNOWN
        # The interior only: along a blurred edge the colour is mixed with the background's.
        interior = _erode(self.masks, steps=2)
        pixels = self.frames[interior if interior.any() else self.masks]
        return _nearest(np.median(pixels, axis=0), COLOURS, cap=self._quality)

    def shape(self) -> Detection:
        parts = [part for part in self.masks if part.any()]
        if not parts:
            return _UNKNOWN
        prototypes = _fill_ratios(int(np.median([part.sum() for part in parts])))
        return _nearest(float(np.median([_fill_ratio(part) for part in parts])), prototypes, cap=self._quality)

    def direction(self) -> Detection:
        present = [t for t, part in enumerate(self.masks) if part.any()]
        if len(present) < max(2, len(self.masks) // 2):
            return _UNKNOWN
        track = np.array([[xs.mean(), ys.mean()] for ys, xs in (np.nonzero(self.masks[t]) for t in present)])
        velocity = np.polyfit(np.array(present, dtype=np.float64), track, 1)[0]  # pixels per frame, (x, y)
        axis = int(np.abs(velocity).argmax())
        sign = int(np.sign(velocity[axis]))
        if sign == 0:  # no motion at all
            return _UNKNOWN
        name = {unit: name for name, unit in DIRECTIONS.items()}[(sign, 0) if axis == 0 else (0, sign)]
        steps = np.diff(track[:, axis]) * sign
        dominance = 2 * abs(velocity[axis]) / np.abs(velocity).sum() - 1  # 1 along an axis, 0 diagonally
        travel = abs(velocity[axis]) * (present[-1] - present[0]) / (MIN_TRAVEL * self.frames.shape[2 - axis])
        score = min(dominance, float(np.mean(steps > 0)), travel, self._quality)
        return Detection(name, float(np.clip(score, 0.0, 1.0)))


# Sound ------------------------------------------------------------------------------------------


@dataclass
class _Spectrum:
    """A waveform's power spectrum around its strongest tone between the world's pitches.

    Attributes:
        fundamental: the peak's frequency in Hz (0 for silence).
        harmonics: the amplitude of each harmonic below Nyquist, the fundamental first.
        tonality: the share of the power on those harmonics.
    """

    fundamental: float
    harmonics: np.ndarray
    tonality: float

    @classmethod
    def of(cls, wave: np.ndarray, rate: float) -> _Spectrum:
        power = np.abs(np.fft.rfft((wave - wave.mean()) * np.hanning(len(wave)))) ** 2
        bin_hz = rate / len(wave)
        low, high = min(PITCHES.values()) / math.sqrt(2), max(PITCHES.values()) * math.sqrt(2)
        band = np.arange(max(1, int(low / bin_hz)), min(int(high / bin_hz) + 1, len(power) - 1))
        total = float(power[1:].sum())
        if total <= 0 or band.size == 0:
            return cls(0.0, np.zeros(1), 0.0)
        peak = int(band[power[band].argmax()])
        fundamental = _refine(power, peak) * bin_hz
        # Harmonics as the power in a few bins around k·f0 (a Hann window's lobe is 2 bins wide).
        half = max(4, int(0.015 * fundamental / bin_hz))
        centres = [round(k * fundamental / bin_hz) for k in range(1, 64) if k * fundamental < 0.95 * rate / 2]
        energies = np.array([power[max(c - half, 1):c + half + 1].sum() for c in centres])
        # Capped: on a clip of a few periods the harmonics' windows overlap.
        return cls(fundamental, np.sqrt(energies), min(1.0, float(energies.sum() / total)))

    def detections(self) -> dict[str, Detection]:
        if self.fundamental <= 0:
            return {"pitch": _UNKNOWN, "waveform": _UNKNOWN}
        octaves = {name: math.log2(hz) for name, hz in PITCHES.items()}
        ratios = self.harmonics[1:len(HARMONICS["sine"]) + 1] / self.harmonics[0]
        waveforms = {name: values[:len(ratios)] for name, values in HARMONICS.items()}
        # Sine, square and sawtooth differ from the 3rd harmonic on; without it they cannot be told apart.
        waveform = _nearest(ratios, waveforms, cap=self.tonality) if len(ratios) >= 2 else _UNKNOWN
        pitch = _nearest(math.log2(self.fundamental), octaves, cap=self.tonality)
        return {"pitch": pitch, "waveform": waveform}


def _refine(power: np.ndarray, peak: int) -> float:
    """The peak's position in bins, refined by a parabola through the log power of its neighbours."""
    left, centre, right = np.log(power[peak - 1:peak + 2] + 1e-30)
    curvature = left - 2 * centre + right
    return peak + (0.5 * (left - right) / curvature if curvature < 0 else 0.0)

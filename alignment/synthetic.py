"""A small procedural dataset for smoke-testing the alignment stages offline.

Every file is generated from a few attributes, and its caption states exactly those attributes,
so a model that learns the task can be checked by eye (and by tests):

* image: a coloured circle, square or triangle on a plain background, 64×64 PNG
  ("a red circle on a white background");
* audio: a 1 s tone at 16 kHz of a pitch and waveform ("a low sine tone");
* video: a coloured shape moving left, right, up or down, 8 frames 64×64 MP4
  ("a blue square moving right").

Dialogues mix generation requests ("show me …", "play …", "make a video of …", answered with
a short text and the modality's signal run) and questions about an attached file (answered with
its caption).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from anygpt.modalities import get_modality

logger = logging.getLogger(__name__)

__all__ = ["make_synthetic_dataset", "COLOURS", "BACKGROUNDS", "SHAPES", "PITCHES", "WAVEFORMS",
           "DIRECTIONS", "MODALITIES"]

MODALITIES = ("image", "audio", "video")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "purple": (140, 50, 180), "orange": (245, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0),
                                                "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
PITCHES: dict[str, float] = {"low": 220.0, "medium": 440.0, "high": 880.0}
WAVEFORMS = ("sine", "square", "sawtooth")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

SIZE = 64
SAMPLE_RATE = 16000
FRAMES, FPS, STEP = 8, 8, 4

_REQUESTS = {
    "image": ("show me {caption}", "draw {caption}", "can you paint {caption}?"),
    "audio": ("play {caption}", "let me hear {caption}", "make a sound: {caption}"),
    "video": ("make a video of {caption}", "show me a clip of {caption}", "animate {caption}"),
}
_QUESTIONS = {
    "image": ("<image> What is in this picture?", "Describe this image. <image>"),
    "audio": ("<audio> What do you hear?", "Describe this sound. <audio>"),
    "video": ("<video> What happens in this video?", "Describe this clip. <video>"),
}
_ANSWERS = ("Here is {caption}. {run}", "Sure! {run}", "This is {caption}: {run}")


@dataclass
class _Media:
    """A generated file: its modality, path relative to the dataset folder, and caption."""

    modality: str
    path: str
    caption: str


def make_synthetic_dataset(directory: str | Path, *, num_train: int = 64, num_val: int = 16, seed: int = 0,
                           signal_tokens: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """Write the synthetic dataset under ``directory`` (deterministic given ``seed``).

    Args:
        directory: output folder (created); media go to ``train/`` and ``val/``.
        num_train, num_val: caption rows (cycling image, audio, video) and dialogues per split.
        seed: random seed.
        signal_tokens: modality → its signal token run (e.g. ``model.lm.signal_tokens``);
            default the standard runs ``[IMG0]..[IMG3]``, ``[AUD0]..[AUD7]``, ``[VID0]..[VID23]``.

    Returns:
        ``{"captions_train", "captions_val", "dialogues_train", "dialogues_val"}`` → manifest paths.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be at least 1 (got {num_train}, {num_val})")
    root = Path(directory).expanduser().resolve()
    runs = {m: "".join(toks) for m, toks in (signal_tokens or _standard_signal_tokens()).items()}
    out = {}
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_id])
        media = [_make_media(root, split, i, MODALITIES[i % len(MODALITIES)], rng) for i in range(count)]
        out[f"captions_{split}"] = _write_jsonl(root / f"captions_{split}.jsonl",
                                                [{"caption": m.caption, m.modality: m.path} for m in media])
        dialogues = [_dialogue(media, runs, rng) for _ in range(count)]
        out[f"dialogues_{split}"] = _write_jsonl(root / f"dialogues_{split}.jsonl",
                                                 [{"conversation": d} for d in dialogues])
    logger.info("wrote a synthetic dataset (%d train, %d val rows) to %s", num_train, num_val, root)
    return out


def _standard_signal_tokens() -> dict[str, list[str]]:
    return {m: get_modality(m).signal_tokens() for m in MODALITIES}


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# Media ---------------------------------------------------------------------------------------


def _make_media(root: Path, split: str, index: int, modality: str, rng: np.random.Generator) -> _Media:
    spec = get_modality(modality)
    value, caption = _CAPTIONERS[modality](rng)
    relative = f"{split}/{modality}_{index:04d}{spec.output_suffix}"
    spec.write(value, root / relative)
    return _Media(modality, relative, caption)


def _draw(canvas: np.ndarray, shape: str, centre: tuple[float, float], radius: float,
          colour: tuple[int, int, int]) -> None:
    """Paint a filled ``shape`` into the (H, W, 3) uint8 ``canvas`` in place (no anti-aliasing)."""
    ys, xs = np.mgrid[: canvas.shape[0], : canvas.shape[1]] + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= radius ** 2
    elif shape == "square":
        inside = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    else:  # an upward triangle: apex at the top, base at the bottom
        inside = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    canvas[inside] = colour


def _image(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    shape, colour, background = _pick(rng, SHAPES), _pick(rng, list(COLOURS)), _pick(rng, list(BACKGROUNDS))
    radius = float(rng.uniform(18, 24))
    centre = tuple(float(v) for v in rng.uniform(radius, SIZE - radius, size=2))
    canvas = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    canvas[:] = BACKGROUNDS[background]
    _draw(canvas, shape, centre, radius, COLOURS[colour])
    return canvas, f"{_article(colour)} {colour} {shape} on a {background} background"


def _audio(rng: np.random.Generator):
    from anygpt.types import Audio

    pitch, waveform = _pick(rng, list(PITCHES)), _pick(rng, WAVEFORMS)
    frequency = PITCHES[pitch] * float(rng.uniform(0.97, 1.03))
    phase = frequency * np.arange(SAMPLE_RATE) / SAMPLE_RATE
    if waveform == "sine":
        wave = np.sin(2 * np.pi * phase)
    elif waveform == "square":
        wave = np.sign(np.sin(2 * np.pi * phase))
    else:
        wave = 2.0 * (phase - np.floor(phase + 0.5))
    return Audio((0.4 * wave).astype(np.float32), SAMPLE_RATE), f"a {pitch} {waveform} tone"


def _video(rng: np.random.Generator):
    from anygpt.types import Video

    shape, colour, direction = _pick(rng, SHAPES), _pick(rng, list(COLOURS)), _pick(rng, list(DIRECTIONS))
    radius, travel = 10.0, STEP * (FRAMES - 1)
    (ux, uy), margin = DIRECTIONS[direction], radius + 2
    start = [float(rng.uniform(margin, SIZE - margin)) for _ in range(2)]
    for axis, unit in enumerate((ux, uy)):  # leave room for the motion along the moving axis
        if unit:
            start[axis] = margin + travel / 2 - unit * travel / 2 + float(rng.uniform(0, SIZE - 2 * margin - travel))
    frames = np.full((FRAMES, SIZE, SIZE, 3), 255, dtype=np.uint8)
    for t, frame in enumerate(frames):
        _draw(frame, shape, (start[0] + ux * STEP * t, start[1] + uy * STEP * t), radius, COLOURS[colour])
    return Video(frames, float(FPS)), f"{_article(colour)} {colour} {shape} moving {direction}"


# Dialogues -----------------------------------------------------------------------------------


def _dialogue(media: list[_Media], runs: dict[str, str], rng: np.random.Generator) -> list[dict]:
    """1-3 exchanges, each a generation request or a question about one of ``media``."""
    messages: list[dict] = []
    for _ in range(int(rng.integers(1, 4))):
        modality = _pick(rng, MODALITIES)
        attached = [m for m in media if m.modality == modality] or media
        if modality in runs and rng.random() >= 0.4:
            messages.extend(_generation_exchange(modality, runs[modality], rng))
        else:
            messages.extend(_question_exchange(attached[int(rng.integers(len(attached)))], rng))
    return messages


def _generation_exchange(modality: str, run: str, rng: np.random.Generator) -> list[dict]:
    """A request for new media, answered with a short text and the signal run."""
    caption = _CAPTIONERS[modality](rng)[1]
    request = _pick(rng, _REQUESTS[modality]).format(caption=caption)
    answer = _pick(rng, _ANSWERS).format(caption=caption, run=run)
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]


def _question_exchange(item: _Media, rng: np.random.Generator) -> list[dict]:
    """A question about an attached file, answered with its caption."""
    question = _pick(rng, _QUESTIONS[item.modality])
    answer = item.caption[0].upper() + item.caption[1:] + "."
    return [{"role": "user", "content": question, item.modality: [item.path]},
            {"role": "assistant", "content": answer}]


_CAPTIONERS: dict[str, Callable] = {"image": _image, "audio": _audio, "video": _video}

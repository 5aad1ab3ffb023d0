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
its caption), in the train phrasings only.

The world itself (attributes, renderers, phrasings) lives in :mod:`anygpt.alignment.world`;
this module only writes it to files and manifests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from anygpt.alignment.world import (ANSWERS, BACKGROUNDS, COLOURS, DIRECTIONS, FPS, FRAMES, MODALITIES,
                                    PITCHES, QUESTIONS, REQUESTS, SAMPLE_RATE, SHAPES, SIZE, STEP, WAVEFORMS,
                                    pick, render_item, sample_item)
from anygpt.modalities import get_modality

logger = logging.getLogger(__name__)

# The world's tables stay importable from here, where they used to live.
__all__ = ["make_synthetic_dataset", "COLOURS", "BACKGROUNDS", "SHAPES", "PITCHES", "WAVEFORMS",
           "DIRECTIONS", "MODALITIES", "SIZE", "SAMPLE_RATE", "FRAMES", "FPS", "STEP"]


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


# Media ---------------------------------------------------------------------------------------


def _make_media(root: Path, split: str, index: int, modality: str, rng: np.random.Generator) -> _Media:
    spec = get_modality(modality)
    item = sample_item(modality, rng)
    relative = f"{split}/{modality}_{index:04d}{spec.output_suffix}"
    spec.write(render_item(item, rng), root / relative)
    return _Media(modality, relative, item.caption())


# Dialogues -----------------------------------------------------------------------------------


def _dialogue(media: list[_Media], runs: dict[str, str], rng: np.random.Generator) -> list[dict]:
    """1-3 exchanges, each a generation request or a question about one of ``media``."""
    messages: list[dict] = []
    for _ in range(int(rng.integers(1, 4))):
        modality = pick(rng, MODALITIES)
        attached = [m for m in media if m.modality == modality] or media
        if modality in runs and rng.random() >= 0.4:
            messages.extend(_generation_exchange(modality, runs[modality], rng))
        else:
            messages.extend(_question_exchange(attached[int(rng.integers(len(attached)))], rng))
    return messages


def _generation_exchange(modality: str, run: str, rng: np.random.Generator) -> list[dict]:
    """A request for new media, answered with a short text and the signal run."""
    item = sample_item(modality, rng)
    # Rendered and thrown away: the dataset has always drawn a size and position here, and
    # skipping those draws would change every later row.
    render_item(item, rng)
    caption = item.caption()
    request = pick(rng, REQUESTS[modality].train).format(caption=caption)
    answer = pick(rng, ANSWERS).format(caption=caption, run=run)
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer, "caption": caption}]


def _question_exchange(item: _Media, rng: np.random.Generator) -> list[dict]:
    """A question about an attached file, answered with its caption."""
    question = pick(rng, QUESTIONS[item.modality].train)
    answer = item.caption[0].upper() + item.caption[1:] + "."
    return [{"role": "user", "content": question, item.modality: [item.path]},
            {"role": "assistant", "content": answer}]


"""Writing a :class:`~anygpt.types.GenerationOutput` to a folder: each media item in its
modality's format (:attr:`ModalitySpec.output_suffix`) plus ``answer.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from anygpt.modalities import get_modality
from anygpt.types import GenerationOutput, TextSegment

__all__ = ["save_output"]


def save_output(output: GenerationOutput, directory: str | os.PathLike[str]) -> list[Path]:
    """Write the answer's media (``image_0.png``, ``audio_0.wav``, ``video_0.mp4``, ...) and
    ``answer.json``, which describes the answer in order, into ``directory`` (created).

    Returns:
        The paths written, media first and ``answer.json`` last.

    Raises:
        MediaError: a media value is invalid or a file cannot be written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    entries: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for seg in output.segments:
        if isinstance(seg, TextSegment):
            entries.append({"type": "text", "text": seg.text})
            continue
        spec = get_modality(seg.modality)
        index = counts.get(seg.modality, 0)
        counts[seg.modality] = index + 1
        # An input-only modality has no suffix; its write() raises the explanation.
        path = spec.write(seg.value, out / f"{seg.modality}_{index}{spec.output_suffix or ''}")
        written.append(path)
        entries.append({"type": seg.modality, "path": path.name, "forced": seg.forced})
    answer = {"text": output.text, "raw_text": output.raw_text, "segments": entries,
              "num_generated_tokens": output.num_generated_tokens, "timings": output.timings}
    json_path = out / "answer.json"
    json_path.write_text(json.dumps(answer, indent=2, ensure_ascii=False) + "\n")
    written.append(json_path)
    return written

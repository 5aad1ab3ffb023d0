"""Plain data types that cross package boundaries: media values and generation outputs.

Media leave the system as:

* images: ``PIL.Image.Image`` (RGB);
* audio: :class:`Audio`, a float waveform in [-1, 1] with its sample rate;
* video: :class:`Video`, uint8 frames (F, H, W, 3) with their frame rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["Audio", "Video", "TextSegment", "MediaSegment", "Segment", "GenerationOutput",
           "TextDelta", "MediaStarted", "DecodeProgress"]

@dataclass
class Audio:
    """A mono or multi-channel waveform.

    Attributes:
        waveform: float32 array, shape (T,) for mono or (C, T), values in [-1, 1].
        sample_rate: samples per second.
    """

    waveform: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.waveform.shape[-1] / float(self.sample_rate)


@dataclass
class Video:
    """A clip of RGB frames.

    Attributes:
        frames: uint8 array of shape (F, H, W, 3).
        fps: frames per second.
    """

    frames: np.ndarray
    fps: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration(self) -> float:
        return self.num_frames / float(self.fps)


@dataclass
class TextSegment:
    """A run of answer text."""

    text: str
    kind: Literal["text"] = "text"


@dataclass
class MediaSegment:
    """A generated media item and the signal run it came from.

    Attributes:
        modality: "image", "audio" or "video".
        value: ``PIL.Image.Image``, :class:`Audio` or :class:`Video`.
        forced: True when the pipeline appended the whole signal run because the LLM wrote
            none for a requested output (a run the LLM began and the pipeline completed is not
            forced).
    """

    modality: str
    value: Any
    forced: bool = False
    kind: Literal["media"] = "media"


Segment = Union[TextSegment, MediaSegment]


@dataclass
class TextDelta:
    """A streamed piece of answer text (from :meth:`AnyGPTPipeline.stream`)."""

    text: str


@dataclass
class MediaStarted:
    """Streamed when a decoder starts on the answer's ``index``-th media item."""

    modality: str
    index: int


@dataclass
class DecodeProgress:
    """A decoder finished one denoising step (passed to ``on_progress`` callbacks).

    Attributes:
        modality: the media being made (``image``, ``audio``, ``video``).
        label: which items of the answer this call makes (``image 1/2``, ``image 1-3/4``).
        step: denoising steps done so far, 1 to ``steps``.
        steps: denoising steps of this call.
        elapsed_s: seconds since the decoder call began.
    """

    modality: str
    label: str
    step: int
    steps: int
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        """Seconds left, at the mean pace of the steps so far."""
        return self.elapsed_s / max(self.step, 1) * max(self.steps - self.step, 0)

    def describe(self) -> str:
        """``"image 1/1 · step 7/25 · ETA 3 s"``: one line for a progress display."""
        return f"{self.label} · step {self.step}/{self.steps} · ETA {self.eta_s:.0f} s"


@dataclass
class GenerationOutput:
    """One answer: text and media segments in the order the LLM wrote them.

    Write it to a folder with :func:`anygpt.export.save_output` (data types do no file I/O).

    Attributes:
        segments: the answer, in order.
        raw_text: the LLM's decoded output including signal tokens.
        timings: seconds spent per stage ("encode", "prefill", "decode", "decoder/image", ...).
        num_generated_tokens: tokens the LLM produced (including forced signal tokens).
        num_prompt_tokens: positions of the prompt, media slots included.
        num_cached_tokens: prompt positions taken from the chat's kept KV cache rather than
            prefilled again.
        stop_reason: why the LLM stopped: ``eos``, ``stop_string`` or ``length`` (the
            ``max_new_tokens`` budget).
    """

    segments: list[Segment] = field(default_factory=list)
    raw_text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    num_generated_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    stop_reason: str = ""

    @property
    def text(self) -> str:
        """The answer's text without signal tokens."""
        return "".join(s.text for s in self.segments if isinstance(s, TextSegment)).strip()

    def media(self, modality: str | None = None) -> list[Any]:
        """The generated media values, optionally only those of one modality."""
        return [
            s.value
            for s in self.segments
            if isinstance(s, MediaSegment) and (modality is None or s.modality == modality)
        ]

    @property
    def images(self) -> "list[Image]":
        return self.media("image")

    @property
    def audios(self) -> list[Audio]:
        return self.media("audio")

    @property
    def videos(self) -> list[Video]:
        return self.media("video")

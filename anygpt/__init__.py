"""AnyGPT: any-to-any multimodal generation.

Text, images, audio and video in; text, images, audio and video out. The public API::

    from anygpt import AnyGPTPipeline, save_output
    pipe = AnyGPTPipeline.from_pretrained("mini")
    out = pipe("Describe this and draw a variation", images=["cat.png"], outputs=("image",))
    save_output(out, "answer/")

Importing ``anygpt`` is light: torch, transformers, diffusers and ImageBind load only when a
model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anygpt.errors import (
    AnyGPTError,
    Cancelled,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    MediaError,
    UnknownNameError,
    WeightsNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "AnyGPTPipeline", "AnyGPTConfig", "Conversation", "GenerationOutput", "Audio", "Video",
    "TextSegment", "MediaSegment", "TextDelta", "MediaStarted", "DecodeProgress",
    "AnyGPTError", "Cancelled", "CheckpointError", "ConfigError", "ContextLengthError", "MediaError", "UnknownNameError",
    "WeightsNotFoundError", "list_presets", "save_output",
]

_LAZY = {
    "AnyGPTPipeline": "anygpt.pipeline",
    "AnyGPTConfig": "anygpt.config",
    "list_presets": "anygpt.config",
    "Conversation": "anygpt.conversation",
    "GenerationOutput": "anygpt.types",
    "Audio": "anygpt.types",
    "Video": "anygpt.types",
    "TextSegment": "anygpt.types",
    "MediaSegment": "anygpt.types",
    "TextDelta": "anygpt.types",
    "MediaStarted": "anygpt.types",
    "DecodeProgress": "anygpt.types",
    "save_output": "anygpt.export",
}

if TYPE_CHECKING:
    from anygpt.config import AnyGPTConfig, list_presets
    from anygpt.conversation import Conversation
    from anygpt.export import save_output
    from anygpt.pipeline import AnyGPTPipeline
    from anygpt.types import (Audio, DecodeProgress, GenerationOutput, MediaSegment, MediaStarted, TextDelta,
                              TextSegment, Video)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anygpt' has no attribute {name!r}")

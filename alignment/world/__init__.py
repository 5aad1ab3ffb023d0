"""The procedural world that the miniature is trained on and judged in.

* :mod:`.spec`: the attributes, one frozen item type per medium (:class:`ImageItem`,
  :class:`SoundItem`, :class:`ClipItem`), their captions and parsing;
* :mod:`.phrasing`: caption variants, requests, questions and plain chat, each split into
  train and held-out phrasings;
* :mod:`.render`: random items and their images, tones and clips;
* :mod:`.detect`: detectors that read the attributes back off any medium, knowing only the spec.

Importing this package needs numpy only.
"""

from .detect import MIN_SCORE, Detection, detect_clip, detect_image, detect_media, detect_sound
from .phrasing import (ANSWERS, CAPTIONS, PLAIN_QUESTIONS, PLAIN_REPLIES, QUESTIONS, REQUESTS, Phrasings,
                       all_phrasings)
from .render import (draw_shape, pick, render_clip, render_image, render_item, render_sound, sample_clip,
                     sample_image, sample_item, sample_sound)
from .spec import (BACKGROUNDS, CLIP_BACKGROUND, COLOURS, DIRECTIONS, FPS, FRAMES, ITEM_TYPES, MODALITIES,
                   PITCHES, SAMPLE_RATE, SHAPES, SIZE, STEP, WAVEFORMS, ClipItem, ImageItem, Item, SoundItem,
                   all_items, parse_caption)

__all__ = [
    # spec
    "MODALITIES", "COLOURS", "BACKGROUNDS", "SHAPES", "PITCHES", "WAVEFORMS", "DIRECTIONS", "SIZE",
    "SAMPLE_RATE", "FRAMES", "FPS", "STEP", "CLIP_BACKGROUND", "ImageItem", "SoundItem", "ClipItem", "Item",
    "ITEM_TYPES", "all_items", "parse_caption",
    # phrasing
    "Phrasings", "CAPTIONS", "REQUESTS", "QUESTIONS", "ANSWERS", "PLAIN_QUESTIONS", "PLAIN_REPLIES",
    "all_phrasings",
    # render
    "pick", "sample_image", "sample_sound", "sample_clip", "sample_item", "render_image", "render_sound",
    "render_clip", "render_item", "draw_shape",
    # detect
    "Detection", "MIN_SCORE", "detect_image", "detect_sound", "detect_clip", "detect_media",
]

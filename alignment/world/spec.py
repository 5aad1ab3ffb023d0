"""The world's specification: its attributes, one frozen item type per medium, and captions.

Everything else in :mod:`anygpt.alignment.world` (renderers, detectors, phrasings) is derived
from these tables, so the world changes in one place. An item's caption names exactly its
attributes; :func:`parse_caption` reads them back.

A caption template is a string with one ``{field}`` per attribute of the item, written with
the article "a" throughout ("a {colour} {shape}"); "a" becomes "an" before a vowel when it is
filled in and is read as either when parsing.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Iterable, Union

__all__ = ["MODALITIES", "COLOURS", "BACKGROUNDS", "SHAPES", "PITCHES", "WAVEFORMS", "DIRECTIONS",
           "SIZE", "SAMPLE_RATE", "FRAMES", "FPS", "STEP", "CLIP_BACKGROUND", "ImageItem", "SoundItem",
           "ClipItem", "Item", "ITEM_TYPES", "all_items", "parse_caption"]

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

#: Image and frame side in pixels; audio sample rate; clip length, frame rate and the shape's
#: displacement per frame in pixels.
SIZE = 64
SAMPLE_RATE = 16000
FRAMES, FPS, STEP = 8, 8, 4
#: Clips have no background attribute: every clip is drawn on this one.
CLIP_BACKGROUND = "white"


class _Item:
    """Shared behaviour of the item types: validation, attributes and captions."""

    modality: ClassVar[str]
    #: The canonical caption template (the one the synthetic dataset writes).
    TEMPLATE: ClassVar[str]
    #: Attribute name → its allowed values.
    VALUES: ClassVar[dict[str, tuple[str, ...]]]

    def __post_init__(self) -> None:
        for name, value in self.attributes().items():
            if value not in self.VALUES[name]:
                raise ValueError(f"{type(self).__name__}.{name} must be one of {self.VALUES[name]}, "
                                 f"got {value!r}")

    def attributes(self) -> dict[str, str]:
        """Attribute name → value, in field order."""
        return asdict(self)  # type: ignore[call-overload]

    def caption(self, template: str | None = None) -> str:
        """The caption from ``template`` (default :attr:`TEMPLATE`): "a red circle on a white background"."""
        return _with_articles((template or self.TEMPLATE).format(**self.attributes()))


@dataclass(frozen=True)
class ImageItem(_Item):
    """A ``colour`` ``shape`` on a plain ``background``."""

    shape: str
    colour: str
    background: str

    modality: ClassVar[str] = "image"
    TEMPLATE: ClassVar[str] = "a {colour} {shape} on a {background} background"
    VALUES: ClassVar[dict[str, tuple[str, ...]]] = {
        "shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}


@dataclass(frozen=True)
class SoundItem(_Item):
    """A 1 s tone of a ``pitch`` and ``waveform``."""

    pitch: str
    waveform: str

    modality: ClassVar[str] = "audio"
    TEMPLATE: ClassVar[str] = "a {pitch} {waveform} tone"
    VALUES: ClassVar[dict[str, tuple[str, ...]]] = {"pitch": tuple(PITCHES), "waveform": WAVEFORMS}


@dataclass(frozen=True)
class ClipItem(_Item):
    """A ``colour`` ``shape`` moving in a ``direction`` on the clip background."""

    shape: str
    colour: str
    direction: str

    modality: ClassVar[str] = "video"
    TEMPLATE: ClassVar[str] = "a {colour} {shape} moving {direction}"
    VALUES: ClassVar[dict[str, tuple[str, ...]]] = {
        "shape": SHAPES, "colour": tuple(COLOURS), "direction": tuple(DIRECTIONS)}


Item = Union[ImageItem, SoundItem, ClipItem]
ITEM_TYPES: dict[str, type] = {"image": ImageItem, "audio": SoundItem, "video": ClipItem}


def all_items(modality: str) -> list[Item]:
    """Every item of ``modality`` (54 images, 9 sounds, 72 clips), in attribute order."""
    kind = _item_type(modality)
    names = [f.name for f in fields(kind)]
    return [kind(*values) for values in itertools.product(*(kind.VALUES[n] for n in names))]


def parse_caption(caption: str, modality: str | None = None, templates: Iterable[str] | None = None) -> Item:
    """The item that ``caption`` describes.

    Case, surrounding spaces, a final full stop and "a"/"an" do not matter.

    Args:
        caption: e.g. "A red circle on a white background."
        modality: only try this modality's items; default all of them.
        templates: caption templates to try; default each item type's :attr:`TEMPLATE`.

    Raises:
        ValueError: the caption matches no template.
    """
    text = _normalise(caption)
    for name in (modality,) if modality else MODALITIES:
        kind = _item_type(name)
        for template in templates or (kind.TEMPLATE,):
            if set(re.findall(r"\{(\w+)\}", template)) != set(kind.VALUES):
                continue  # another medium's template
            match = _pattern(kind, template).fullmatch(text)
            if match:
                return kind(**match.groupdict())
    raise ValueError(f"{caption!r} is not a caption of the world")


def _item_type(modality: str) -> type:
    if modality not in ITEM_TYPES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return ITEM_TYPES[modality]


def _with_articles(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _normalise(text: str) -> str:
    text = " ".join(text.strip().rstrip(".").split()).lower()
    return re.sub(r"\ban\b", "a", text)


@functools.lru_cache(maxsize=None)
def _pattern(kind: type, template: str) -> re.Pattern:
    """A regex for ``template`` whose named groups capture the item's attributes."""
    pieces = re.split(r"\{(\w+)\}", _normalise(template))
    # re.split alternates literal text and field names.
    regex = "".join(re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>{'|'.join(kind.VALUES[piece])})"
                    for i, piece in enumerate(pieces))
    return re.compile(regex)

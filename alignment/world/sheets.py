"""Pictures of what a model made: contact sheets of images and clips, spectrograms of sounds.

Each function returns a ``PIL.Image`` (the caller saves it); captions are written under each
tile in Pillow's built-in font.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["image_sheet", "clip_sheet", "spectrogram_sheet", "spectrogram"]

_LABEL_HEIGHT = 12


def _as_array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)


def _tile(pixels: np.ndarray, label: str, width: int) -> Any:
    """One tile: the pixels (padded to ``width``) above a one-line label."""
    from PIL import Image, ImageDraw

    height = pixels.shape[0]
    tile = Image.new("RGB", (width, height + _LABEL_HEIGHT), (255, 255, 255))
    tile.paste(Image.fromarray(pixels), (0, 0))
    ImageDraw.Draw(tile).text((1, height), label[: max(1, width // 6)], fill=(0, 0, 0))
    return tile


def _grid(tiles: Sequence[Any], columns: int) -> Any:
    from PIL import Image

    width, height = tiles[0].size
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * width, (index // columns) * height))
    return sheet


def _short(caption: str) -> str:
    """ "a red circle on a white background" → "red circle/white" (fits under a 64 px tile)."""
    words = [w for w in caption.split() if w not in ("a", "an", "on", "background", "tone", "moving")]
    return " ".join(words)


def image_sheet(images: Sequence[Any], captions: Sequence[str], columns: int = 9, zoom: int = 2) -> Any:
    """A grid of images (enlarged ``zoom`` times), each labelled with a short form of its caption."""
    if not images:
        raise ValueError("image_sheet needs at least one image")
    arrays = [_as_array(image).repeat(zoom, axis=0).repeat(zoom, axis=1) for image in images]
    width = max(a.shape[1] for a in arrays)
    return _grid([_tile(a, _short(c), width) for a, c in zip(arrays, captions)], columns)


def clip_sheet(clips: Sequence[Any], captions: Sequence[str]) -> Any:
    """One row per clip: its frames side by side, labelled with its caption."""
    if not clips:
        raise ValueError("clip_sheet needs at least one clip")
    rows = []
    for clip, caption in zip(clips, captions):
        frames = np.asarray(getattr(clip, "frames", clip), dtype=np.uint8)  # (F, H, W, 3)
        strip = np.concatenate(list(frames), axis=1)  # (H, F*W, 3)
        rows.append(_tile(strip, _short(caption), strip.shape[1]))
    return _grid(rows, 1)


def spectrogram(audio: Any, height: int = 64, max_hz: float = 4000.0) -> np.ndarray:
    """A greyscale (height, frames) uint8 log-magnitude spectrogram of an ``Audio`` value,
    0 Hz at the bottom, up to ``max_hz``."""
    wave = np.asarray(audio.waveform, dtype=np.float64).reshape(-1, audio.waveform.shape[-1]).mean(axis=0)
    rate, window, hop = float(audio.sample_rate), 1024, 256
    if len(wave) < window:
        wave = np.pad(wave, (0, window - len(wave)))
    starts = range(0, len(wave) - window + 1, hop)
    frames = np.stack([wave[s:s + window] * np.hanning(window) for s in starts])
    power = np.abs(np.fft.rfft(frames, axis=1)).T  # (bins, frames)
    keep = int(max_hz / (rate / window))
    db = 20 * np.log10(power[:keep] + 1e-6)
    db = np.clip((db - (db.max() - 60)) / 60, 0, 1)  # a 60 dB range
    rows = np.linspace(0, keep - 1, height).astype(int)
    return (255 * (1 - db[rows][::-1])).astype(np.uint8)


def spectrogram_sheet(sounds: Sequence[Any], captions: Sequence[str], columns: int = 3) -> Any:
    """A grid of spectrograms (dark = loud), each labelled with its caption."""
    if not sounds:
        raise ValueError("spectrogram_sheet needs at least one sound")
    tiles = []
    for sound, caption in zip(sounds, captions):
        grey = spectrogram(sound)
        pixels = np.repeat(np.repeat(grey, 2, axis=1)[..., None], 3, axis=2)
        tiles.append(_tile(pixels, _short(caption), max(pixels.shape[1], 120)))
    return _grid(tiles, columns)

"""The procedural world: its spec and captions, phrasings, renderers and spec-only detectors.

The detector tests render every combination of attributes at several random positions,
phases and detunings, and measure how often each attribute is read back: on clean media, on
degraded media, and on noise (where a detector must answer "unknown", not guess).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageFilter

from anygpt.alignment import world
from anygpt.alignment.world import (CAPTIONS, PLAIN_QUESTIONS, PLAIN_REPLIES, QUESTIONS, REQUESTS, ClipItem,
                                    Detection, ImageItem, Phrasings, SoundItem, all_items, all_phrasings,
                                    detect_media, parse_caption, render_item)
from anygpt.types import Audio, Video

DETECTORS = {"image": world.detect_image, "audio": world.detect_sound, "video": world.detect_clip}
#: Random renders of each combination of attributes.
REPEATS = {"image": 4, "audio": 20, "video": 3}


def _rates(modality: str, degrade: Callable, seed: int) -> tuple[dict[str, float], list]:
    """Each attribute's share of right answers over REPEATS renders of every item, and the misses."""
    rng = np.random.default_rng(seed)
    right, misses, total = Counter(), [], 0
    for item in all_items(modality):
        for _ in range(REPEATS[modality]):
            detections = DETECTORS[modality](degrade(render_item(item, rng), rng))
            total += 1
            for name, value in item.attributes().items():
                if detections[name].value == value:
                    right[name] += 1
                else:
                    misses.append((item, name, detections[name]))
    return {name: right[name] / total for name in item.attributes()}, misses


def _values(detections: dict[str, Detection]) -> dict[str, str | None]:
    return {name: detection.value for name, detection in detections.items()}


def _reported_too_often(detections: list[dict[str, Detection]], limit: float) -> dict[str, float]:
    """The attributes reported (not unknown) on more than ``limit`` of ``detections``."""
    reported = {name: np.mean([d[name].value is not None for d in detections]) for name in detections[0]}
    return {name: rate for name, rate in reported.items() if rate > limit}


# Degradations ---------------------------------------------------------------------------------


def _blur(pixels: np.ndarray, radius: float = 1.0) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))


def _noise(pixels: np.ndarray, rng: np.random.Generator, sigma: float = 16.0) -> np.ndarray:
    return np.clip(pixels + rng.normal(0.0, sigma, pixels.shape), 0, 255).astype(np.uint8)


def _blur_frames(frames: np.ndarray) -> np.ndarray:
    return np.stack([_blur(frame) for frame in frames])


def _resample(audio: Audio, rate: int) -> Audio:
    """Linear interpolation to ``rate`` (no anti-aliasing filter: a crude but common converter)."""
    times = np.arange(round(audio.waveform.shape[-1] * rate / audio.sample_rate)) / rate
    source = np.arange(audio.waveform.shape[-1]) / audio.sample_rate
    return Audio(np.interp(times, source, audio.waveform).astype(np.float32), rate)


def _hiss(audio: Audio, rng: np.random.Generator, sigma: float = 0.02) -> Audio:
    """White noise ~23 dB below the 0.4-amplitude tones."""
    return Audio((audio.waveform + rng.normal(0.0, sigma, audio.waveform.shape)).astype(np.float32),
                 audio.sample_rate)


DEGRADED = {
    "image: blur": ("image", lambda image, rng: _blur(image)),
    "image: noise": ("image", lambda image, rng: _noise(image, rng)),
    "image: blur + noise": ("image", lambda image, rng: _noise(_blur(image), rng)),
    "audio: noise": ("audio", _hiss),
    "audio: 22.05 kHz": ("audio", lambda audio, rng: _resample(audio, 22050)),
    "audio: 22.05 kHz + noise": ("audio", lambda audio, rng: _hiss(_resample(audio, 22050), rng)),
    "audio: 44.1 kHz": ("audio", lambda audio, rng: _resample(audio, 44100)),
    "video: blur + noise": ("video", lambda video, rng: Video(_noise(_blur_frames(video.frames), rng), video.fps)),
}


# Spec and captions ----------------------------------------------------------------------------


def test_enumeration_covers_every_combination_once():
    sizes = {modality: len(all_items(modality)) for modality in world.MODALITIES}
    assert sizes == {"image": 54, "audio": 9, "video": 72}
    for modality in world.MODALITIES:
        assert len(set(all_items(modality))) == sizes[modality]


def test_captions_are_the_synthetic_datasets():
    assert ImageItem("circle", "red", "white").caption() == "a red circle on a white background"
    assert ImageItem("triangle", "orange", "gray").caption() == "an orange triangle on a gray background"
    assert SoundItem("low", "sine").caption() == "a low sine tone"
    assert ClipItem("square", "blue", "right").caption() == "a blue square moving right"


@pytest.mark.parametrize("modality", world.MODALITIES)
def test_every_caption_round_trips_through_parsing(modality):
    assert CAPTIONS[modality].train[0] == world.ITEM_TYPES[modality].TEMPLATE
    every_template = [t for table in CAPTIONS.values() for t in table.train + table.held_out]
    for item in all_items(modality):
        assert parse_caption(item.caption()) == item
        assert parse_caption(item.caption()[0].upper() + item.caption()[1:] + ".", modality) == item
        # Every variant, read without saying which medium it is: no two items share a caption.
        for template in CAPTIONS[modality].train + CAPTIONS[modality].held_out:
            assert parse_caption(item.caption(template), templates=every_template) == item, template


def test_parsing_rejects_what_is_not_in_the_world():
    for caption in ("a pink circle on a white background", "a red circle", "a low flute tone",
                    "a blue square moving diagonally", ""):
        with pytest.raises(ValueError, match="not a caption"):
            parse_caption(caption)
    with pytest.raises(ValueError, match="colour must be one of"):
        ImageItem("circle", "pink", "white")
    with pytest.raises(ValueError, match="modality must be one of"):
        all_items("smell")


# Phrasings ------------------------------------------------------------------------------------


def test_held_out_phrasings_are_disjoint_from_train():
    train, held_out = all_phrasings("train"), all_phrasings("held_out")
    assert train and held_out
    assert train & held_out == set()
    # Nor may they differ only in case or spacing.
    def normalised(phrases):
        return {" ".join(p.lower().split()) for p in phrases}

    assert normalised(train) & normalised(held_out) == set()
    with pytest.raises(ValueError, match="both in train and held out"):
        Phrasings(train=("draw {caption}",), held_out=("draw {caption}",))


def test_every_table_has_several_phrasings_of_each_split_with_its_placeholders():
    placeholders = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
    for modality in world.MODALITIES:
        for split in ("train", "held_out"):
            assert len(CAPTIONS[modality].split(split)) >= 2
            assert len(REQUESTS[modality].split(split)) >= 3
            assert all("{caption}" in r for r in REQUESTS[modality].split(split))
            assert len(QUESTIONS[modality].split(split)) >= 2
            assert all(q.count(placeholders[modality]) == 1 for q in QUESTIONS[modality].split(split))
    assert len(PLAIN_QUESTIONS.train) >= 3 and len(PLAIN_QUESTIONS.held_out) >= 3
    assert set(PLAIN_REPLIES) == set(PLAIN_QUESTIONS.train)


def test_plain_questions_name_no_medium():
    media_words = ("draw", "paint", "picture", "image", "photo", "play", "sound", "hear", "video", "clip",
                   "animate", "show", "<")
    for question in PLAIN_QUESTIONS.train + PLAIN_QUESTIONS.held_out:
        assert not [w for w in media_words if w in question.lower()], question


def test_the_synthetic_datasets_phrasings_are_train_phrasings_in_their_order():
    # make_synthetic_dataset picks from these tuples by index: reordering them changes the data.
    assert REQUESTS["image"].train == ("show me {caption}", "draw {caption}", "can you paint {caption}?")
    assert REQUESTS["audio"].train == ("play {caption}", "let me hear {caption}", "make a sound: {caption}")
    assert REQUESTS["video"].train == ("make a video of {caption}", "show me a clip of {caption}",
                                       "animate {caption}")
    assert QUESTIONS["image"].train == ("<image> What is in this picture?", "Describe this image. <image>")
    assert QUESTIONS["audio"].train == ("<audio> What do you hear?", "Describe this sound. <audio>")
    assert QUESTIONS["video"].train == ("<video> What happens in this video?", "Describe this clip. <video>")
    assert world.ANSWERS == ("Here is {caption}. {run}", "Sure! {run}", "This is {caption}: {run}")


# Detectors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", world.MODALITIES)
def test_detectors_are_right_on_the_worlds_own_media(modality):
    rates, misses = _rates(modality, lambda value, rng: value, seed=0)
    assert min(rates.values()) >= 0.99, (rates, misses[:5])


@pytest.mark.parametrize("name", list(DEGRADED))
def test_detectors_survive_degradation(name):
    modality, degrade = DEGRADED[name]
    rates, misses = _rates(modality, degrade, seed=1)
    assert min(rates.values()) >= 0.95, (rates, misses[:5])


def _blocks(rng: np.random.Generator, shape: tuple[int, ...], block: int = 8) -> np.ndarray:
    """Random colour blocks: noise with large smooth regions, which a pixel-noise filter keeps."""
    coarse = rng.integers(0, 256, (*shape[:-3], shape[-3] // block, shape[-2] // block, 3))
    return np.repeat(np.repeat(coarse, block, axis=-3), block, axis=-2).astype(np.uint8)


def _pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


NOISE = {
    "image: pixel noise": ("image", lambda rng: _pixels(rng, (64, 64, 3))),
    "image: block noise": ("image", lambda rng: _blocks(rng, (64, 64, 3))),
    "image: large pixel noise": ("image", lambda rng: _pixels(rng, (256, 256, 3))),
    "audio: uniform noise": ("audio", lambda rng: Audio(rng.uniform(-1, 1, 16000).astype(np.float32), 16000)),
    "audio: gaussian noise, 22.05 kHz": ("audio",
                                         lambda rng: Audio(rng.normal(0, 0.3, 22050).astype(np.float32), 22050)),
    "video: pixel noise": ("video", lambda rng: Video(_pixels(rng, (8, 64, 64, 3)), 8.0)),
    "video: block noise": ("video", lambda rng: Video(_blocks(rng, (8, 64, 64, 3)), 8.0)),
}


@pytest.mark.parametrize("name", list(NOISE))
def test_detectors_refuse_noise(name):
    # With 3 shapes a guess is right a third of the time: noise must come out unknown instead.
    modality, make = NOISE[name]
    rng = np.random.default_rng(2)
    detections = [DETECTORS[modality](make(rng)) for _ in range(100)]
    assert _reported_too_often(detections, limit=0.02) == {}


def test_a_shape_that_does_not_move_has_no_direction():
    frame = render_item(ImageItem("circle", "red", "white"), np.random.default_rng(3))
    detections = world.detect_clip(Video(np.stack([frame] * 8), 8.0))
    assert detections["direction"].value is None
    assert (detections["shape"].value, detections["colour"].value) == ("circle", "red")


def test_silence_and_a_blank_picture_are_unknown():
    sound = world.detect_sound(Audio(np.zeros(16000, dtype=np.float32), 16000))
    assert all(d.value is None for d in sound.values())
    picture = world.detect_image(np.full((64, 64, 3), 255, dtype=np.uint8))
    assert _values(picture) == {"shape": None, "colour": None, "background": "white"}


def test_detectors_accept_every_form_of_their_medium():
    rng = np.random.default_rng(4)
    item = ImageItem("triangle", "green", "black")
    pixels = render_item(item, rng)
    forms = {"array": pixels, "PIL": Image.fromarray(pixels), "floats in [0, 1]": pixels / 255.0,
             "RGBA": np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)]),
             "512 × 512": np.asarray(Image.fromarray(pixels).resize((512, 512), Image.BILINEAR))}
    for form, value in forms.items():
        assert _values(detect_media("image", value)) == item.attributes(), form

    sound = SoundItem("high", "sawtooth")
    tone = render_item(sound, rng)
    stereo = Audio(np.stack([tone.waveform, tone.waveform]), tone.sample_rate)
    for form, value in {"Audio": tone, "stereo": stereo, "48 kHz": _resample(tone, 48000)}.items():
        assert _values(detect_media("audio", value)) == sound.attributes(), form
    assert _values(world.detect_sound(tone.waveform, tone.sample_rate)) == sound.attributes()

    clip = ClipItem("square", "purple", "up")
    video = render_item(clip, rng)
    for form, value in {"Video": video, "array": video.frames,
                        "PIL frames": [Image.fromarray(f) for f in video.frames]}.items():
        assert _values(detect_media("video", value)) == clip.attributes(), form


def test_detectors_read_the_synthetic_datasets_files(tmp_path):
    # The files go through PNG, WAV and (lossy) MP4: their captions must still be read back.
    from anygpt.alignment.synthetic import make_synthetic_dataset
    from anygpt.modalities import get_modality

    paths = make_synthetic_dataset(tmp_path, num_train=12, num_val=3, seed=5)
    for line in paths["captions_train"].read_text().splitlines():
        row = json.loads(line)
        modality = next(m for m in world.MODALITIES if m in row)
        detections = detect_media(modality, get_modality(modality).load(tmp_path / row[modality]))
        expected = parse_caption(row["caption"], modality).attributes()
        assert _values(detections) == expected, row


def test_importing_the_world_needs_only_numpy():
    probe = ("import sys, anygpt.alignment.world; "
             "print([m for m in ('torch', 'scipy', 'PIL', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""The world evaluator scores what it should: an oracle that renders exactly what was asked and
reads media with the detectors gets every rate right; an untrained model does not."""

from __future__ import annotations

import re

import numpy as np
import pytest

from anygpt.alignment.world import REQUESTS, detect_media, parse_caption, render_item
from anygpt.alignment.world.evaluate import CHAT_CHECKS, WorldReport, evaluate_world, named_attributes
from anygpt.types import GenerationOutput, MediaSegment, TextSegment

MODALITIES = ("image", "audio", "video")


class _OracleDecoder:
    """Conditioning is the caption itself; decoding renders the captioned item."""

    def encode_text(self, captions):
        return list(captions)

    def decode(self, condition, seed=None, **_):
        rng = np.random.default_rng(seed)
        return [_medium(parse_caption(caption), rng) for caption in condition]


def _medium(item, rng):
    value = render_item(item, rng)
    if item.modality == "image":
        from PIL import Image

        return Image.fromarray(value)
    return value


def _caption_in(prompt: str, modality: str) -> str:
    for template in REQUESTS[modality].held_out + REQUESTS[modality].train:
        pattern = re.escape(template).replace(re.escape("{caption}"), "(.+)")
        match = re.fullmatch(pattern, prompt)
        if match:
            return match.group(1)
    raise AssertionError(f"not a request: {prompt!r}")


class _OraclePipe:
    """A pipeline stand-in that answers every request and question perfectly."""

    class config:  # noqa: N801 - mimics AnyGPTConfig's two views
        output_modalities = list(MODALITIES)
        input_modalities = list(MODALITIES)

    def decoder(self, modality):
        return _OracleDecoder()

    def __call__(self, prompt, outputs=(), seed=None, **kwargs):
        media = {m: kwargs.pop(p) for m, p in zip(MODALITIES, ("images", "audios", "videos")) if p in kwargs}
        if media:
            (modality, (value,)), = media.items()
            found = {k: d.value for k, d in detect_media(modality, value).items()}
            return GenerationOutput(segments=[TextSegment(" ".join(v for v in found.values() if v))])
        for question, _ in CHAT_CHECKS:
            if prompt == question:
                return GenerationOutput(segments=[TextSegment({"France": "Paris.", "plus": "Four.",
                                                               "sky": "Blue."}[_key(question)])])
        for modality in MODALITIES:
            try:
                caption = _caption_in(prompt, modality)
            except AssertionError:
                continue
            value = _medium(parse_caption(caption, modality), np.random.default_rng(seed))
            return GenerationOutput(segments=[TextSegment("Here."), MediaSegment(modality, value)])
        return GenerationOutput(segments=[TextSegment("Hello.")])


def _key(question: str) -> str:
    return next(k for k in ("France", "plus", "sky") if k in question)


def test_an_oracle_scores_every_rate_in_full():
    report = evaluate_world(_OraclePipe(), cases=4, progress=False)
    assert set(report.rates) == {"decoders", "forced", "auto", "understanding", "chat"}
    assert report.counts["decoders"]["image/colour"] == 54 and report.counts["decoders"]["video/direction"] == 72
    for section, rates in report.rates.items():
        assert all(rate == 1.0 for rate in rates.values()), (section, rates)
    assert all(all(p.values()) for p in report.passes().values())
    assert "decoders      image/colour" in report.table()


def test_an_untrained_model_fails_the_bars(tiny_pipe):
    report = evaluate_world(tiny_pipe, sections=("forced", "understanding", "chat"), cases=2,
                            max_new_tokens=4, progress=False)
    assert report.rates["forced"]["image/colour"] < 0.9
    assert report.counts["forced"]["audio/pitch"] == 2
    assert not report.passes()["chat"]["correct"]
    assert isinstance(report, WorldReport) and len(report.answers) == 2 * 3 + len(CHAT_CHECKS)


@pytest.mark.parametrize("text,modality,expected", [
    ("A red circle on a white background.", "image", {"colour": "red", "shape": "circle", "background": "white"}),
    ("It is red or green, maybe a circle.", "image", {"colour": None, "shape": "circle", "background": None}),
    ("A high square tone", "audio", {"pitch": "high", "waveform": "square"}),
    ("Something moves up.", "video", {"direction": "up", "colour": None, "shape": None}),
    ("The word squared is not square-ish", "image", {"shape": "square", "colour": None, "background": None}),
])
def test_answers_must_name_exactly_one_value(text, modality, expected):
    assert named_attributes(text, modality) == expected


def test_unknown_sections_are_refused():
    with pytest.raises(ValueError, match="unknown section"):
        evaluate_world(_OraclePipe(), sections=("decoder",))


@pytest.mark.slow
def test_cli_eval_world_writes_metrics_and_sheets(tmp_path, capsys):
    import json

    from PIL import Image

    from anygpt.cli import main

    out = tmp_path / "world"
    assert main(["eval", "world", "--preset", "tiny", "--sections", "forced,chat", "--cases", "2",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "forced" in printed and f"wrote {out / 'metrics.json'}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rates"]) == {"forced", "chat"}
    with Image.open(out / "forced_image.png") as sheet:
        assert sheet.width >= 2 * 128
    assert (out / "forced_audio.png").is_file() and (out / "forced_video.png").is_file()

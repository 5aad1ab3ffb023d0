"""The `nextgpt-7b` preset builds as far as the weights at hand allow, and a missing component
fails in one line that names it, where it was looked for and how to provide it."""

from __future__ import annotations

import pytest
import yaml

from anygpt import AnyGPTPipeline
from anygpt.config import AnyGPTConfig, preset_file
from anygpt.errors import WeightsNotFoundError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An AnyGPT cache folder with nothing in it (the hub is offline for every test)."""
    monkeypatch.setenv("ANYGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _variant(tmp_path, **replaced) -> str:
    """nextgpt-7b with some top-level sections taken from `tiny` (random weights, no files)."""
    data = yaml.safe_load(preset_file("nextgpt-7b").read_text())
    tiny = yaml.safe_load(preset_file("tiny").read_text())
    for section, extra in replaced.items():
        data[section] = {**tiny[section], **extra}
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _one_line_error(source: str) -> str:
    with pytest.raises(WeightsNotFoundError) as info:
        AnyGPTPipeline.from_pretrained(source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_preset_names_repositories_that_exist():
    config = AnyGPTConfig.from_file(preset_file("nextgpt-7b"))
    assert config.modalities["image"].decoder.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    shapes = {name: tuple(m.decoder.condition_shape) for name, m in config.modalities.items()}
    assert shapes == {"image": (77, 768), "audio": (1, 512), "video": (77, 1024)}


def test_nothing_cached_fails_on_the_first_component_with_how_to_provide_it(empty_cache):
    message = _one_line_error("nextgpt-7b")
    assert str(empty_cache / "imagebind" / "imagebind_huge.pth") in message
    assert "ANYGPT_CACHE" in message and "encoder.pretrained" in message


def test_a_missing_llm_folder_is_named_with_where_it_was_looked_for(empty_cache, tmp_path):
    message = _one_line_error(_variant(tmp_path, encoder={}))
    assert message.startswith("llm.pretrained: no model folder at ")
    assert str(empty_cache / "weights" / "vicuna-7b-v0") in message and "{cache}" in message


def test_the_model_builds_without_any_decoder_file(empty_cache, tmp_path):
    # Encoder and LLM at hand (tiny, random): the decoders' conditioning comes from the preset,
    # so nothing of SD, AudioLDM or zeroscope is read; the next missing piece is the checkpoint.
    message = _one_line_error(_variant(tmp_path, encoder={}, llm={"media_begin": "<Img>", "media_end": "</Img>"}))
    assert message.startswith("checkpoint 'ChocoWu/nextgpt_7b_tiva_v0:pytorch_model.pt'")
    assert "set `checkpoint:` to the local file" in message
    assert "decoder" not in message and "text encoder" not in message

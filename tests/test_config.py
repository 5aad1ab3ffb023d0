"""Configs and presets: loading, validation, round trips, helpful errors."""

import pytest
import yaml

from anygpt.config import AnyGPTConfig, list_presets
from anygpt.errors import ConfigError, UnknownNameError


@pytest.mark.parametrize("name", ["tiny", "mini", "nextgpt-7b"])
def test_presets_load_validate_and_round_trip(name, tmp_path):
    cfg = AnyGPTConfig.from_name(name)
    assert cfg.name == name
    cfg.to_yaml(tmp_path / "c.yaml")
    assert AnyGPTConfig.from_file(tmp_path / "c.yaml") == cfg


def test_list_presets():
    assert list_presets() == ["mini", "nextgpt-7b", "tiny"]


def test_nextgpt_preset_matches_the_release():
    cfg = AnyGPTConfig.from_name("nextgpt-7b")
    assert list(cfg.modalities) == ["image", "video", "audio"]  # fixes the signal token ids
    assert {m: c.num_signal_tokens for m, c in cfg.modalities.items()} == {"image": 4, "video": 24, "audio": 8}
    out = cfg.modalities["image"].output_projector
    assert (out.d_model, out.num_heads, out.num_encoder_layers, out.num_decoder_layers, out.dim_feedforward) == \
        (512, 4, 4, 4, 2048)
    assert cfg.llm.prompt_format == "nextgpt" and cfg.encoder.pretrained == "imagebind_huge"


def _tiny_dict():
    return AnyGPTConfig.from_name("tiny").to_dict()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["modalities"].update(smell={"num_signal_tokens": 2}), "unknown modality 'smell'; valid names: audio, image, video"),
    (lambda d: d["llm"].update(temprature=1), r"config.llm: unknown field\(s\) temprature"),
    (lambda d: d["generation"].update(top_p=2.0), "generation.top_p: must be > 0 and <= 1"),
    (lambda d: d["generation"].update(max_new_tokens="many"), "generation.max_new_tokens: expected an integer"),
    (lambda d: d["modalities"]["image"].update(decoder=None), "modalities.image.decoder: required"),
    (lambda d: d["modalities"]["image"]["output_projector"].update(d_model=30, num_heads=4), "divisible by num_heads"),
    (lambda d: d["llm"].update(dtype="float8"), "llm.dtype: must be one of"),
    (lambda d: d["llm"].update(arch=None, pretrained=None), "llm: set `pretrained`"),
    (lambda d: d.update(modalities={}), "at least one modality"),
    (lambda d: d.update(examples=[{"text": " "}]), r"examples\[0\].text: must not be empty"),
    (lambda d: d.update(examples=[{"text": "Hi", "media": {"smell": ["a.txt"]}}]),
     r"examples\[0\].media: \['smell'\] are not input modalities"),
])
def test_malformed_configs_name_the_field(mutate, match):
    data = _tiny_dict()
    mutate(data)
    with pytest.raises((ConfigError, UnknownNameError), match=match):
        AnyGPTConfig.from_dict(data)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("llm: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        AnyGPTConfig.from_file(path)
    path.write_text(yaml.safe_dump({"llm": {"pretrained": 3}}))
    with pytest.raises(ConfigError, match="broken.yaml: config.llm.pretrained: expected a string"):
        AnyGPTConfig.from_file(path)


def test_unknown_preset_lists_names():
    with pytest.raises(UnknownNameError, match="unknown preset 'huge'; valid names: mini, nextgpt-7b, tiny"):
        AnyGPTConfig.from_name("huge")


def test_a_preset_may_be_a_model_directory_with_its_weights(tmp_path, monkeypatch, tiny_pipe):
    """How a trained preset ships: a folder under presets/ that loads like a saved model."""
    import shutil

    import anygpt.config
    from anygpt import AnyGPTPipeline

    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(anygpt.config.PRESET_DIR / "tiny.yaml", presets)
    tiny_pipe.save_pretrained(presets / "trained")
    monkeypatch.setattr(anygpt.config, "PRESET_DIR", presets)
    assert anygpt.config.list_presets() == ["tiny", "trained"]
    assert anygpt.config.preset_file("trained") == presets / "trained" / "anygpt_config.yaml"
    pipe = AnyGPTPipeline.from_pretrained("trained")
    assert pipe.base_dir == presets / "trained"
    a = pipe("hello", seed=0, max_new_tokens=6)
    b = tiny_pipe("hello", seed=0, max_new_tokens=6)
    assert a.raw_text == b.raw_text
    with pytest.raises(UnknownNameError, match="valid names: tiny, trained"):
        anygpt.config.preset_file("../tiny")

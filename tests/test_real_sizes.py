"""The real components' public architectures, and the full-size NExT-GPT system built from them
on the meta device: its parameter counts against NExT-GPT's paper (Table 1)."""

from __future__ import annotations

import math

import pytest

ROWS = ["encoder", "input_projection", "llm", "lora", "output_projection/image", "output_projection/video",
        "output_projection/audio", "decoder/image", "decoder/image/as-run", "decoder/video", "decoder/audio"]

#: Rows whose count is more than 2 % from the paper's figure, and why (investigated; see the rows'
#: notes in anygpt.realsize). The assertion stays; these are expected to fail it.
DEVIATIONS = {
    "input_projection": "4.198 M printed as 4 M: Table 1 truncates to its digits",
    "llm": "6.74 B printed as 7 B: LLaMA-7B's nominal size (the LLaMA paper prints 6.7 B)",
    "output_projection/image": "31.96 M printed as 31 M: Table 1 truncates to its digits",
    "output_projection/audio": "31.79 M printed as 31 M: Table 1 truncates to its digits",
    "decoder/image": "1.37 B (with the safety checker) printed as 1.3 B: Table 1 truncates to its digits",
}


@pytest.fixture(scope="module")
def table():
    from anygpt.realsize import parameter_table

    return {row.key: row for row in parameter_table()}


def test_the_architecture_files_load_from_the_package_whatever_the_directory(tmp_path, monkeypatch):
    from anygpt.architectures import ARCHITECTURE_DIR, architecture_for, list_architectures, load_architecture
    from anygpt.config import AnyGPTConfig

    monkeypatch.chdir(tmp_path)
    names = list_architectures()
    assert names == ["audioldm-l-full", "stable-diffusion-v1-5", "vicuna-7b-v0", "zeroscope-v2-576w"]
    assert ARCHITECTURE_DIR.is_absolute()
    for name in names:
        architecture = load_architecture(name)
        assert architecture["name"] == name
        assert all(part["source"] and "config" in part for part in architecture["components"].values())
    preset = AnyGPTConfig.from_name("nextgpt-7b")
    for modality in preset.output_modalities:  # every decoder of the preset has its architecture
        assert architecture_for(preset.modalities[modality].decoder.pretrained) in names


def test_an_unknown_architecture_names_the_shipped_ones():
    from anygpt.architectures import load_architecture
    from anygpt.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="vicuna-7b-v0"):
        load_architecture("llama-65b")


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_a_decoder_config_builds_its_real_architecture_at_full_size(modality):
    import torch

    from anygpt import decoders
    from anygpt.architectures import architecture_for
    from anygpt.config import AnyGPTConfig, DecoderConfig
    from anygpt.realsize import decoder_parameters

    declared = AnyGPTConfig.from_name("nextgpt-7b").modalities[modality].decoder
    architecture = architecture_for(declared.pretrained)
    config = DecoderConfig(name=declared.name, arch={"architecture": architecture})
    assert list(decoders.condition_shape(config)) == declared.condition_shape  # read, not built
    with torch.device("meta"):
        decoder = decoders.load_decoder(config, device="meta", dtype="float32")
    assert list(decoder.condition_shape) == declared.condition_shape
    built = {name: sum(p.numel() for p in part.parameters())
             for name, part in decoder.pipeline.components.items() if isinstance(part, torch.nn.Module)}
    assert built == decoder_parameters(architecture, skip=("safety_checker",))


def test_the_full_size_model_has_nextgpts_interfaces(tmp_path):
    from anygpt.nextgpt import nextgpt_token_ids
    from anygpt.realsize import full_size_config, meta_model, vicuna_tokenizer

    model = meta_model(full_size_config(vicuna_tokenizer(tmp_path)))
    tokenizer = model.lm.tokenizer
    assert model.encoder.output_dim == 1024 and model.lm.hidden_size == 4096
    assert model.llm.get_input_embeddings().num_embeddings == len(tokenizer) == 32038
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in nextgpt_token_ids()} == nextgpt_token_ids()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert all(p.is_meta for p in model.parameters())
    assert {m: (p.num_queries, p.out_dim) for m, p in model.output_projectors.items()} == {
        "image": (77, 768), "video": (77, 1024), "audio": (1, 512)}


def test_the_table_has_every_component(table):
    assert list(table) == ROWS


@pytest.mark.parametrize("key", [
    pytest.param(key, marks=pytest.mark.xfail(strict=True, reason=DEVIATIONS[key])) if key in DEVIATIONS else key
    for key in ROWS])
def test_the_parameter_count_is_within_2_percent_of_the_published_one(table, key):
    row = table[key]
    assert abs(row.ratio - 1) <= 0.02, f"{row.component}: {row.ours:,} vs {row.reference:g} ({row.ratio:.3f})"


def test_every_figure_of_nextgpts_table_but_the_llms_is_our_count_truncated_to_its_digits(table):
    # Where a figure is off by more than 2 %, this is why: Table 1 rounds down.
    for key, row in table.items():
        if row.source != "NExT-GPT Table 1" or key == "llm":
            continue
        unit = 1e8 if row.reference >= 1e9 else 1e6  # "1.3 B" has one decimal, "975 M" none
        assert math.floor(row.ours / unit) * unit == pytest.approx(row.reference), row.component


def test_the_sub_components_have_their_published_exact_sizes():
    from anygpt.realsize import decoder_parameters

    sd = decoder_parameters("stable-diffusion-v1-5")
    # SD v1 model card: an 860 M UNet and a 123 M text encoder; AudioLDM paper: AudioLDM-L's UNet 739 M.
    assert round(sd["unet"] / 1e6) == 860 and round(sd["text_encoder"] / 1e6) == 123
    assert round(decoder_parameters("audioldm-l-full")["unet"] / 1e6) == 739

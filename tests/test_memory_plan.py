"""Memory plans: the arithmetic on the real-size nextgpt-7b built on the meta device, the plan
chosen for 24 GB and 12 GB cards, and the offload hooks a plan installs."""

import pytest
import torch

from anygpt.errors import ConfigError
from anygpt.memory import (GIB, RESERVED, Placement, _place_decoder, llm_device_map, parse_memory, plan_memory,
                           preset_components)

#: Vicuna-7B's parameters with NExT-GPT's 32 038 token rows (the parameter table's figure).
VICUNA_PARAMETERS = 6_738_726_912


@pytest.fixture(scope="module")
def real_size():
    """nextgpt-7b's components at full size, on the meta device (no weights)."""
    return {c.name: c for c in preset_components("nextgpt-7b")}


@pytest.mark.parametrize("text, expected", [("24GB", 24 * GIB), ("12 GiB", 12 * GIB), ("11000MB", 11000 * 2**20),
                                            ("0.5gb", GIB // 2), ("8", 8 * GIB), (3 * GIB, 3 * GIB)])
def test_budgets_are_read_as_gpu_memory_is_quoted(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "24 parsecs", "-3GB", "0", 0, -1])
def test_a_budget_that_is_not_a_size_is_refused(bad):
    with pytest.raises(ConfigError, match="memory"):
        parse_memory(bad)


def test_component_sizes_of_the_real_preset(real_size):
    assert set(real_size) == {"encoder", "llm", "projectors", "decoder/image", "decoder/audio", "decoder/video"}
    llm = real_size["llm"]
    # float16, the preset's dtype; the rest is the rotary embedding's small buffer.
    assert 0 <= llm.weights - VICUNA_PARAMETERS * 2 < 4096
    assert len(llm.layers) == 32 and sum(llm.layers) < llm.weights
    # The KV cache at Vicuna's 2048-token context is part of its working memory: 2·32·4096·2048·2 bytes.
    assert llm.working > 2 * 32 * 4096 * 2048 * 2
    video = real_size["decoder/video"]
    assert {"unet", "vae", "text_encoder"} <= set(video.parts)
    assert video.sliced_working < video.working  # decoding 24 frames one by one needs less
    assert real_size["decoder/image"].sliced_working is None


def _resident(plan, names):
    return sum(plan.placement(n).resident for n in names)


def test_a_24gb_card_offloads_the_decoders(real_size):
    plan = plan_memory(list(real_size.values()), "24GB")
    assert plan.fits and plan.strategy == "decoders offloaded"
    core = ("encoder", "llm", "projectors")
    assert _resident(plan, core) == sum(real_size[n].weights for n in core)
    decoders = [c for n, c in real_size.items() if n.startswith("decoder/")]
    worst_decoder = max(c.largest_part + (c.sliced_working or c.working) for c in decoders)
    worst = max(worst_decoder, *(real_size[n].working for n in core))
    assert plan.peak == _resident(plan, core) + worst
    assert plan.peak + RESERVED <= 24 * GIB
    assert plan.placement("decoder/video").vae_slicing


def test_everything_stays_resident_when_it_fits(real_size):
    plan = plan_memory(list(real_size.values()), "48GB")
    assert plan.strategy == "resident" and plan.fits
    assert plan.peak == sum(c.weights for c in real_size.values()) + max(c.working for c in real_size.values())


def test_a_12gb_card_splits_the_llm_by_layers(real_size):
    plan = plan_memory(list(real_size.values()), "12GB")
    assert plan.fits and plan.strategy == "LLM split"
    llm, placed = real_size["llm"], plan.placement("llm")
    assert 0 < placed.gpu_layers < len(llm.layers)
    fixed = llm.weights - sum(llm.layers)
    assert placed.resident == fixed + sum(llm.layers[:placed.gpu_layers])
    assert plan.placement("encoder").where == "cpu"
    assert plan.peak + RESERVED <= 12 * GIB
    # One more layer on the GPU would not fit.
    assert plan.peak + llm.layers[placed.gpu_layers] + RESERVED > 12 * GIB


def test_a_budget_nothing_fits_says_so(real_size):
    plan = plan_memory(list(real_size.values()), "1GB")  # less than the LLM's embeddings and head
    assert not plan.fits
    assert "does NOT fit" in plan.format()


def test_the_table_lists_every_component_and_the_peak(real_size):
    text = plan_memory(list(real_size.values()), "24GB").format()
    for name in real_size:
        assert name in text
    assert "expected peak" in text and "estimated" in text


def test_offloading_a_decoder_installs_diffusers_hooks(tiny_pipe):
    # A fresh decoder, so that the session's tiny pipe keeps plain ones.
    from anygpt import decoders
    from anygpt.model import decoder_config

    decoder = decoders.load_decoder(decoder_config(tiny_pipe.config, "video", tiny_pipe.base_dir))
    _place_decoder(decoder, Placement("decoder/video", "cpu → gpu", "model", 0, 0, vae_slicing=True),
                   torch.device("cuda"))
    assert hasattr(decoder.pipeline.unet, "_hf_hook") and decoder.pipeline._offload_device.type == "cuda"
    assert decoder.pipeline.vae.use_slicing


def test_the_llm_device_map_splits_by_layer_without_overlap(tiny_pipe):
    model = tiny_pipe.model.lm.model
    device_map = llm_device_map(model, 1, torch.device("cuda"))
    layers = [name for name in device_map if ".layers." in name]
    assert [device_map[n] for n in layers] == [0] + ["cpu"] * (len(layers) - 1)
    names = list(device_map)
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)
    for name, _ in model.named_parameters():  # every weight is placed exactly once
        assert sum(name == k or name.startswith(k + ".") for k in names) == 1
    assert llm_device_map(model, 99, torch.device("cuda")) == {"": 0}


def test_a_memory_budget_without_a_gpu_is_one_clear_error():
    from anygpt import AnyGPTPipeline

    with pytest.raises(ConfigError, match="plans GPU memory.*CUDA"):
        AnyGPTPipeline.from_pretrained("tiny", device="cpu", memory="12GB")


def test_the_plan_command_prints_the_plan(capsys):
    from anygpt.cli import main

    assert main(["plan", "--preset", "tiny", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "plan: resident" in out and "decoder/image" in out
    assert main(["plan", "--preset", "tiny", "--gpu-memory", "nonsense"]) == 2

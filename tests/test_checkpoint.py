"""Reading NExT-GPT's released checkpoint format (on a tiny model with the same key layout)."""

import copy

import pytest
import torch

from anygpt.checkpoint import load_checkpoint
from anygpt.errors import WeightsNotFoundError


@pytest.fixture(scope="module")
def linear_model():
    """The tiny model with NExT-GPT's input projector layout (linear, one token, every modality)."""
    from anygpt.config import AnyGPTConfig
    from anygpt.model import AnyGPTModel

    data = AnyGPTConfig.from_name("tiny").to_dict()
    for m in data["modalities"].values():
        m["input_projector"] = {"kind": "linear", "num_tokens": 1}
    return AnyGPTModel.from_config(AnyGPTConfig.from_dict(data))


@pytest.fixture()
def model(linear_model):
    return copy.deepcopy(linear_model)


def _legacy_state(model, seed=0):
    """A flat state dict named as NExT-GPT's pytorch_model.pt names its tensors."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    proj = model.input_projectors["image"].proj
    state["llama_proj.weight"] = torch.randn(proj.weight.shape, generator=g)
    state["llama_proj.bias"] = torch.randn(proj.bias.shape, generator=g)
    for name, prefix in (("image", "gen_text_hidden_fcs.0."), ("video", "gen_text_hidden_fcs_video.0."),
                         ("audio", "gen_text_hidden_fcs_audio.0.")):
        for k, v in model.output_projectors[name].state_dict().items():
            state[prefix + k] = torch.randn(v.shape, generator=g)
    llm = model.lm.model
    emb = llm.get_input_embeddings().weight
    state["llama_model.base_model.model.model.embed_tokens.weight"] = torch.randn(emb.shape, generator=g)
    state["llama_model.base_model.model.lm_head.weight"] = torch.randn(emb.shape, generator=g)
    q = llm.model.layers[0].self_attn.q_proj.weight
    state["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(4, q.shape[1], generator=g)
    state["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(q.shape[0], 4, generator=g)
    return state


def test_nextgpt_checkpoint_maps_every_tensor(model, tmp_path):
    state = _legacy_state(model)
    path = tmp_path / "pytorch_model.pt"
    torch.save(state, path)
    q_before = model.lm.model.model.layers[0].self_attn.q_proj.weight.clone()
    load_checkpoint(model, str(path))

    for name in ("image", "audio", "video"):  # one llama_proj shared by every input modality
        for suffix in ("weight", "bias"):
            assert torch.equal(getattr(model.input_projectors[name].proj, suffix), state[f"llama_proj.{suffix}"])
    for name, prefix in (("image", "gen_text_hidden_fcs.0."), ("video", "gen_text_hidden_fcs_video.0."),
                         ("audio", "gen_text_hidden_fcs_audio.0.")):
        for k, v in model.output_projectors[name].state_dict().items():
            assert torch.equal(v, state[prefix + k]), prefix + k
    assert torch.equal(model.lm.model.get_input_embeddings().weight,
                       state["llama_model.base_model.model.model.embed_tokens.weight"])
    assert torch.equal(model.lm.model.get_output_embeddings().weight,
                       state["llama_model.base_model.model.lm_head.weight"])
    a = state["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = state["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(model.lm.model.model.layers[0].self_attn.q_proj.weight, q_before + b @ a)


def test_checkpoint_with_wrong_vocabulary_is_refused(model, tmp_path):
    state = _legacy_state(model)
    key = "llama_model.base_model.model.model.embed_tokens.weight"
    state[key] = state[key][:-1]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsNotFoundError, match="embed_tokens has shape"):
        load_checkpoint(model, str(tmp_path / "bad.pt"))


def test_incompatible_input_projector_is_refused(tiny_pipe, model, tmp_path):
    torch.save(_legacy_state(model), tmp_path / "pytorch_model.pt")
    target = copy.deepcopy(tiny_pipe.model)  # tiny's audio projector is an MLP
    with pytest.raises(WeightsNotFoundError, match=r"modalities.audio.input_projector.*kind: linear"):
        load_checkpoint(target, str(tmp_path / "pytorch_model.pt"))


def test_missing_checkpoint_names_the_reference(model, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nothing.pt"):
        load_checkpoint(model, str(tmp_path / "nothing.pt"))
    with pytest.raises(WeightsNotFoundError, match="could not download"):
        load_checkpoint(model, "someone/some-repo:pytorch_model.pt")

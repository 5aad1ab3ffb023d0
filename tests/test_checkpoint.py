"""Model directories: saving and reloading them, building models, and reading NExT-GPT's released
checkpoint format (on a tiny model with the same key layout)."""

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


def _legacy_state(model, seed=0, rank=32):
    """A flat state dict named as NExT-GPT's pytorch_model.pt names its tensors (its rank 32:
    scale alpha / r = 1)."""
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
    for i, layer in enumerate(llm.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = getattr(layer.self_attn, proj).weight
            key = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, weight.shape[1], generator=g) * 0.1
            state[f"{key}.lora_B.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.1
    return state


def test_nextgpt_checkpoint_maps_every_tensor(model, tmp_path):
    from anygpt.nextgpt import NEXTGPT_TOKENS

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
    # Rows move by token: tiny lists image, audio, video, NExT-GPT added image, video, audio.
    base = 257
    index = torch.arange(base + len(NEXTGPT_TOKENS))
    for token in NEXTGPT_TOKENS:
        index[model.lm.tokenizer.convert_tokens_to_ids(token)] = base + NEXTGPT_TOKENS.index(token)
    assert not torch.equal(index, torch.arange(len(index)))
    assert torch.equal(model.lm.model.get_input_embeddings().weight,
                       state["llama_model.base_model.model.model.embed_tokens.weight"][index])
    assert torch.equal(model.lm.model.get_output_embeddings().weight,
                       state["llama_model.base_model.model.lm_head.weight"][index])
    a = state["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = state["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(model.lm.model.model.layers[0].self_attn.q_proj.weight, q_before + b @ a)


def test_checkpoint_with_wrong_vocabulary_is_refused(model, tmp_path):
    state = _legacy_state(model)
    key = "llama_model.base_model.model.model.embed_tokens.weight"
    state[key] = state[key][:-1]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsNotFoundError, match=r"embed_tokens\.weight: expected \(295, 64\), got \(294, 64\)"):
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


# Building and saving model directories ----------------------------------------------------------


def test_from_pretrained_leaves_the_global_rng_alone():
    from anygpt import AnyGPTPipeline

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    AnyGPTPipeline.from_pretrained("tiny")
    assert torch.equal(torch.get_rng_state(), state)


def _decoders(pipe):
    return {m: pipe.decoder(m) for m in pipe.config.output_modalities}


@pytest.fixture(scope="module")
def saved_tiny(tiny_pipe, tmp_path_factory):
    """The tiny preset saved once: (directory, pipeline loaded back from it)."""
    from anygpt import AnyGPTPipeline

    directory = tiny_pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "tiny")
    return directory, AnyGPTPipeline.from_pretrained(directory)


def test_save_writes_random_components_whole(saved_tiny, tiny_pipe):
    from anygpt.config import AnyGPTConfig

    directory, reloaded = saved_tiny
    assert {p.name for p in directory.iterdir()} == {"anygpt_config.yaml", "README.md", "projectors.safetensors",
                                                     "llm", "encoder.safetensors", "decoders"}
    assert {p.name for p in directory.parent.iterdir()} == {"tiny"}  # no staging folder left behind
    config = AnyGPTConfig.from_file(directory / "anygpt_config.yaml")
    assert config.llm.pretrained == "llm" and config.llm.arch is None and config.checkpoint is None
    assert config.modalities["audio"].decoder.pretrained == "decoders/audio"
    before, after = tiny_pipe.model.state_dict(), reloaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_references_an_llm_it_did_not_change_and_saves_a_changed_one(saved_tiny, tmp_path):
    from anygpt.checkpoint import ADDED_TOKENS_FILE, save_model_directory
    from anygpt.config import AnyGPTConfig

    source, pipe = saved_tiny
    referenced = save_model_directory(pipe.model, tmp_path / "ref", decoders=_decoders(pipe), base_dir=pipe.base_dir)
    config = AnyGPTConfig.from_file(referenced / "anygpt_config.yaml")
    assert config.llm.pretrained == "llm" and (referenced / ADDED_TOKENS_FILE).is_file()
    assert config.encoder.pretrained == "encoder.safetensors"
    assert config.modalities["image"].decoder.pretrained == "decoders/image"
    # The unchanged parts of the source directory come along as hard links: no weights rewritten.
    for part in ("llm/model.safetensors", "encoder.safetensors"):
        assert (referenced / part).stat().st_ino == (source / part).stat().st_ino

    whole = save_model_directory(pipe.model, tmp_path / "whole", decoders={}, base_dir=pipe.base_dir, save_llm=True)
    assert (whole / "llm" / "model.safetensors").is_file() and not (whole / ADDED_TOKENS_FILE).exists()
    assert "pretrained: llm\n" in (whole / "anygpt_config.yaml").read_text()


def test_save_over_the_directory_it_was_loaded_from(saved_tiny, tmp_path):
    """Files the config references inside the directory being replaced are kept (copied over)."""
    import shutil

    from anygpt import AnyGPTPipeline
    from anygpt.checkpoint import save_model_directory

    directory = tmp_path / "model"
    shutil.copytree(saved_tiny[0], directory)
    pipe = AnyGPTPipeline.from_pretrained(directory)
    with torch.no_grad():  # a trained projector
        next(pipe.model.output_projectors["image"].parameters()).add_(1.0)
    expected = pipe.model.state_dict()
    save_model_directory(pipe.model, directory, decoders={}, base_dir=pipe.base_dir)
    assert {p.name for p in tmp_path.iterdir()} == {"model"}
    assert "pretrained: llm\n" in (directory / "anygpt_config.yaml").read_text()
    again = AnyGPTPipeline.from_pretrained(directory).model.state_dict()
    assert all(torch.equal(expected[k], again[k]) for k in expected)


def test_save_refuses_to_replace_other_folders_or_drop_random_decoders(tiny_pipe, tmp_path):
    from anygpt.checkpoint import save_model_directory
    from anygpt.errors import ConfigError

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an AnyGPT model directory"):
        save_model_directory(tiny_pipe.model, tmp_path, decoders=_decoders(tiny_pipe), base_dir=None)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="image decoder was built from `arch`.*pass it in `decoders`"):
        save_model_directory(tiny_pipe.model, tmp_path / "model", decoders={}, base_dir=None)
    assert list(tmp_path.iterdir()) == [tmp_path / "notes.txt"]  # nothing half-written is left


def test_stacked_lora_merges_as_both_in_turn():
    from anygpt.checkpoint import merge_lora, stack_lora

    g = torch.Generator().manual_seed(0)
    first = {"a": (torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), 0.5)}
    second = {"a": (torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g), 2.0),
              "b": (torch.randn(1, 5, generator=g), torch.randn(3, 1, generator=g), 1.0)}
    in_turn = torch.nn.ModuleDict({"a": torch.nn.Linear(5, 3), "b": torch.nn.Linear(5, 3)})
    stacked = torch.nn.ModuleDict({"a": torch.nn.Linear(5, 3), "b": torch.nn.Linear(5, 3)})
    stacked.load_state_dict(in_turn.state_dict())
    merge_lora(in_turn, first, source="first")
    merge_lora(in_turn, second, source="second")
    merge_lora(stacked, stack_lora(first, second), source="stacked")
    for key, value in in_turn.state_dict().items():
        torch.testing.assert_close(stacked.state_dict()[key], value, msg=key)

"""`anygpt convert nextgpt`: NExT-GPT's released checkpoint checked (keys, shapes, token ids, LoRA
scale) and written as a model directory.

The synthetic checkpoints here are written from NExT-GPT's own code, not from our loader's key
table (NExT-GPT/NExT-GPT on GitHub):

- ``code/model/agent.py``, ``DeepSpeedAgent.save_model``: one flat ``torch.save`` of every named
  parameter that requires grad, plus every one whose name holds ``gen_text_hidden_fcs`` or
  ``llama_proj``. The frozen ImageBind and the frozen Vicuna weights are not in it.
- ``code/model/anyToImageVideoAudio.py``, ``NextGPTModel.__init__``: ``llama_proj`` is
  ``nn.Linear(1024, hidden)``; ``gen_text_hidden_fcs``, ``gen_text_hidden_fcs_video`` and
  ``gen_text_hidden_fcs_audio`` are ModuleLists holding one ``TextFcLayer`` each (index 0), with
  outputs 77 × 768, 77 × 1024 and 1 × 512; Vicuna is wrapped by ``get_peft_model`` with LoRA on
  ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` (``code/config/stage_3.yaml``: r 32, alpha 32),
  and ``resize_token_embeddings`` afterwards makes fresh ``embed_tokens`` and ``lm_head`` that
  require grad, so both are saved whole; the tokens are added in the order ``<Img>``, ``</Img>``,
  ``[IMG0..3]``, ``[VID0..23]``, ``[AUD0..7]``.
- ``code/model/layers.py``, ``TextFcLayer(mode="transformer")``: ``fc`` Linear(in, 512), ``tfm`` a
  torch ``nn.Transformer`` (d_model 512, 4 encoder and 4 decoder layers, feed-forward 2048),
  ``model`` Linear(512, out) and ``query_embs`` (1, Q, 512).
- PEFT 0.3 names the factors ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``….lora_B.weight`` (out, r); the whole model is the ``llama_model`` attribute.
"""

import copy
import json

import pytest
import torch

from anygpt.errors import WeightsNotFoundError

LLM = "llama_model.base_model.model."
# NExT-GPT's TextFcLayer outputs (queries × width): SD-1.5's CLIP-L, zeroscope's OpenCLIP-H, AudioLDM's CLAP.
RELEASE_OUTPUTS = {"gen_text_hidden_fcs.0.": (77, 768), "gen_text_hidden_fcs_video.0.": (77, 1024),
                   "gen_text_hidden_fcs_audio.0.": (1, 512)}
RELEASE_TFM = {"d": 512, "ff": 2048, "encoder_layers": 4, "decoder_layers": 4}
PREFIX = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0.",
          "audio": "gen_text_hidden_fcs_audio.0."}


def _attention(name, d):
    return {f"{name}.in_proj_weight": (3 * d, d), f"{name}.in_proj_bias": (3 * d,),
            f"{name}.out_proj.weight": (d, d), f"{name}.out_proj.bias": (d,)}


def _transformer_layer(name, attentions, norms, d, ff):
    shapes = {}
    for attention in attentions:
        shapes.update(_attention(f"{name}.{attention}", d))
    shapes.update({f"{name}.linear1.weight": (ff, d), f"{name}.linear1.bias": (ff,),
                   f"{name}.linear2.weight": (d, ff), f"{name}.linear2.bias": (d,)})
    for i in range(1, norms + 1):
        shapes.update({f"{name}.norm{i}.weight": (d,), f"{name}.norm{i}.bias": (d,)})
    return shapes


def text_fc_layer(prefix, in_dim, queries, out_dim, d, ff, encoder_layers, decoder_layers):
    """The parameters of one TextFcLayer in transformer mode (torch's nn.Transformer names)."""
    shapes = {f"{prefix}fc.weight": (d, in_dim), f"{prefix}fc.bias": (d,),
              f"{prefix}model.weight": (out_dim, d), f"{prefix}model.bias": (out_dim,),
              f"{prefix}query_embs": (1, queries, d)}
    for i in range(encoder_layers):
        shapes.update(_transformer_layer(f"{prefix}tfm.encoder.layers.{i}", ["self_attn"], 2, d, ff))
    for i in range(decoder_layers):
        shapes.update(_transformer_layer(f"{prefix}tfm.decoder.layers.{i}", ["self_attn", "multihead_attn"], 3, d, ff))
    for part in ("encoder", "decoder"):
        shapes.update({f"{prefix}tfm.{part}.norm.weight": (d,), f"{prefix}tfm.{part}.norm.bias": (d,)})
    return shapes


def nextgpt_checkpoint_shapes(*, hidden, kv_dim, layers, encoder_dim, vocab, rank, outputs, tfm):
    """Key → shape of the pytorch_model.pt NExT-GPT's save_model writes (see the module docstring)."""
    shapes = {"llama_proj.weight": (hidden, encoder_dim), "llama_proj.bias": (hidden,)}
    for prefix, (queries, width) in outputs.items():
        shapes.update(text_fc_layer(prefix, hidden, queries, width, **tfm))
    shapes[LLM + "model.embed_tokens.weight"] = shapes[LLM + "lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        for proj, out in (("q_proj", hidden), ("k_proj", kv_dim), ("v_proj", kv_dim), ("o_proj", hidden)):
            module = f"{LLM}model.layers.{i}.self_attn.{proj}"
            shapes[f"{module}.lora_A.weight"] = (rank, hidden)
            shapes[f"{module}.lora_B.weight"] = (out, rank)
    return shapes


# Full size: the nextgpt-7b architecture -----------------------------------------------------------

RELEASE_SHAPES = nextgpt_checkpoint_shapes(hidden=4096, kv_dim=4096, layers=32, encoder_dim=1024, vocab=32038,
                                           rank=32, outputs=RELEASE_OUTPUTS, tfm=RELEASE_TFM)


def _zero_stride_state(shapes):
    """Full-shape tensors that all view one float16 zero: the file stays a few kilobytes."""
    zero = torch.zeros(1, dtype=torch.float16)
    return {key: zero.expand(shape) for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def release_layout():
    """The tensors the nextgpt-7b preset expects, from a meta-device build (no weights, no download):
    Vicuna-7B's sizes, ImageBind-huge's 1024-wide embeddings, the decoders' conditioning shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from anygpt.config import AnyGPTConfig
    from anygpt.nextgpt import NEXTGPT_TOKENS, build_layout
    from anygpt.projectors import OutputProjector, build_input_projector

    config = AnyGPTConfig.from_name("nextgpt-7b")
    conditions = {m: RELEASE_OUTPUTS[PREFIX[m]] for m in config.output_modalities}
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                           num_attention_heads=32, vocab_size=32000 + len(NEXTGPT_TOKENS)))
        inputs = {m: build_input_projector(config.modalities[m].input_projector, 1024, 4096)
                  for m in config.input_modalities}
        outputs = {m: OutputProjector(4096, *conditions[m], config.modalities[m].output_projector)
                   for m in config.output_modalities}
    return build_layout(llm, inputs, outputs, checkpoint_vocab=32000 + len(NEXTGPT_TOKENS))


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "pytorch_model.pt"
    torch.save(_zero_stride_state(RELEASE_SHAPES), path)
    return path


def _check(state, layout, **kwargs):
    from anygpt.nextgpt import check_state, normalise_keys

    return check_state(normalise_keys(state), layout, source="pytorch_model.pt", **kwargs)


def test_the_full_release_key_set_passes(release_file, release_layout):
    assert release_file.stat().st_size < 1_000_000
    state = torch.load(release_file, map_location="cpu", weights_only=True)
    assert len(state) == 647 and state[LLM + "lm_head.weight"].shape == (32038, 4096)
    assert _check(state, release_layout) == 32
    assert sorted(release_layout.expected_keys()) == sorted(state)


def test_missing_projector_tensors_fail_and_are_listed(release_layout):
    state = _zero_stride_state(RELEASE_SHAPES)
    for key in ("llama_proj.bias", "gen_text_hidden_fcs_audio.0.query_embs",
                "gen_text_hidden_fcs_video.0.tfm.decoder.layers.3.norm3.weight"):
        del state[key]
    with pytest.raises(WeightsNotFoundError, match=r"missing 3 tensor\(s\)") as info:
        _check(state, release_layout)
    for key in ("llama_proj.bias", "gen_text_hidden_fcs_audio.0.query_embs",
                "gen_text_hidden_fcs_video.0.tfm.decoder.layers.3.norm3.weight"):
        assert key in str(info.value)


def test_unexpected_tensors_are_listed_and_fail_unless_allowed(release_layout, caplog):
    state = _zero_stride_state(RELEASE_SHAPES)
    state["visual_encoder.modality_trunks.vision.blocks.0.attn.in_proj_weight"] = torch.zeros(3)
    state[LLM + "model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(32, 4096)
    with pytest.raises(WeightsNotFoundError, match=r"2 unexpected tensor\(s\)") as info:
        _check(state, release_layout)
    message = str(info.value)
    assert "visual_encoder.modality_trunks" in message and "mlp.gate_proj.lora_A" in message
    assert "--allow-unexpected" in message
    assert _check(state, release_layout, allow_unexpected=True) == 32
    assert "ignoring 2 unexpected" in caplog.text


def test_wrong_shapes_name_the_key_and_both_shapes(release_layout):
    state = _zero_stride_state(RELEASE_SHAPES)
    state[LLM + "lm_head.weight"] = torch.zeros(1, dtype=torch.float16).expand(32000, 4096)
    state["gen_text_hidden_fcs.0.query_embs"] = torch.zeros(1).expand(1, 64, 512)
    with pytest.raises(WeightsNotFoundError) as info:
        _check(state, release_layout)
    message = str(info.value)
    assert f"{LLM}lm_head.weight: expected (32038, 4096), got (32000, 4096)" in message
    assert "gen_text_hidden_fcs.0.query_embs: expected (1, 77, 512), got (1, 64, 512)" in message
    assert "Vicuna-7B v0" in message


def test_newer_peft_and_frozen_llm_spellings_are_accepted(release_layout):
    state = {}
    for key, value in _zero_stride_state(RELEASE_SHAPES).items():
        key = key.replace(".lora_A.weight", ".lora_A.default.weight")
        state[key.replace(LLM + "model.embed_tokens", "llama_model.model.embed_tokens")] = value
    assert _check(state, release_layout) == 32


def test_a_config_without_video_ignores_the_video_tensors_and_rows(release_layout):
    from dataclasses import replace

    from anygpt.nextgpt import token_rows

    video = "gen_text_hidden_fcs_video.0."
    layout = replace(release_layout, shapes={k: v for k, v in release_layout.shapes.items() if not k.startswith(video)},
                     outputs={m: p for m, p in release_layout.outputs.items() if m != "video"},
                     unused=(*release_layout.unused, video))
    assert _check(_zero_stride_state(RELEASE_SHAPES), layout) == 32
    added = ["<Img>", "</Img>", *(f"[IMG{i}]" for i in range(4)), *(f"[AUD{i}]" for i in range(8))]
    vocab = {f"base{i}": i for i in range(32000)} | {t: 32000 + i for i, t in enumerate(added)}
    rows = token_rows(vocab, 32000 + len(added), added)
    assert rows.checkpoint_vocab == 32038 and rows.unused == tuple(f"[VID{i}]" for i in range(24))
    assert int(rows.index[vocab["[AUD0]"]]) == 32030


def test_release_token_ids():
    from anygpt.nextgpt import nextgpt_token_ids

    ids = nextgpt_token_ids()
    assert (ids["<Img>"], ids["</Img>"], ids["[IMG0]"], ids["[IMG3]"]) == (32000, 32001, 32002, 32005)
    assert (ids["[VID0]"], ids["[VID23]"], ids["[AUD0]"], ids["[AUD7]"]) == (32006, 32029, 32030, 32037)


@pytest.mark.parametrize("order", [("image", "video", "audio"), ("image", "audio", "video"),
                                   ("audio", "video", "image")])
def test_rows_follow_the_token_whatever_the_modality_order(order):
    """Our tokenizer numbers its added tokens in config order; each row still comes from
    NExT-GPT's row of the same token."""
    from anygpt.nextgpt import nextgpt_token_ids, token_rows

    runs = {"image": [f"[IMG{i}]" for i in range(4)], "video": [f"[VID{i}]" for i in range(24)],
            "audio": [f"[AUD{i}]" for i in range(8)]}
    added = ["<Img>", "</Img>", *(t for m in order for t in runs[m])]
    vocab = {f"base{i}": i for i in range(32000)} | {t: 32000 + i for i, t in enumerate(added)}
    rows = token_rows(vocab, 32038, added)
    assert rows.checkpoint_vocab == 32038 and not rows.unused
    assert torch.equal(rows.index[:32000], torch.arange(32000))
    release = nextgpt_token_ids()
    assert all(int(rows.index[vocab[t]]) == release[t] for t in added)


def test_tokens_without_a_release_row_are_named():
    from anygpt.nextgpt import token_rows

    vocab = {f"base{i}": i for i in range(10)}
    with pytest.raises(WeightsNotFoundError, match=r"'\[IMG4\]'.*num_signal_tokens: 4"):
        token_rows(vocab, 10, ["<Img>", "</Img>", *(f"[IMG{i}]" for i in range(5))])
    with pytest.raises(WeightsNotFoundError, match=r"image signal run lacks '\[IMG2\]'"):
        token_rows(vocab, 10, ["<Img>", "</Img>", "[IMG0]", "[IMG1]"])
    with pytest.raises(WeightsNotFoundError, match=r"'<media>'.*llm.media_begin: <Img>"):
        token_rows(vocab, 10, ["<media>", "</Img>"])


# Small width, end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_llm(tmp_path_factory):
    """A tiny Llama and its byte-level tokenizer as a Hugging Face folder: these tests' Vicuna
    (257 tokens, none of NExT-GPT's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from anygpt.llm import build_byte_level_tokenizer
    from anygpt.seeding import seeded

    tokenizer = build_byte_level_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, vocab_size=len(tokenizer),
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with seeded(0):
        model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("vicuna") / "base"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_nextgpt_config(base_llm, **changes):
    """The tiny preset as NExT-GPT's architecture: one linear token per input, modalities listed
    image, audio, video (not NExT-GPT's image, video, audio), the LLM read from ``base_llm``."""
    from anygpt.config import AnyGPTConfig

    data = AnyGPTConfig.from_name("tiny").to_dict()
    assert list(data["modalities"]) == ["image", "audio", "video"]
    for m in data["modalities"].values():
        m["input_projector"] = {"kind": "linear", "num_tokens": 1}
    data["llm"].update(pretrained=str(base_llm), arch=None, tokenizer=None)
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        target = data
        for part in section.split(".") if section else ():
            target = target[part]
        target[field] = value
    return AnyGPTConfig.from_dict(data)


def _tiny_outputs(config):
    from anygpt import decoders

    return {PREFIX[m]: decoders.condition_shape(config.modalities[m].decoder) for m in config.output_modalities}


def _tiny_checkpoint(config, seed=0, rank=32):
    """Random tensors at the tiny width, under NExT-GPT's keys and shapes."""
    out = config.modalities["image"].output_projector
    shapes = nextgpt_checkpoint_shapes(
        hidden=64, kv_dim=32, layers=2, encoder_dim=16, vocab=257 + 38, rank=rank, outputs=_tiny_outputs(config),
        tfm={"d": out.d_model, "ff": out.dim_feedforward, "encoder_layers": out.num_encoder_layers,
             "decoder_layers": out.num_decoder_layers})
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g) * 0.05 for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def tiny_release(base_llm, tmp_path_factory):
    """(config file naming the raw checkpoint, the checkpoint's state, the checkpoint file)."""
    folder = tmp_path_factory.mktemp("tiny-release")
    config = _tiny_nextgpt_config(base_llm)
    state = _tiny_checkpoint(config)
    torch.save(state, folder / "pytorch_model.pt")
    data = config.to_dict()
    data["checkpoint"] = str(folder / "pytorch_model.pt")
    from anygpt.config import AnyGPTConfig

    AnyGPTConfig.from_dict(data).to_yaml(folder / "raw.yaml")
    return folder / "raw.yaml", state, folder / "pytorch_model.pt"


@pytest.fixture(scope="module")
def converted(tiny_release, base_llm, tmp_path_factory):
    """The tiny release converted through the CLI: (its model directory, the CLI's output)."""
    import contextlib
    import io

    from anygpt.cli import main

    raw_yaml, _, checkpoint = tiny_release
    out = tmp_path_factory.mktemp("converted") / "model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["convert", "nextgpt", str(checkpoint), "--base-llm", str(base_llm), "--out", str(out),
                     "--preset", str(raw_yaml)])
    assert code == 0
    return out, printed.getvalue()


def test_convert_writes_a_self_contained_directory(converted):
    from anygpt.config import AnyGPTConfig

    out, printed = converted
    assert f"wrote {out}" in printed and "anygpt app --model" in printed
    assert {p.name for p in out.iterdir()} >= {"anygpt_config.yaml", "projectors.safetensors", "llm"}
    config = AnyGPTConfig.from_file(out)
    assert config.checkpoint is None and config.llm.pretrained == "llm"
    assert (out / "llm" / "model.safetensors").is_file() and (out / "llm" / "tokenizer.json").is_file()


def test_converted_model_equals_loading_the_raw_checkpoint(converted, tiny_release):
    from anygpt import AnyGPTPipeline

    raw = AnyGPTPipeline.from_pretrained(tiny_release[0])
    new = AnyGPTPipeline.from_pretrained(converted[0])
    lm = new.model.lm
    ids = torch.tensor([[*lm.tokenizer("a cat", add_special_tokens=False)["input_ids"], *lm.signal_ids["video"]]])
    with torch.no_grad():
        a, b = raw.model(ids), new.model(ids)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
        states = a.hidden_states[:, -24:]
        torch.testing.assert_close(new.model.project_signals("video", states),
                                   raw.model.project_signals("video", states), rtol=0, atol=0)
    for pipe in (raw, new):
        pipe.set_progress_bar_config(disable=True)
    first, second = (p("Draw a cat", max_new_tokens=6, seed=0, do_sample=True) for p in (raw, new))
    assert first.raw_text == second.raw_text


def test_rows_and_lora_follow_nextgpt_not_the_config_order(converted, tiny_release):
    """The config lists image, audio, video: our [AUD0] has NExT-GPT's [VID0] id, yet its row is
    NExT-GPT's [AUD0] row (loading copied rows by position before)."""
    from anygpt import AnyGPTPipeline
    from anygpt.nextgpt import NEXTGPT_TOKENS

    _, state, _ = tiny_release
    emb, head = state[LLM + "model.embed_tokens.weight"], state[LLM + "lm_head.weight"]
    for pipe in (AnyGPTPipeline.from_pretrained(converted[0]), AnyGPTPipeline.from_pretrained(tiny_release[0])):
        lm = pipe.model.lm
        assert lm.tokenizer.convert_tokens_to_ids("[AUD0]") == 257 + NEXTGPT_TOKENS.index("[VID0]")
        ours_emb, ours_head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
        for token in NEXTGPT_TOKENS:
            ours, theirs = lm.tokenizer.convert_tokens_to_ids(token), 257 + NEXTGPT_TOKENS.index(token)
            assert torch.equal(ours_emb[ours], emb[theirs]) and torch.equal(ours_head[ours], head[theirs]), token
        assert torch.equal(ours_emb[:257], emb[:257])
        layer = lm.model.model.layers[1].self_attn.v_proj.weight
        a, b = state[LLM + "model.layers.1.self_attn.v_proj.lora_A.weight"], state[LLM + "model.layers.1.self_attn.v_proj.lora_B.weight"]
        assert not torch.allclose(layer, layer - b @ a)
        assert torch.equal(pipe.model.output_projectors["audio"].query_embs, state["gen_text_hidden_fcs_audio.0.query_embs"])
        assert torch.equal(pipe.model.input_projectors["video"].proj.bias, state["llama_proj.bias"])


@pytest.fixture(scope="module")
def tiny_model(base_llm):
    from anygpt.model import AnyGPTModel

    return AnyGPTModel.from_config(_tiny_nextgpt_config(base_llm))


def _v_proj_delta(model, path, **options):
    from anygpt.checkpoint import load_checkpoint

    model = copy.deepcopy(model)
    before = model.lm.model.model.layers[0].self_attn.v_proj.weight.clone()
    load_checkpoint(model, str(path), **options)
    return model.lm.model.model.layers[0].self_attn.v_proj.weight - before


def test_lora_scale_is_alpha_over_r(tiny_model, tiny_release, tmp_path, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="anygpt.nextgpt")
    _, state, checkpoint = tiny_release
    expected = state[LLM + "model.layers.0.self_attn.v_proj.lora_B.weight"] @ state[LLM + "model.layers.0.self_attn.v_proj.lora_A.weight"]
    full = _v_proj_delta(tiny_model, checkpoint)  # no config: NExT-GPT's alpha 32 / r 32
    torch.testing.assert_close(full, expected)
    assert "alpha 32 (NExT-GPT's training config) / r 32" in caplog.text

    shutil.copy(checkpoint, tmp_path / "pytorch_model.pt")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 16, "peft_type": "LORA"}))
    torch.testing.assert_close(_v_proj_delta(tiny_model, tmp_path / "pytorch_model.pt"), full / 2)
    assert "alpha 16 (adapter_config.json) / r 32" in caplog.text
    torch.testing.assert_close(_v_proj_delta(tiny_model, checkpoint, lora_alpha=16.0, lora_r=32), full / 2)
    with pytest.raises(WeightsNotFoundError, match="LoRA r is 16 but its lora_A tensors have rank 32"):
        _v_proj_delta(tiny_model, checkpoint, lora_r=16)


def test_convert_flags_set_the_lora_scale(tiny_release, base_llm, tmp_path):
    from anygpt import AnyGPTPipeline
    from anygpt.cli import main

    raw_yaml, state, checkpoint = tiny_release
    out = tmp_path / "half"
    assert main(["convert", "nextgpt", str(checkpoint), "--base-llm", str(base_llm), "--out", str(out),
                 "--preset", str(raw_yaml), "--lora-alpha", "16", "--lora-r", "32"]) == 0
    base = AnyGPTPipeline.from_pretrained(raw_yaml).model  # merged at scale 1
    half = AnyGPTPipeline.from_pretrained(out).model
    a, b = state[LLM + "model.layers.1.self_attn.q_proj.lora_A.weight"], state[LLM + "model.layers.1.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(half.lm.model.model.layers[1].self_attn.q_proj.weight,
                               base.lm.model.model.layers[1].self_attn.q_proj.weight - 0.5 * (b @ a))


def test_convert_reports_what_is_missing_and_unmappable(tiny_release, base_llm, tmp_path, capsys):
    from anygpt.cli import main

    raw_yaml, state, _ = tiny_release
    broken = {k: v for k, v in state.items() if not k.startswith("gen_text_hidden_fcs_audio.0.model.")}
    torch.save(broken, tmp_path / "pytorch_model.pt")
    args = ["convert", "nextgpt", str(tmp_path / "pytorch_model.pt"), "--base-llm", str(base_llm),
            "--out", str(tmp_path / "out")]
    assert main([*args, "--preset", str(raw_yaml)]) == 2
    err = capsys.readouterr().err
    assert "missing 2 tensor(s)" in err and "gen_text_hidden_fcs_audio.0.model.weight" in err
    assert "gen_text_hidden_fcs_audio.0.model.bias" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert main([*args[:-1], str(tmp_path / "notes"), "--preset", str(raw_yaml)]) == 2
    assert "not an AnyGPT model directory" in capsys.readouterr().err

    five = _tiny_nextgpt_config(base_llm, **{"modalities.image.num_signal_tokens": 5})
    five.to_yaml(tmp_path / "five.yaml")
    assert main([*args, "--preset", str(tmp_path / "five.yaml")]) == 2
    assert "'[IMG4]' has no row" in capsys.readouterr().err


# Checked before the LLM loads ------------------------------------------------------------------------


class _LLMLoaded(Exception):
    """Raised by the stand-in for the LLM's weight loading."""


@pytest.fixture
def llm_loads(monkeypatch):
    """Every call that would load the LLM's weights is recorded, and fails."""
    from transformers import AutoModelForCausalLM

    calls = []

    def from_pretrained(*args, **kwargs):
        calls.append(args)
        raise _LLMLoaded(args)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return calls


def _vicuna_configs_only(folder):
    """Vicuna-7B v0 as a folder of configs without weights: its config.json (from the shipped
    architecture file) and a 32000-token tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from anygpt.architectures import component_spec

    LlamaConfig(**component_spec("vicuna-7b-v0", "llm")["config"]).save_pretrained(folder)
    vocab = {f"piece{i}": i for i in range(32000)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="piece0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="piece0").save_pretrained(folder)
    return folder


def test_the_full_release_is_checked_from_configs_alone(tmp_path, llm_loads):
    """nextgpt-7b with a Vicuna folder that holds no weights: the 647 tensors pass, a missing one
    is named, and nothing loads the LLM."""
    from anygpt.checkpoint import check_nextgpt_state
    from anygpt.convert import conversion_config

    config, base_dir = conversion_config("nextgpt-7b", _vicuna_configs_only(tmp_path))
    state = _zero_stride_state(RELEASE_SHAPES)
    check_nextgpt_state(config, state, source="pytorch_model.pt", base_dir=base_dir)
    del state["gen_text_hidden_fcs_audio.0.query_embs"]
    with pytest.raises(WeightsNotFoundError, match=r"missing 1 tensor\(s\): gen_text_hidden_fcs_audio.0.query_embs"):
        check_nextgpt_state(config, state, source="pytorch_model.pt", base_dir=base_dir)
    assert llm_loads == []


def _write_added_tokens(folder, ids):
    path = folder / "added_tokens.json"
    path.write_text(json.dumps(ids))
    return path


@pytest.mark.parametrize("breakage", ["missing projector tensor", "lora r", "added tokens"])
def test_a_bad_checkpoint_fails_before_the_llm_loads(breakage, tiny_release, base_llm, tmp_path, capsys, llm_loads):
    from anygpt.cli import main

    raw_yaml, state, _ = tiny_release
    extra = []
    if breakage == "missing projector tensor":
        state = {k: v for k, v in state.items() if k != "gen_text_hidden_fcs_video.0.fc.bias"}
        expected = "missing 1 tensor(s): gen_text_hidden_fcs_video.0.fc.bias"
    elif breakage == "lora r":
        extra = ["--lora-r", "16"]
        expected = "LoRA r is 16 but its lora_A tensors have rank 32"
    else:
        _write_added_tokens(tmp_path, {"<Img>": 257})
        expected = f"{tmp_path / 'added_tokens.json'}: lacks 37 of NExT-GPT's tokens"
    torch.save(state, tmp_path / "pytorch_model.pt")
    assert main(["convert", "nextgpt", str(tmp_path / "pytorch_model.pt"), "--base-llm", str(base_llm),
                 "--out", str(tmp_path / "out"), "--preset", str(raw_yaml), *extra]) == 2
    assert expected in capsys.readouterr().err
    assert llm_loads == [] and not (tmp_path / "out").exists()


def test_a_good_checkpoint_goes_on_to_load_the_llm(tiny_release, base_llm, tmp_path, llm_loads):
    """The stand-in above is on the conversion's path: a checkpoint that passes reaches it."""
    from anygpt.convert import convert_nextgpt

    raw_yaml, _, checkpoint = tiny_release
    with pytest.raises(_LLMLoaded):
        convert_nextgpt(checkpoint, base_llm, tmp_path / "out", preset=raw_yaml)
    assert len(llm_loads) == 1


# NExT-GPT's saved added_tokens.json -----------------------------------------------------------------

#: A token order other than NExT-GPT's published one: audio first, then video, image, the wrappers.
_SHUFFLED = (*(f"[AUD{i}]" for i in range(8)), *(f"[VID{i}]" for i in range(24)),
             *(f"[IMG{i}]" for i in range(4)), "</Img>", "<Img>")


def _reordered(state, order, base=257):
    """``state`` with its token rows moved to the ids ``order`` gives (each token keeps its row)."""
    from anygpt.nextgpt import NEXTGPT_TOKENS

    out = dict(state)
    for key in (LLM + "model.embed_tokens.weight", LLM + "lm_head.weight"):
        rows = state[key].clone()
        for i, token in enumerate(order):
            rows[base + i] = state[key][base + NEXTGPT_TOKENS.index(token)]
        out[key] = rows
    return out


@pytest.mark.parametrize("where", ["beside", "parent", "given"])
def test_added_tokens_json_ids_are_honoured(where, tiny_model, tiny_release, tmp_path, caplog):
    """Rows saved under another id order land under the same token strings as the published
    order's do, wherever the file is found."""
    import logging

    from anygpt.checkpoint import load_checkpoint

    caplog.set_level(logging.INFO, logger="anygpt.nextgpt")
    _, state, checkpoint = tiny_release
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save(_reordered(state, _SHUFFLED), folder / "pytorch_model.pt")
    ids = {token: 257 + i for i, token in enumerate(_SHUFFLED)}
    target = {"beside": folder, "parent": tmp_path, "given": tmp_path / "elsewhere"}[where]
    target.mkdir(exist_ok=True)
    path = _write_added_tokens(target, ids)
    reference, shuffled = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    load_checkpoint(reference, str(checkpoint))
    load_checkpoint(shuffled, str(folder / "pytorch_model.pt"), added_tokens=path if where == "given" else None)
    assert f"NExT-GPT token ids: read from {path}" in caplog.text
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(shuffled.lm.model, get)().weight, getattr(reference.lm.model, get)().weight)


def test_convert_reads_added_tokens_from_the_flag(converted, tiny_release, base_llm, tmp_path):
    from anygpt import AnyGPTPipeline
    from anygpt.cli import main

    raw_yaml, state, _ = tiny_release
    torch.save(_reordered(state, _SHUFFLED), tmp_path / "pytorch_model.pt")
    (tmp_path / "tokens").mkdir()
    path = _write_added_tokens(tmp_path / "tokens", {token: 257 + i for i, token in enumerate(_SHUFFLED)})
    assert main(["convert", "nextgpt", str(tmp_path / "pytorch_model.pt"), "--base-llm", str(base_llm),
                 "--out", str(tmp_path / "out"), "--preset", str(raw_yaml), "--added-tokens", str(path)]) == 0
    ours, before = (AnyGPTPipeline.from_pretrained(p).model.lm.model for p in (tmp_path / "out", converted[0]))
    assert torch.equal(ours.get_input_embeddings().weight, before.get_input_embeddings().weight)
    assert torch.equal(ours.get_output_embeddings().weight, before.get_output_embeddings().weight)


def _published(base=257):
    from anygpt.nextgpt import nextgpt_token_ids

    return nextgpt_token_ids(base)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not a readable JSON file"),
    (json.dumps(["<Img>", "</Img>"]), "not a JSON object of token → integer id"),
    (json.dumps({**_published(), "[IMG0]": "32002"}), "not a JSON object of token → integer id"),
    (json.dumps({k: v for k, v in _published().items() if k != "[AUD7]"}), "lacks 1 of NExT-GPT's tokens ([AUD7])"),
    (json.dumps({**_published(), "[IMG1]": 259}), "'[IMG0]' and '[IMG1]' share id 259"),
    (json.dumps({**_published(), "[AUD7]": 295}), "'[AUD7]' has id 295, outside the checkpoint's 295 embedding rows"),
    (json.dumps({**_published(), "<Img>": -1}), "'<Img>' has id -1, outside the checkpoint's 295 embedding rows"),
])
def test_a_bad_added_tokens_json_is_named_in_one_line(content, expected, tmp_path):
    from anygpt.nextgpt import EMBED_KEY, checkpoint_token_ids

    (tmp_path / "added_tokens.json").write_text(content)
    with pytest.raises(WeightsNotFoundError) as info:
        checkpoint_token_ids({EMBED_KEY: torch.zeros(295, 4)}, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'added_tokens.json'}: ") and expected in message
    assert "\n" not in message and "--added-tokens FILE" in message


def test_ids_inside_the_base_vocabulary_and_a_missing_file_are_refused(tmp_path):
    from anygpt.nextgpt import NEXTGPT_TOKENS, checkpoint_token_ids, token_rows

    vocab = {f"base{i}": i for i in range(257)} | {t: 257 + i for i, t in enumerate(NEXTGPT_TOKENS)}
    with pytest.raises(WeightsNotFoundError, match=r"'<Img>' at id 5, inside this LLM's base vocabulary of 257"):
        token_rows(vocab, 295, list(NEXTGPT_TOKENS), {**_published(), "<Img>": 5})
    with pytest.raises(WeightsNotFoundError, match=r"--added-tokens .*nothing.json: no such file"):
        checkpoint_token_ids({}, None, tmp_path / "nothing.json")


def test_without_added_tokens_json_the_published_ids_are_used(tmp_path, caplog):
    import logging

    from anygpt.nextgpt import EMBED_KEY, NEXTGPT_TOKENS, checkpoint_token_ids, token_rows

    caplog.set_level(logging.INFO, logger="anygpt.nextgpt")
    (tmp_path / "checkpoint").mkdir()
    assert checkpoint_token_ids({EMBED_KEY: torch.zeros(295, 4)}, tmp_path / "checkpoint") is None
    assert "NExT-GPT token ids: its published ones" in caplog.text
    vocab = {f"base{i}": i for i in range(257)} | {t: 257 + i for i, t in enumerate(reversed(NEXTGPT_TOKENS))}
    published = token_rows(vocab, 295, list(NEXTGPT_TOKENS))
    assert torch.equal(published.index, token_rows(vocab, 295, list(NEXTGPT_TOKENS), _published()).index)
    assert published.checkpoint_vocab == 295 and int(published.index[vocab["<Img>"]]) == 257


def test_the_configs_give_the_layout_and_rows_of_the_built_model(tiny_model):
    """One layout: read from meta-device modules built from the configs, it is the built model's."""
    from anygpt.checkpoint import expected_nextgpt_layout
    from anygpt.nextgpt import layout_for_model, token_rows

    lm = tiny_model.lm
    added = [lm.config.media_begin, lm.config.media_end, *(t for run in lm.signal_tokens.values() for t in run)]
    built_rows = token_rows(lm.tokenizer.get_vocab(), lm.model.get_input_embeddings().num_embeddings, added)
    layout, rows = expected_nextgpt_layout(tiny_model.config)
    assert layout == layout_for_model(tiny_model, built_rows)
    assert torch.equal(rows.index, built_rows.index) and rows.checkpoint_vocab == built_rows.checkpoint_vocab == 295


def test_a_random_llm_is_checked_from_its_arch():
    from anygpt.checkpoint import check_nextgpt_state
    from anygpt.config import AnyGPTConfig

    data = AnyGPTConfig.from_name("tiny").to_dict()
    for m in data["modalities"].values():
        m["input_projector"] = {"kind": "linear", "num_tokens": 1}
    config = AnyGPTConfig.from_dict(data)
    state = _tiny_checkpoint(config)
    check_nextgpt_state(config, state, source="pytorch_model.pt")
    state[LLM + "lm_head.weight"] = state[LLM + "lm_head.weight"][:-1]
    with pytest.raises(WeightsNotFoundError, match=r"lm_head.weight: expected \(295, 64\), got \(294, 64\)"):
        check_nextgpt_state(config, state, source="pytorch_model.pt")

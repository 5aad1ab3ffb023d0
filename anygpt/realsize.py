"""NExT-GPT at its real sizes, with random weights and without any download.

The ``nextgpt-7b`` preset names released weights. The configs derived here replace each of them
by its public architecture (:mod:`anygpt.architectures`, :data:`anygpt.encoders.IMAGEBIND_HUGE_ARCH`)
and keep everything else of the preset (projectors, signal runs, prompt format, decode options):

* :func:`full_size_config`: every component at full size, as NExT-GPT runs it;
* :func:`real_width_config`: every interface at its real width (ImageBind's 1024-d embedding,
  the LLM's 4096-d hidden states and 32 038-token vocabulary, the projectors of the preset, the
  decoders' text conditioning 77 × 768, 1 × 512 and 77 × 1024) with depths and channels away
  from the interfaces cut, so that a whole turn runs on a CPU in seconds.

:func:`parameter_table` builds the full-size system on the meta device and sets its parameter
counts against NExT-GPT's paper (Wu et al. 2023, "NExT-GPT: Any-to-Any Multimodal LLM",
Table 1). The LLM needs a tokenizer of Vicuna's shape: :func:`anygpt.testing.write_llama_shaped_tokenizer`.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anygpt.architectures import architecture_for, build_component, component_spec, load_architecture
from anygpt.config import AnyGPTConfig
from anygpt.decoders import get_decoder_class
from anygpt.encoders import IMAGEBIND_HUGE_ARCH
from anygpt.nextgpt import LORA_TARGETS, NEXTGPT_LORA_ALPHA, NEXTGPT_LORA_R

if TYPE_CHECKING:
    import torch
    from torch import nn

    from anygpt.model import AnyGPTModel

__all__ = ["PRESET", "LLM_ARCHITECTURE", "ParameterRow", "full_size_config", "real_width_config",
           "vicuna_tokenizer", "on_device", "on_meta", "meta_model", "decoder_parameters", "parameter_table", "format_parameter_table"]

#: The preset whose real sizes these are.
PRESET = "nextgpt-7b"
#: The LLM's architecture file (the preset names a local folder, not a hub id, for Vicuna).
LLM_ARCHITECTURE = "vicuna-7b-v0"

# Depths and widths away from the interfaces, for real_width_config: one layer, narrow
# feed-forwards. The ImageBind trunks are the tiny preset's.
_CUT_LLM = {"num_hidden_layers": 1, "intermediate_size": 256}
_CUT_TEXT = {"text_num_layers": 1, "text_intermediate_size": 64}
_CUT_DECODE = {"steps": 2, "height": None, "width": None, "num_frames": 4, "audio_length_s": None}

# NExT-GPT's Table 1, as printed.
_PAPER = "NExT-GPT Table 1"


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def vicuna_tokenizer(folder: str | Path) -> Path:
    """Write a tokenizer of Vicuna's shape (32 000 tokens, LLaMA's special ids) into ``folder``."""
    from anygpt.testing import write_llama_shaped_tokenizer

    vocab = component_spec(LLM_ARCHITECTURE, "tokenizer")["config"]["vocab_size"]
    return write_llama_shaped_tokenizer(folder, vocab_size=vocab)


def _derived(tokenizer: str | Path, name: str, encoder_arch: dict, llm_arch: dict, llm_dtype: str) -> dict:
    """The preset as plain data with every ``pretrained`` replaced (decoders left to the caller)."""
    data = AnyGPTConfig.from_name(PRESET).to_dict()
    data.update(name=name, checkpoint=None,
                description=f"{PRESET} with random weights ({name}); outputs are noise.")
    data["encoder"].update(pretrained=None, arch=encoder_arch)
    data["llm"].update(pretrained=None, arch=llm_arch, tokenizer=str(tokenizer), dtype=llm_dtype)
    return data


def _llm_arch(**overrides: Any) -> dict[str, Any]:
    return {**component_spec(LLM_ARCHITECTURE, "llm")["config"], **overrides}


def _decoders(data: dict) -> Iterator[tuple[str, dict]]:
    """``(architecture name, decoder dict)`` of each output modality, found by hub id."""
    for modality in data["modalities"].values():
        if modality["decoder"] is not None:
            yield architecture_for(modality["decoder"]["pretrained"]), modality["decoder"]


def full_size_config(tokenizer: str | Path, llm_dtype: str = "float32") -> AnyGPTConfig:
    """The ``nextgpt-7b`` system at full size with random weights.

    Args:
        tokenizer: a folder holding a tokenizer of Vicuna's shape (:func:`vicuna_tokenizer`).
        llm_dtype: the LLM's weights dtype (``bfloat16`` halves its 27 GB of float32).
    """
    data = _derived(tokenizer, f"{PRESET}-full-size", dict(IMAGEBIND_HUGE_ARCH), _llm_arch(), llm_dtype)
    for architecture, decoder in _decoders(data):
        decoder.update(pretrained=None, arch={"architecture": architecture})
    return AnyGPTConfig.from_dict(data)


def _real_width_decoder_arch(architecture: str, decoder_name: str) -> dict[str, Any]:
    """Tiny decoder sizes with the text side of ``architecture`` at its real width."""
    text = component_spec(architecture, "text_encoder")["config"]
    arch = {"text_hidden_size": text["hidden_size"], "text_num_heads": text["num_attention_heads"], **_CUT_TEXT}
    # CLAP conditions AudioLDM through its projection; CLIP decoders use the hidden states.
    if "projection_dim" in get_decoder_class(decoder_name).tiny_arch:
        arch["projection_dim"] = text["projection_dim"]
    return arch


def real_width_config(tokenizer: str | Path) -> AnyGPTConfig:
    """The ``nextgpt-7b`` system with every interface at its real width and cut depths.

    The encoder's output is ImageBind-huge's 1024-d embedding (trunks of the ``tiny`` preset);
    the LLM is Vicuna's width, heads and vocabulary with 1 layer and a 256-wide feed-forward;
    the projectors are the preset's; each decoder's text encoder has its real width (CLIP-L 768,
    CLAP 768 projected to 512, OpenCLIP-H 1024) but one layer, and its UNet and VAE are tiny.
    Decoding takes 2 steps at the tiny decoders' native sizes.

    Args:
        tokenizer: a folder holding a tokenizer of Vicuna's shape (:func:`vicuna_tokenizer`).
    """
    encoder = {**AnyGPTConfig.from_name("tiny").encoder.arch,
               "out_embed_dim": IMAGEBIND_HUGE_ARCH["out_embed_dim"]}
    data = _derived(tokenizer, f"{PRESET}-real-width", encoder, _llm_arch(**_CUT_LLM), "float32")
    for architecture, decoder in _decoders(data):
        decoder.update(pretrained=None, arch=_real_width_decoder_arch(architecture, decoder["name"]),
                       dtype="float32", **_CUT_DECODE)
    return AnyGPTConfig.from_dict(data)


# --------------------------------------------------------------------------------------------
# Building on the meta device
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def on_device(device: "str | torch.device") -> Iterator[None]:
    """``device`` as torch's default device, for building modules straight onto it.

    Modules that transformers imports lazily while a model is built can make tensors when they
    are imported (torchaudio's Kaldi features keep an ``EPSILON`` tensor, reached through
    ``transformers.audio_utils``); made under another default device (the meta device above all),
    such a tensor would stay there for the rest of the process and break audio preprocessing.
    They are imported first.
    """
    import importlib
    import importlib.util

    import torch

    if importlib.util.find_spec("torchaudio") is not None:
        importlib.import_module("torchaudio.compliance.kaldi")
    with torch.device(device):
        yield


def on_meta() -> contextlib.AbstractContextManager[None]:
    """:func:`on_device` for the meta device: modules built without memory."""
    return on_device("meta")


def meta_model(config: AnyGPTConfig) -> AnyGPTModel:
    """``AnyGPTModel.from_config(config)`` with every parameter on the meta device (no memory,
    no initialisation): for counting parameters of a full-size system.

    ImageBind cannot be built under ``torch.device("meta")`` (it reads a tensor's value while it
    is built), so its parameters alone are put on the meta device by ``accelerate``.
    """
    from accelerate import init_empty_weights

    from anygpt.encoders import build_encoder
    from anygpt.model import AnyGPTModel

    with init_empty_weights():
        encoder = build_encoder(config.encoder)
    with on_meta():
        return AnyGPTModel.from_config(config, encoder=encoder)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_parameters(architecture: str, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Parameters of each weighted part of ``architecture`` (schedulers and tokenizers have none),
    built on the meta device; parts in ``skip`` are left out."""
    from torch import nn

    counts = {}
    for name, spec in load_architecture(architecture)["components"].items():
        if name in skip or name in ("tokenizer", "scheduler"):
            continue
        with on_meta():
            part = build_component(spec)
        if isinstance(part, nn.Module):
            counts[name] = _count(part)
    return counts


def _lora_parameters(model: AnyGPTModel) -> int:
    """LoRA's added parameters with NExT-GPT's rank on its target modules (PEFT, on meta)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=NEXTGPT_LORA_R, lora_alpha=NEXTGPT_LORA_ALPHA, target_modules=list(LORA_TARGETS))
    with on_meta(), warnings.catch_warnings():
        # PEFT still calls transformers' deprecated is_gradient_checkpointing; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model.lm.model, config)
    return sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)


# --------------------------------------------------------------------------------------------
# The parameter table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterRow:
    """One component's parameter count next to a published one.

    Attributes:
        key: a short stable id (``encoder``, ``output_projection/image``, ...).
        component: what was counted.
        ours: our count, from the built module.
        reference: the published count, as printed.
        source: where ``reference`` is printed.
        note: why the two differ, where they differ by more than the print explains at a glance.
    """

    key: str
    component: str
    ours: int
    reference: float
    source: str = _PAPER
    note: str = ""

    @property
    def ratio(self) -> float:
        """``ours / reference``."""
        return self.ours / self.reference


def _model_rows(model: AnyGPTModel) -> list[ParameterRow]:
    llm = model.lm.model
    vocab = llm.get_input_embeddings().num_embeddings
    rows = [
        ParameterRow("encoder", "ImageBind-huge (all six trunks)", _count(model.encoder), 1.2e9),
        ParameterRow("input_projection", "input projection Linear(1024, 4096), each input modality",
                     _count(model.input_projectors["image"]), 4e6,
                     note="the table truncates to the digits it prints (4.2 M as 4 M; LoRA's 33.6 M as 33 M); "
                          "NExT-GPT shares one such projection among its modalities, AnyGPT has one each"),
        ParameterRow("llm", f"Vicuna-7B, {vocab}-token vocabulary", _count(llm), 7e9,
                     note="7 B is LLaMA-7B's nominal size; the LLaMA paper (Table 2) prints 6.7 B"),
        ParameterRow("lora", f"LoRA r={NEXTGPT_LORA_R} on {', '.join(LORA_TARGETS)}", _lora_parameters(model), 33e6),
    ]
    paper = {"image": 31e6, "audio": 31e6, "video": 32e6}
    for modality, projector in model.output_projectors.items():
        shape = f"{projector.num_queries} x {projector.out_dim}"
        rows.append(ParameterRow(f"output_projection/{modality}", f"output projection, {modality} ({shape})",
                                 _count(projector), paper[modality],
                                 note="the table truncates to the digits it prints (31.96 M and 31.79 M as 31 M)"
                                 if modality in ("image", "audio") else ""))
    return rows


def _decoder_rows(config: AnyGPTConfig) -> list[ParameterRow]:
    paper = {"image": 1.3e9, "audio": 975e6, "video": 1.8e9}
    rows = []
    for modality in config.output_modalities:
        architecture = config.modalities[modality].decoder.arch["architecture"]
        parts = decoder_parameters(architecture)
        listing = " + ".join(parts)
        note = ""
        if "safety_checker" in parts:
            note = "the table truncates to the digits it prints (1.37 B as 1.3 B)"
        rows.append(ParameterRow(f"decoder/{modality}", f"{architecture} ({listing})", sum(parts.values()),
                                 paper[modality], note=note))
        if "safety_checker" in parts:  # the pipeline runs without it
            run = sum(n for name, n in parts.items() if name != "safety_checker")
            rows.append(ParameterRow(f"decoder/{modality}/as-run", f"{architecture} as AnyGPT runs it "
                                     "(no safety checker)", run, 1.07e9,
                                     source="SD v1 model card: 860 M UNet + 123 M text encoder, + 84 M VAE"))
    return rows


def parameter_table(tokenizer: str | Path | None = None) -> list[ParameterRow]:
    """Build the full-size ``nextgpt-7b`` system on the meta device and count its parameters,
    component by component, next to NExT-GPT's Table 1.

    Args:
        tokenizer: a folder with a tokenizer of Vicuna's shape; default: one written to a
            temporary folder (:func:`vicuna_tokenizer`).
    """
    with tempfile.TemporaryDirectory() as folder:
        config = full_size_config(tokenizer or vicuna_tokenizer(folder))
        model = meta_model(config)
    return _model_rows(model) + _decoder_rows(config)


def format_parameter_table(rows: list[ParameterRow]) -> str:
    """The table as fixed-width text: component, ours, reference, ratio, source, note."""
    header = f"{'component':<64} {'ours':>15} {'reference':>10} {'ratio':>6}  source / note"
    lines = [header, "-" * len(header)]
    for row in rows:
        detail = row.source + (f"; {row.note}" if row.note else "")
        lines.append(f"{row.component:<64} {row.ours:>15,} {_short(row.reference):>10} {row.ratio:>6.3f}  {detail}")
    return "\n".join(lines)


def _short(count: float) -> str:
    """``1.2e9`` → ``1.2 B``, ``31e6`` → ``31 M``."""
    for unit, scale in (("B", 1e9), ("M", 1e6)):
        if count >= scale:
            return f"{count / scale:g} {unit}"
    return f"{count:g}"

"""Saving and loading model directories, and reading NExT-GPT's released checkpoint.

A model directory holds ``anygpt_config.yaml`` plus the weights that cannot be fetched again:

* ``projectors.safetensors`` — input and output projectors;
* ``llm_added_tokens.safetensors`` — embedding (and LM-head) rows of the added tokens, when the
  LLM itself is referenced by hub id or path;
* ``llm/``, ``encoder.safetensors``, ``decoders/<modality>/`` — whole components, written only
  when they were randomly initialised (the ``tiny`` preset) and so exist nowhere else.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from anygpt.config import CONFIG_FILENAME, AnyGPTConfig
from anygpt.errors import WeightsNotFoundError
from anygpt.llm import resolve_path

if TYPE_CHECKING:
    from anygpt.model import AnyGPTModel
    from anygpt.pipeline import AnyGPTPipeline

logger = logging.getLogger(__name__)

__all__ = ["save_pipeline", "load_weights", "load_checkpoint", "convert_nextgpt_state_dict",
           "PROJECTORS_FILE", "ADDED_TOKENS_FILE"]

PROJECTORS_FILE = "projectors.safetensors"
ADDED_TOKENS_FILE = "llm_added_tokens.safetensors"
ENCODER_FILE = "encoder.safetensors"
LLM_DIR = "llm"


def projector_state(model: "AnyGPTModel") -> dict[str, torch.Tensor]:
    """The projectors' tensors, keyed ``input_projectors.<m>.*`` / ``output_projectors.<m>.*``."""
    state = {f"input_projectors.{k}": v for k, v in model.input_projectors.state_dict().items()}
    state.update({f"output_projectors.{k}": v for k, v in model.output_projectors.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def added_token_state(model: "AnyGPTModel") -> dict[str, torch.Tensor]:
    """The rows of the tokens AnyGPT added, from the input embeddings and (if untied) the LM head."""
    ids = torch.tensor(model.lm.added_token_ids())
    llm = model.lm.model
    state = {"input_embeddings": llm.get_input_embeddings().weight[ids]}
    out = llm.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != llm.get_input_embeddings().weight.data_ptr():
        state["output_embeddings"] = out.weight[ids]
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pipeline(pipe: "AnyGPTPipeline", directory: Path) -> Path:
    """Write ``pipe`` to ``directory`` (see the module docstring); returns the directory."""
    from safetensors.torch import save_file

    model, base_dir = pipe.model, pipe.base_dir
    directory.mkdir(parents=True, exist_ok=True)
    data = model.config.to_dict()
    data["checkpoint"] = None  # its weights are in the files written below

    if model.config.encoder.pretrained is None:
        model.encoder.save_weights(directory / ENCODER_FILE)
        data["encoder"]["pretrained"] = ENCODER_FILE
    elif model.config.encoder.pretrained != "imagebind_huge":
        data["encoder"]["pretrained"] = _absolute(model.config.encoder.pretrained, base_dir)

    llm_cfg = data["llm"]
    if model.config.llm.pretrained is None and model.config.llm.arch is not None:
        model.lm.model.save_pretrained(directory / LLM_DIR)
        model.lm.tokenizer.save_pretrained(directory / LLM_DIR)
        llm_cfg.update(pretrained=LLM_DIR, arch=None, tokenizer=None, gguf_file=None, local_package=None)
    else:
        for key in ("pretrained", "tokenizer"):
            if llm_cfg[key] is not None and llm_cfg[key] != "byte-level":
                llm_cfg[key] = _absolute(llm_cfg[key], base_dir)
        save_file(added_token_state(model), str(directory / ADDED_TOKENS_FILE))

    for name in model.config.output_modalities:
        dec = data["modalities"][name]["decoder"]
        if dec["pretrained"] is None:
            sub = f"decoders/{name}"
            pipe.decoder(name).save_pretrained(directory / sub)
            dec.update(pretrained=sub, arch=None)
        else:
            dec["pretrained"] = _absolute(dec["pretrained"], base_dir)

    save_file(projector_state(model), str(directory / PROJECTORS_FILE))
    AnyGPTConfig.from_dict(data).to_yaml(directory / CONFIG_FILENAME)
    logger.info("saved AnyGPT model to %s", directory)
    return directory


def _absolute(value: str, base_dir: Path | None) -> str:
    """A local path made absolute (so the new directory still finds it); hub ids unchanged."""
    resolved = Path(resolve_path(value, base_dir))
    return str(resolved.resolve()) if resolved.exists() else value


def load_weights(model: "AnyGPTModel", directory: Path | None) -> None:
    """Load the projector and added-token files of a model directory (if any), then the
    config's ``checkpoint`` (if any)."""
    from safetensors.torch import load_file

    if directory is None:
        pass
    elif (directory / PROJECTORS_FILE).is_file():
        _load_projectors(model, load_file(str(directory / PROJECTORS_FILE)), directory / PROJECTORS_FILE)
    if directory is not None and (directory / ADDED_TOKENS_FILE).is_file():
        _load_added_rows(model, load_file(str(directory / ADDED_TOKENS_FILE)))
    if model.config.checkpoint:
        load_checkpoint(model, model.config.checkpoint, directory)


def _load_projectors(model: "AnyGPTModel", state: dict[str, torch.Tensor], source: object) -> None:
    expected = projector_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsNotFoundError(
            f"{source}: projector weights do not match the config (missing: {missing[:5]}, "
            f"unexpected: {unexpected[:5]}); was it saved with a different config?")
    for prefix, module in (("input_projectors.", model.input_projectors),
                           ("output_projectors.", model.output_projectors)):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _load_added_rows(model: "AnyGPTModel", state: dict[str, torch.Tensor]) -> None:
    ids = torch.tensor(model.lm.added_token_ids())
    llm = model.lm.model
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[ids] = state["input_embeddings"].to(emb.device, emb.dtype)
        if "output_embeddings" in state:
            out = llm.get_output_embeddings().weight
            out[ids] = state["output_embeddings"].to(out.device, out.dtype)


def load_checkpoint(model: "AnyGPTModel", reference: str, base_dir: Path | None = None) -> None:
    """Load trained weights named by ``config.checkpoint``.

    Args:
        reference: a local file, or ``hub_id:filename``. ``.safetensors`` files are AnyGPT's
            projector format; ``.pt``/``.pth``/``.bin`` files are NExT-GPT's flat state dict.
    """
    path = _fetch(reference, base_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _load_projectors(model, load_file(str(path)), path)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    converted = convert_nextgpt_state_dict(state, model)
    _load_projectors(model, converted["projectors"], path)
    _apply_nextgpt_llm(model, converted)
    logger.info("loaded NExT-GPT checkpoint %s", path)


def _fetch(reference: str, base_dir: Path | None) -> Path:
    local = Path(resolve_path(reference, base_dir))
    if local.is_file():
        return local
    if ":" in reference and not local.exists():
        repo, filename = reference.split(":", 1)
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # hub errors vary (offline, missing repo, auth); all mean "not here"
            raise WeightsNotFoundError(
                f"checkpoint {reference!r}: could not download {filename} from {repo} ({exc}); "
                f"download it yourself and set `checkpoint:` to the local file") from exc
    raise WeightsNotFoundError(f"checkpoint {reference!r}: no such file; set `checkpoint:` to a local "
                               f"file or to hub_id:filename")


# NExT-GPT ---------------------------------------------------------------------------------------
_NEXTGPT_OUTPUTS = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0.",
                    "audio": "gen_text_hidden_fcs_audio.0."}
_NEXTGPT_LLM = "llama_model.base_model.model."
_LORA = re.compile(r"^llama_model\.base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def convert_nextgpt_state_dict(state: dict[str, torch.Tensor], model: "AnyGPTModel") -> dict:
    """Map NExT-GPT's flat ``pytorch_model.pt`` to AnyGPT's names.

    Returns a dict with ``projectors`` (AnyGPT projector keys), ``embed_tokens``/``lm_head``
    (whole resized matrices, if present) and ``lora`` (``module path → (A, B)``).
    NExT-GPT uses one ``llama_proj`` for every input modality; it is copied to each.
    """
    from anygpt.projectors import LinearInputProjector

    projectors: dict[str, torch.Tensor] = {}
    for name, proj in model.input_projectors.items():
        if not (isinstance(proj, LinearInputProjector) and proj.num_tokens == 1):
            raise WeightsNotFoundError(
                f"NExT-GPT checkpoint: its input projector `llama_proj` is one Linear layer giving one "
                f"token, but modalities.{name}.input_projector is not; set it to "
                f"{{kind: linear, num_tokens: 1}} to load this checkpoint")
        for suffix in ("weight", "bias"):
            if f"llama_proj.{suffix}" in state:
                projectors[f"input_projectors.{name}.proj.{suffix}"] = state[f"llama_proj.{suffix}"]
    for name, prefix in _NEXTGPT_OUTPUTS.items():
        if name in model.output_projectors:
            projectors.update({f"output_projectors.{name}.{k[len(prefix):]}": v
                               for k, v in state.items() if k.startswith(prefix)})
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _LORA.match(key)
        if match:
            lora.setdefault(match.group(1), {})[match.group(2)] = value
    return {
        "projectors": projectors,
        "embed_tokens": state.get(_NEXTGPT_LLM + "model.embed_tokens.weight"),
        "lm_head": state.get(_NEXTGPT_LLM + "lm_head.weight"),
        "lora": {path: (ab["A"], ab["B"]) for path, ab in lora.items()},
    }


def _apply_nextgpt_llm(model: "AnyGPTModel", converted: dict, lora_scale: float = 1.0) -> None:
    """Copy the resized embedding matrices and merge LoRA (W += scale · B @ A; NExT-GPT used
    r = alpha = 32, so scale 1) into the LLM's weights."""
    llm = model.lm.model
    with torch.no_grad():
        for key, module in (("embed_tokens", llm.get_input_embeddings()), ("lm_head", llm.get_output_embeddings())):
            tensor = converted[key]
            if tensor is None:
                continue
            if tensor.shape != module.weight.shape:
                raise WeightsNotFoundError(
                    f"NExT-GPT checkpoint: {key} has shape {tuple(tensor.shape)} but the LLM's is "
                    f"{tuple(module.weight.shape)}; the preset's tokens must match the checkpoint's")
            module.weight.copy_(tensor.to(module.weight.dtype))
        modules = dict(llm.named_modules())
        for path, (a, b) in converted["lora"].items():
            if path not in modules:
                raise WeightsNotFoundError(f"NExT-GPT checkpoint: LoRA target {path!r} is not in the LLM")
            weight = modules[path].weight
            delta = (b.float() @ a.float()) * lora_scale  # (out, r) @ (r, in) -> (out, in)
            weight.add_(delta.to(weight.device, weight.dtype))

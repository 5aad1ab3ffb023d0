"""``anygpt convert nextgpt``: NExT-GPT's released checkpoint → a self-contained model directory.

    anygpt convert nextgpt pytorch_model.pt --base-llm ~/weights/vicuna-7b-v0 --out nextgpt-7b/

The checkpoint is checked against the architecture first, from configs alone and before the LLM
loads (every tensor and shape, the token ids of the signal tokens, read from NExT-GPT's saved
``added_tokens.json`` where there is one); then its projectors, embedding rows and merged LoRA are
written with the whole LLM and its tokenizer, so the directory needs neither the checkpoint nor the
base LLM again.
The encoder and pretrained decoders stay references (the ImageBind cache, hub ids): they are
neither loaded nor copied.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from anygpt.checkpoint import (check_nextgpt_checkpoint, check_replaceable, encoder_width, load_nextgpt_state,
                               save_model_directory)
from anygpt.config import AnyGPTConfig
from anygpt.errors import ConfigError
from anygpt.model import AnyGPTModel
from anygpt.pipeline import AnyGPTPipeline, resolve_config

logger = logging.getLogger(__name__)

__all__ = ["conversion_config", "convert_nextgpt"]


def convert_nextgpt(checkpoint: str | os.PathLike, base_llm: str | os.PathLike, out: str | os.PathLike, *,
                    preset: str | os.PathLike = "nextgpt-7b", lora_alpha: float | None = None,
                    lora_r: int | None = None, allow_unexpected: bool = False,
                    added_tokens: str | os.PathLike | None = None) -> Path:
    """Write NExT-GPT's ``pytorch_model.pt`` as a model directory ``AnyGPTPipeline.from_pretrained`` loads.

    Args:
        checkpoint: the ``pytorch_model.pt`` file, or ``hub_id:filename``.
        base_llm: the LLM the checkpoint was trained on (NExT-GPT: Vicuna-7B v0), a Hugging Face
            folder or hub id.
        out: the model directory to write (an existing model directory there is replaced).
        preset: the architecture: a preset name, config file or model directory.
        lora_alpha, lora_r: the LoRA hyper-parameters (default: a PEFT ``adapter_config.json``
            next to the checkpoint, else NExT-GPT's alpha 32; r is the tensors' rank).
        allow_unexpected: ignore (with a warning) tensors NExT-GPT's format does not have.
        added_tokens: NExT-GPT's saved ``added_tokens.json``, whose ids the embedding rows are read
            under (default: one next to the checkpoint or in its parent folder, else NExT-GPT's
            published ids).

    Returns:
        ``out``.

    Raises:
        WeightsNotFoundError: the checkpoint or base LLM cannot be had, or they do not fit the
            architecture (the message lists every missing, misshapen or unexpected tensor, or
            names the token that cannot be mapped; raised before the LLM loads), or the
            ``added_tokens.json`` does not fit the checkpoint.
        ConfigError: ``checkpoint`` is not in NExT-GPT's format, or ``out`` is another folder.
    """
    if Path(str(checkpoint).rsplit(":", 1)[-1]).suffix == ".safetensors":
        raise ConfigError(f"{checkpoint}: a .safetensors file is AnyGPT's own projector format, not NExT-GPT's "
                          f"pytorch_model.pt; name it as `checkpoint:` in a config instead")
    check_replaceable(Path(out))  # before minutes of loading, not after
    config, base_dir = conversion_config(preset, base_llm)
    options = dict(added_tokens=added_tokens, lora_alpha=lora_alpha, lora_r=lora_r, allow_unexpected=allow_unexpected)
    path, state = check_nextgpt_checkpoint(config, _absolute(checkpoint), base_dir, **options)
    logger.info("%s fits %s; building it with the LLM %s", path, config.name, config.llm.pretrained)
    model = AnyGPTModel.from_config(config, base_dir=base_dir, encoder=_encoder_stand_in(config))
    load_nextgpt_state(model, state, source=path, folder=path.parent, **options)
    logger.info("loaded NExT-GPT checkpoint %s", path)
    pipe = AnyGPTPipeline(model, base_dir=base_dir)
    # Decoders built from `arch` exist nowhere else, so they are written; pretrained ones are referenced.
    decoders = {m: pipe.decoder(m) for m in config.output_modalities
                if config.modalities[m].decoder.pretrained is None}
    logger.info("writing %s", out)
    return save_model_directory(model, Path(out), decoders=decoders, base_dir=base_dir, save_llm=True)


def conversion_config(preset: str | os.PathLike, base_llm: str | os.PathLike) -> tuple[AnyGPTConfig, Path | None]:
    """The architecture ``preset`` names with its LLM replaced by ``base_llm`` and no ``checkpoint``
    (the one converted is loaded explicitly), and the folder its relative paths resolve against."""
    config, base_dir = resolve_config(preset)
    data = config.to_dict()
    local = Path(base_llm).expanduser()
    data["checkpoint"] = None
    data["llm"].update(pretrained=str(local.resolve()) if local.exists() else str(base_llm),
                       arch=None, tokenizer=None, gguf_file=None, local_package=None)
    return AnyGPTConfig.from_dict(data), base_dir


def _absolute(reference: str | os.PathLike) -> str:
    """A local checkpoint path made absolute (it is the user's, not relative to the preset's
    folder); a ``hub_id:filename`` unchanged."""
    local = Path(reference).expanduser()
    return str(local.resolve()) if local.exists() else str(reference)


class _EncoderReference(nn.Module):
    """Stands in for an encoder the model directory only references: converting needs its
    width (for the input projectors), not its weights."""

    def __init__(self, output_dim: int):
        super().__init__()
        self.output_dim = output_dim


def _encoder_stand_in(config: AnyGPTConfig) -> nn.Module | None:
    """A stand-in for a pretrained ImageBind; None where the encoder must be built (random
    weights, saved whole)."""
    encoder = config.encoder
    if encoder.name != "imagebind" or encoder.pretrained is None:
        return None
    return _EncoderReference(encoder_width(encoder))

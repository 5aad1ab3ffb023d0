"""The composed model: frozen encoder → input projectors → LLM → output projectors.

Everything is keyed by modality name. Dimensions are read from the components: the input
projectors map the encoder's width to the LLM's, the output projectors map the LLM's width to
each decoder's conditioning shape.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from anygpt.config import AnyGPTConfig
from anygpt.llm import LanguageModel, PromptInputs, resolve_path
from anygpt.modalities import get_modality
from anygpt.projectors import OutputProjector, build_input_projector

logger = logging.getLogger(__name__)

__all__ = ["AnyGPTModel", "decoder_config"]


def decoder_config(config: AnyGPTConfig, modality: str, base_dir: Path | None = None):
    """The modality's decoder config with a relative ``pretrained`` path resolved against ``base_dir``."""
    dec = config.modalities[modality].decoder
    if dec.pretrained is not None:
        dec = dataclasses.replace(dec, pretrained=resolve_path(dec.pretrained, base_dir))
    return dec


class AnyGPTModel(nn.Module):
    """Encoder, projectors and LLM of one AnyGPT system (the decoders live in the pipeline).

    Build it with :meth:`from_config`; the trainable parts are ``input_projectors``,
    ``output_projectors`` and (in training) the LLM's signal-token rows or LoRA adapters.
    """

    def __init__(self, config: AnyGPTConfig, encoder: nn.Module, lm: LanguageModel,
                 input_projectors: nn.ModuleDict, output_projectors: nn.ModuleDict):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.lm = lm
        self.llm = lm.model  # registered so .to() and state_dict() reach it
        self.input_projectors = input_projectors
        self.output_projectors = output_projectors

    @classmethod
    def from_config(cls, config: AnyGPTConfig, base_dir: Path | None = None) -> "AnyGPTModel":
        """Build every component from ``config`` (relative paths resolve against ``base_dir``)."""
        import decoders
        from anygpt.encoders import build_encoder

        encoder = build_encoder(config.encoder, base_dir=base_dir)
        signal_tokens = {
            name: get_modality(name).signal_tokens(m.num_signal_tokens)
            for name, m in config.modalities.items() if m.has_output
        }
        lm = LanguageModel.from_config(config.llm, signal_tokens, base_dir=base_dir)
        torch.manual_seed(config.seed)
        inputs = nn.ModuleDict({
            name: build_input_projector(m.input_projector, encoder.output_dim, lm.hidden_size)
            for name, m in config.modalities.items() if m.has_input
        })
        outputs = nn.ModuleDict()
        for name in config.output_modalities:
            queries, width = decoders.condition_shape(decoder_config(config, name, base_dir))
            outputs[name] = OutputProjector(lm.hidden_size, queries, width,
                                            config.modalities[name].output_projector)
        model = cls(config, encoder, lm, inputs, outputs).eval()
        return model

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def num_media_tokens(self) -> dict[str, int]:
        """LLM positions each input modality's item takes."""
        return {name: p.num_tokens for name, p in self.input_projectors.items()}

    @torch.no_grad()
    def encode_media(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        """Encoder embeddings of a batch of preprocessed items: (B, ...) → (B, encoder_dim)."""
        spec = get_modality(modality)
        param = next(self.encoder.parameters())
        return self.encoder.encode(spec.encoder_input, batch.to(param.device, param.dtype))

    def project_media(self, modality: str, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, encoder_dim) → (B, num_tokens, llm_dim) in the LLM's dtype."""
        proj = self.input_projectors[modality]
        weight = next(proj.parameters())
        return proj(embeddings.to(weight.device, weight.dtype)).to(self.lm.dtype)

    def embed_prompt(self, prompt: PromptInputs, media_embeddings: list[torch.Tensor]) -> torch.Tensor:
        """The prompt's input embeddings with projected media in their slots.

        Args:
            prompt: tokenised prompt with media slots.
            media_embeddings: one encoder embedding (encoder_dim,) per ``prompt.media`` item.

        Returns:
            (1, L, llm_dim)
        """
        ids = prompt.input_ids.to(self.device)
        embeds = self.lm.embed(ids)  # (L, H)
        if prompt.media:
            parts = [self.project_media(ref.modality, emb[None])[0]  # (k, H)
                     for ref, emb in zip(prompt.media, media_embeddings)]
            embeds = embeds.masked_scatter(prompt.media_mask.to(self.device)[:, None],
                                           torch.cat(parts).to(embeds.dtype))
        return embeds[None]

    def project_signals(self, modality: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """Map a signal run's hidden states to the decoder's conditioning.

        Args:
            hidden_states: (B, S, llm_dim) last-layer states at the run's tokens.

        Returns:
            (B, Q, out_dim) in float32.
        """
        proj = self.output_projectors[modality]
        run_ids = torch.tensor(self.lm.signal_ids[modality], device=self.device)
        token_embeds = self.lm.embed(run_ids)[None].expand(hidden_states.shape[0], -1, -1)  # (B, S, H)
        weight = next(proj.parameters())
        cond = proj(hidden_states.to(weight.device, weight.dtype), token_embeds.to(weight.device, weight.dtype))
        return cond.float()

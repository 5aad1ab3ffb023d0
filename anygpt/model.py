"""The composed model: frozen encoder → input projectors → LLM → output projectors.

Everything is keyed by modality name. Dimensions are read from the components: the input
projectors map the encoder's width to the LLM's, the output projectors map the LLM's width to
each decoder's conditioning shape.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from anygpt.config import AnyGPTConfig, DecoderConfig
from anygpt.llm import LanguageModel, PromptInputs
from anygpt.modalities import get_modality
from anygpt.paths import resolve_path
from anygpt.projectors import OutputProjector, build_input_projector
from anygpt.seeding import seeded

logger = logging.getLogger(__name__)

__all__ = ["AnyGPTModel", "ModelOutput", "decoder_config", "build_projectors", "signal_tokens"]


@dataclass
class ModelOutput:
    """Result of :meth:`AnyGPTModel.forward`: LM loss (None without labels), last-layer hidden
    states (B, L, H) and logits (B, L, V)."""

    loss: Optional[torch.Tensor]
    hidden_states: torch.Tensor
    logits: torch.Tensor


def decoder_config(config: AnyGPTConfig, modality: str, base_dir: Path | None = None) -> DecoderConfig:
    """The modality's decoder config with a relative ``pretrained`` path resolved against
    ``base_dir`` (see :func:`anygpt.paths.resolve_path`)."""
    dec = config.modalities[modality].decoder
    if dec.pretrained is not None:
        dec = dataclasses.replace(dec, pretrained=resolve_path(dec.pretrained, base_dir))
    return dec


def signal_tokens(config: AnyGPTConfig) -> dict[str, list[str]]:
    """Output modality → the signal-token run the LLM gets for it under ``config``."""
    return {name: get_modality(name).signal_tokens(m.num_signal_tokens)
            for name, m in config.modalities.items() if m.has_output}


def build_projectors(config: AnyGPTConfig, encoder_dim: int, llm_dim: int,
                     base_dir: Path | None = None) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """The input and output projectors ``config`` describes, between an encoder of width
    ``encoder_dim`` and an LLM of hidden size ``llm_dim`` (built on the current default device:
    under ``torch.device("meta")`` they hold no memory)."""
    from anygpt import decoders

    inputs = nn.ModuleDict({name: build_input_projector(m.input_projector, encoder_dim, llm_dim)
                            for name, m in config.modalities.items() if m.has_input})
    outputs = nn.ModuleDict()
    for name in config.output_modalities:
        queries, width = decoders.condition_shape(decoder_config(config, name, base_dir))
        outputs[name] = OutputProjector(llm_dim, queries, width, config.modalities[name].output_projector)
    return inputs, outputs


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
    def from_config(cls, config: AnyGPTConfig, base_dir: Path | None = None,
                    encoder: nn.Module | None = None) -> "AnyGPTModel":
        """Build every component from ``config`` (relative paths resolve against ``base_dir``).

        ``encoder`` replaces the one ``config.encoder`` describes (it needs an ``output_dim``):
        a stand-in where only the LLM and projectors matter, as when converting a checkpoint.
        """
        from anygpt.encoders import build_encoder

        if encoder is None:
            encoder = build_encoder(config.encoder, base_dir=base_dir)
        lm = LanguageModel.from_config(config.llm, signal_tokens(config), base_dir=base_dir)
        # The projectors' random initialisation is seeded on a forked CPU generator, so building
        # a model leaves the caller's random state as it was.
        with seeded(config.seed):
            inputs, outputs = build_projectors(config, encoder.output_dim, lm.hidden_size, base_dir)
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

    @torch.no_grad()
    def encode_items(self, modality: str, values: Sequence[Any]) -> torch.Tensor:
        """Encoder embeddings of media items: preprocessed at the encoder's own geometry
        (``encoder.preprocess_options``), stacked and encoded in one batch.

        Args:
            modality: a registered modality name.
            values: paths or loaded values (``ModalitySpec.load``), at least one.

        Returns:
            (N, encoder_dim)
        """
        if not values:
            raise ValueError(f"encode_items needs at least one {modality} item, got none")
        spec = get_modality(modality)
        geometry = self.encoder.preprocess_options(spec.encoder_input)
        batch = torch.stack([spec.preprocess(value, **geometry) for value in values])
        return self.encode_media(modality, batch)

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
        items = [(ref.modality, emb) for ref, emb in zip(prompt.media, media_embeddings)]
        return self.embed_inputs(prompt.input_ids[None], prompt.media_mask[None], items)

    def embed_inputs(self, input_ids: torch.Tensor, media_mask: torch.Tensor,
                     media: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Token embeddings with projected media spliced into the media slots.

        Args:
            input_ids: (B, L) token ids (media slots hold a placeholder id).
            media_mask: (B, L) True at media slots.
            media: ``(modality, encoder embedding (encoder_dim,))`` per item, in slot order
                (row by row, left to right); each item fills its projector's ``num_tokens`` slots.

        Returns:
            (B, L, llm_dim); differentiable w.r.t. the input projectors and embedding rows.
        """
        ids = input_ids.to(self.device)
        embeds = self.lm.embed(ids)  # (B, L, H)
        if not media:
            return embeds
        projected: list[torch.Tensor | None] = [None] * len(media)
        for modality in dict.fromkeys(m for m, _ in media):  # one batch per modality
            index = [i for i, (m, _) in enumerate(media) if m == modality]
            out = self.project_media(modality, torch.stack([media[i][1] for i in index]))  # (N, k, H)
            for i, vectors in zip(index, out):
                projected[i] = vectors
        slots = torch.cat(projected).to(embeds.dtype)  # (sum of k, H)
        return embeds.masked_scatter(media_mask.to(self.device)[..., None], slots)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                media_mask: torch.Tensor | None = None, media: Sequence[tuple[str, torch.Tensor]] = (),
                labels: torch.Tensor | None = None) -> ModelOutput:
        """A teacher-forced pass (training and evaluation).

        Args:
            input_ids, attention_mask, media_mask, labels: (B, L); labels are -100 where no loss.
            media: see :meth:`embed_inputs`.

        Returns:
            :class:`ModelOutput` with the LM loss (if ``labels``) and last-layer hidden states.
        """
        if media_mask is None:
            media_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        embeds = self.embed_inputs(input_ids, media_mask, media)
        out = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask,
                            labels=None if labels is None else labels.to(self.device),
                            output_hidden_states=True)
        return ModelOutput(loss=out.loss, hidden_states=out.hidden_states[-1], logits=out.logits)

    def signal_states(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, modality: str) -> torch.Tensor:
        """The hidden states of every ``modality`` signal run in a batch.

        Args:
            hidden_states: (B, L, H) from :meth:`forward`.
            input_ids: (B, L).

        Returns:
            (R, S, H): one row per run, in batch then position order.

        Raises:
            ValueError: a run in ``input_ids`` is incomplete.
        """
        run = torch.tensor(self.lm.signal_ids[modality], device=input_ids.device)
        rows, starts = (input_ids == run[0]).nonzero(as_tuple=True)
        positions = starts[:, None] + torch.arange(len(run), device=input_ids.device)  # (R, S)
        if positions.numel() and (positions.max() >= input_ids.shape[1]
                                  or not torch.equal(input_ids[rows[:, None], positions], run.expand_as(positions))):
            raise ValueError(f"an incomplete {modality} signal run in the batch; runs must hold all "
                             f"{len(run)} tokens in order")
        return hidden_states[rows.to(hidden_states.device)[:, None], positions.to(hidden_states.device)]

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

"""Input projectors (encoder embedding → LLM input vectors) and output projectors
(LLM signal states → a decoder's text conditioning).

The output projector keeps NExT-GPT's module names (``fc``, ``tfm``, ``query_embs``, ``model``)
so the public checkpoint's ``gen_text_hidden_fcs*.0.*`` tensors load by renaming a prefix.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from anygpt.config import InputProjectorConfig, OutputProjectorConfig
from anygpt.registry import Registry

__all__ = ["INPUT_PROJECTORS", "LinearInputProjector", "MLPInputProjector", "OutputProjector",
           "build_input_projector"]

INPUT_PROJECTORS: Registry[type] = Registry("input projector kind")


@INPUT_PROJECTORS.register("linear")
class LinearInputProjector(nn.Module):
    """One linear map from an encoder embedding to ``num_tokens`` LLM vectors (NExT-GPT's
    ``llama_proj`` when ``num_tokens`` is 1)."""

    def __init__(self, in_dim: int, out_dim: int, config: InputProjectorConfig):
        super().__init__()
        self.num_tokens, self.out_dim = config.num_tokens, out_dim
        self.proj = nn.Linear(in_dim, out_dim * config.num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, in_dim) -> (B, num_tokens, out_dim)
        return self.proj(x).view(x.shape[0], self.num_tokens, self.out_dim)


@INPUT_PROJECTORS.register("mlp")
class MLPInputProjector(nn.Module):
    """Two-layer GELU MLP from an encoder embedding to ``num_tokens`` LLM vectors."""

    def __init__(self, in_dim: int, out_dim: int, config: InputProjectorConfig):
        super().__init__()
        self.num_tokens, self.out_dim = config.num_tokens, out_dim
        hidden = config.hidden_dim or out_dim
        self.proj = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim * config.num_tokens)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, in_dim) -> (B, num_tokens, out_dim)
        return self.proj(x).view(x.shape[0], self.num_tokens, self.out_dim)


def build_input_projector(config: InputProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The input projector of ``config.kind``; the error lists the valid kinds."""
    return INPUT_PROJECTORS.get(config.kind)(in_dim, out_dim, config)


class OutputProjector(nn.Module):
    """NExT-GPT's output projector.

    The signal run's last-layer hidden states plus the signal tokens' input embeddings go
    through ``fc`` into a Transformer as its source sequence; ``num_queries`` learned queries are
    its target; ``model`` maps the result to the decoder's conditioning width.

    Args:
        llm_dim: the LLM's hidden size.
        num_queries, out_dim: the decoder's conditioning shape (e.g. 77 × 768 for SD-1.5).
        config: the Transformer's sizes.
    """

    def __init__(self, llm_dim: int, num_queries: int, out_dim: int, config: OutputProjectorConfig):
        super().__init__()
        self.num_queries, self.out_dim = num_queries, out_dim
        self.fc = nn.Linear(llm_dim, config.d_model)
        with warnings.catch_warnings():
            # norm_first layers cannot use the nested-tensor fast path; torch warns at build time.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.tfm = self._transformer(config)
        self.query_embs = nn.Parameter(torch.randn(1, num_queries, config.d_model))
        self.model = nn.Linear(config.d_model, out_dim)

    @staticmethod
    def _transformer(config: OutputProjectorConfig) -> nn.Transformer:
        return nn.Transformer(
            d_model=config.d_model,
            nhead=config.num_heads,
            num_encoder_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )

    def forward(self, hidden_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """Map signal states to conditioning.

        Args:
            hidden_states: (B, S, llm_dim) last-layer states at the signal tokens.
            token_embeddings: (B, S, llm_dim) the signal tokens' input embeddings.

        Returns:
            (B, num_queries, out_dim)
        """
        src = self.fc(hidden_states + token_embeddings)  # (B, S, d_model)
        tgt = self.query_embs.expand(src.shape[0], -1, -1).to(src.dtype)  # (B, Q, d_model)
        return self.model(self.tfm(src, tgt))  # (B, Q, out_dim)

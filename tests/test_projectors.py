"""Projector shapes, registry errors and NExT-GPT's parameter names."""

import pytest
import torch

from anygpt.config import InputProjectorConfig, OutputProjectorConfig
from anygpt.errors import UnknownNameError
from anygpt.projectors import OutputProjector, build_input_projector


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_input_projector_shapes(kind):
    proj = build_input_projector(InputProjectorConfig(kind=kind, num_tokens=3), in_dim=16, out_dim=8)
    assert proj(torch.randn(5, 16)).shape == (5, 3, 8)


def test_unknown_input_projector_lists_kinds():
    with pytest.raises(UnknownNameError, match="valid names: linear, mlp"):
        build_input_projector(InputProjectorConfig(kind="qformer"), 16, 8)


def test_output_projector_shape_and_nextgpt_names():
    cfg = OutputProjectorConfig(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64)
    proj = OutputProjector(llm_dim=48, num_queries=77, out_dim=24, config=cfg)
    out = proj(torch.randn(2, 4, 48), torch.randn(2, 4, 48))
    assert out.shape == (2, 77, 24)
    names = set(proj.state_dict())
    assert {"fc.weight", "query_embs", "model.weight", "tfm.encoder.layers.0.self_attn.in_proj_weight",
            "tfm.decoder.layers.0.multihead_attn.in_proj_weight"} <= names
    assert proj.query_embs.shape == (1, 77, 32)


def test_output_projector_uses_hidden_plus_token_embedding():
    cfg = OutputProjectorConfig(d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
    proj = OutputProjector(8, 2, 4, cfg).eval()
    h, e = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    torch.testing.assert_close(proj(h, e), proj(h + e, torch.zeros_like(e)))

"""The LLM quantized with torchao (weight-only int8) loads, keeps AnyGPT's rows in full
precision and answers like the unquantized model."""

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from anygpt.config import CONFIG_FILENAME, AnyGPTConfig, preset_file
from anygpt.errors import ConfigError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                reason="torchao is not installed (`pip install -e '.[quant]'`; CI installs it)")


def _quantized_copy(tmp_path: Path, name: str, quantization: dict) -> Path:
    """The preset's model folder, linked file by file, with ``llm.quantization`` set."""
    source = preset_file(name)
    folder = tmp_path / f"{name}-q"
    folder.mkdir()
    if source.name == CONFIG_FILENAME:  # a model directory preset (mini)
        for item in source.parent.iterdir():
            if item.name != CONFIG_FILENAME:
                (folder / item.name).symlink_to(item)
    data = yaml.safe_load(source.read_text())
    data["llm"]["quantization"] = quantization
    (folder / CONFIG_FILENAME).write_text(yaml.safe_dump(data))
    return folder


def test_quantization_settings_are_checked():
    data = AnyGPTConfig.from_name("tiny").to_dict()
    for bad, field in (({"bits": 3}, "bits"), ({"backend": "gptq"}, "backend"), ({"group_size": 7}, "group_size")):
        data["llm"]["quantization"] = bad
        with pytest.raises(ConfigError, match=f"llm.quantization.{field}"):
            AnyGPTConfig.from_dict(data)


def test_an_int8_tiny_model_matches_the_full_precision_one(tiny_pipe, tmp_path):
    from anygpt import AnyGPTPipeline
    from torchao.utils import TorchAOBaseTensor

    pipe = AnyGPTPipeline.from_pretrained(_quantized_copy(tmp_path, "tiny", {"bits": 8}))
    lm = pipe.model.lm.model
    linear = [m for m in lm.modules() if isinstance(m, torch.nn.Linear) and m is not lm.get_output_embeddings()]
    assert linear and all(isinstance(m.weight, TorchAOBaseTensor) for m in linear)
    assert not isinstance(lm.get_input_embeddings().weight, TorchAOBaseTensor)  # the signal rows stay exact
    prompt = tiny_pipe.model.lm.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        full, quantized = tiny_pipe.model.lm.model(prompt).logits, lm(prompt).logits
    # int8 per-channel weights: logits agree to a small fraction of their spread.
    assert (full - quantized).abs().max() < 0.05 * full.std()
    out = pipe("draw it", outputs=("image",), seed=0, max_new_tokens=4, steps=2)
    assert out.images  # the whole path runs on quantized weights


def test_an_int8_mini_answers_on_cpu(mini_pipe, tmp_path):
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained(_quantized_copy(tmp_path, "mini", {"bits": 8}))
    settings = {"do_sample": False, "max_new_tokens": 12, "seed": 0}
    answer = pipe("What is the capital of France?", **settings).text
    assert "Paris" in answer
    assert answer == mini_pipe("What is the capital of France?", **settings).text

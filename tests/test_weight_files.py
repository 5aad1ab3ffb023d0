"""Corrupt, foreign or malicious weight files and impossible config sizes give AnyGPT's own
errors, naming the file (or config key); payloads in pickles never run."""

import json
import os
import pickle
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from anygpt import AnyGPTPipeline
from anygpt.cli import main
from anygpt.errors import ConfigError, WeightsNotFoundError

pytestmark = pytest.mark.filterwarnings("ignore")

WEIGHT_FILES = ["projectors.safetensors", "encoder.safetensors", "llm/model.safetensors"]


class Payload:
    """A pickle that would write a marker file when unpickled."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved(tiny_pipe, tmp_path_factory):
    return tiny_pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def model_dir(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model")


def corrupt(path, kind, marker):
    data = path.read_bytes()
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        Payload.marker = marker
        path.write_bytes(pickle.dumps({"weight": Payload()}))
    else:
        state = load_file(str(path))
        key = sorted(state)[0]
        if kind == "wrong-shape":
            state[key] = torch.zeros(*(s + 1 for s in state[key].shape))
        else:
            del state[key]
        save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["random", "truncated", "pickle", "wrong-shape", "missing"])
@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_bad_weight_file_is_named(model_dir, tmp_path, name, kind):
    marker = tmp_path / "payload-ran"
    corrupt(model_dir / name, kind, marker)
    with pytest.raises(WeightsNotFoundError) as info:
        AnyGPTPipeline.from_pretrained(model_dir)
    message = str(info.value)
    assert str(model_dir / name) in message
    assert info.value.__cause__ is not None or kind in ("wrong-shape", "missing")
    expected = {"random": "not a safetensors file", "truncated": "truncated", "pickle": "pickle",
                "wrong-shape": "in the file, the model expects", "missing": "tensor"}[kind]
    assert expected in message
    assert "re-" in message or "save" in message.lower()  # says how to fix it
    assert not marker.exists()


def test_bad_decoder_weights_are_named(model_dir):
    unet = model_dir / "decoders/image/unet/diffusion_pytorch_model.safetensors"
    corrupt(unet, "wrong-shape", None)
    pipe = AnyGPTPipeline.from_pretrained(model_dir)
    with pytest.raises(WeightsNotFoundError, match="in the file, the model expects") as info:
        pipe.decoder("image")
    assert str(unet) in str(info.value)
    unet.write_bytes(os.urandom(1000))
    with pytest.raises(WeightsNotFoundError, match="not a safetensors file") as info:
        AnyGPTPipeline.from_pretrained(model_dir).decoder("image")
    assert str(unet) in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickle_checkpoint_with_payload_is_refused(model_dir, tmp_path, suffix):
    marker = tmp_path / "payload-ran"
    Payload.marker = marker
    checkpoint = tmp_path / f"pytorch_model{suffix}"
    torch.save({"weight": Payload()}, checkpoint)
    config = yaml.safe_load((model_dir / "anygpt_config.yaml").read_text())
    config["checkpoint"] = str(checkpoint)
    (model_dir / "anygpt_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(WeightsNotFoundError, match="needs code to run") as info:
        AnyGPTPipeline.from_pretrained(model_dir)
    assert str(checkpoint) in str(info.value) and info.value.__cause__ is not None
    assert not marker.exists()


def test_random_encoder_pth_is_named(tmp_path):
    from anygpt.config import EncoderConfig
    from anygpt.encoders import build_encoder

    path = tmp_path / "encoder.pth"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(WeightsNotFoundError, match="encoder.pth"):
        build_encoder(EncoderConfig(pretrained=str(path), arch={"out_embed_dim": 16}))


def test_any_random_bytes_named_pth_are_reported_as_a_corrupt_file(tmp_path):
    # Random bytes behind a pickle header reach torch's weights-only unpickler, which then fails
    # in many ways (IndexError and KeyError among them); each must come out as the one error.
    import random

    from anygpt.weightfiles import read_torch_file

    rng, path = random.Random(0), tmp_path / "weights.pth"
    for _ in range(300):
        path.write_bytes(b"\x80\x02" + rng.randbytes(rng.choice([16, 64, 512])))
        with pytest.raises(WeightsNotFoundError, match="weights.pth"):
            read_torch_file(path)


@pytest.mark.parametrize("key, value", [("hidden_size", -1), ("hidden_size", 66), ("num_attention_heads", 0),
                                        ("num_hidden_layers", -2)])
def test_impossible_llm_config_json(model_dir, key, value):
    path = model_dir / "llm/config.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=key) as info:
        AnyGPTPipeline.from_pretrained(model_dir)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("section, key, value", [("llm", "hidden_size", -4), ("llm", "hidden_size", 66),
                                                 ("llm", "num_attention_heads", 0),
                                                 ("llm", "intermediate_size", 0),
                                                 ("encoder", "vision_embed_dim", -1),
                                                 ("encoder", "out_embed_dim", 0)])
def test_impossible_arch_in_config(tmp_path, section, key, value):
    from anygpt.config import PRESET_DIR

    config = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    config[section]["arch"][key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=f"{section}.arch") as info:
        AnyGPTPipeline.from_pretrained(path)
    assert key in str(info.value)


def test_cli_prints_one_error_line(model_dir, capsys):
    (model_dir / "projectors.safetensors").write_bytes(os.urandom(4096))
    assert main(["generate", "--model", str(model_dir), "hi", "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    err = errors[0]
    assert "projectors.safetensors" in err and "not a safetensors file" in err

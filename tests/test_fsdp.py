"""FSDP (``train.engine: fsdp``, alignment/fsdp.py): a 2-process gloo run on CPU that trains,
checkpoints whole tensors, and resumes exactly on one process; and the engine's config errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anygpt.errors import ConfigError

from anygpt.alignment.config import CONFIG_DIR, load_train_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["train.max_steps=6", "train.batch_size=4", "checkpoint.every=3", "checkpoint.keep=2", "eval.every=3",
         "log.progress_bar=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from anygpt.alignment.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=96, num_val=24, seed=0)


def _overrides(output: Path, data: dict[str, Path]) -> list[str]:
    return ["model=tiny", f"output_dir={output}", f"data.train={data['captions_train']}",
            f"data.val={data['captions_val']}", "train.engine=fsdp", *STEPS]


def _launch_two_processes(output: Path, data: dict[str, Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "anygpt.cli", "train", "--config", str(CONFIG_DIR / "stage2_decoding.yaml"),
               *_overrides(output, data)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _checkpoint(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"checkpoint-{step:08d}"


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "trainable.safetensors")


def _optimizer(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.bin", weights_only=False)


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, values in a["state"].items():
        assert values.keys() == b["state"][index].keys()
        for key, value in values.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


@pytest.mark.slow
def test_two_process_fsdp_run_trains_checkpoints_and_resumes_exactly_on_one_process(data, tmp_path):
    from anygpt import AnyGPTPipeline
    from anygpt.alignment.recipe import train

    two = tmp_path / "two"
    done = _launch_two_processes(two, data)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "FSDP: 119 trainable tensors" in log and "sharded over 2 processes (cpu)" in log
    assert "trained 6 steps" in done.stdout
    third, sixth = _checkpoint(two, 3), _checkpoint(two, 6)
    assert json.loads((sixth / "train_state.json").read_text())["num_processes"] == 2

    # Whole tensors, in a single process's layout: every moment has its parameter's full shape.
    weights, optimizer = _weights(sixth), _optimizer(sixth)
    moments = sorted(tuple(s["exp_avg"].shape) for s in optimizer["state"].values())
    assert moments == sorted(tuple(w.shape) for w in weights.values())
    assert any(not torch.equal(weights[k], v) for k, v in _weights(third).items())  # it trained

    # The step-3 checkpoint, alone, resumed on this one process.
    one = tmp_path / "one"
    shutil.copytree(two, one, ignore=shutil.ignore_patterns(sixth.name, "model"))
    config = load_train_config(CONFIG_DIR / "stage2_decoding.yaml", _overrides(one, data))
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) × train.grad_accum=1 × train.batch_size=4"
                                          r".*set train.grad_accum=2"):
        train(config, resume=True)
    config = load_train_config(CONFIG_DIR / "stage2_decoding.yaml", [*_overrides(one, data), "train.grad_accum=2"])
    resumed = train(config, resume=True)
    assert resumed.step == 6

    # Exactly where the two processes went: bitwise the same weights and optimizer state.
    again = _weights(_checkpoint(one, 6))
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    _assert_same_optimizer(_optimizer(_checkpoint(one, 6)), optimizer)

    # The 2-process model holds the released (whole) weights, as does the resumed one.
    models = [AnyGPTPipeline.from_pretrained(d / "model").model for d in (two, one)]
    for name, value in weights.items():
        if name.startswith("output_projectors."):
            assert all(torch.equal(m.state_dict()[name], value) for m in models), name
    assert torch.equal(models[0].lm.model.get_input_embeddings().weight,
                       models[1].lm.model.get_input_embeddings().weight)


def test_the_engine_is_validated():
    with pytest.raises(ConfigError, match="config.train.engine: must be one of accelerate, fsdp"):
        load_train_config(CONFIG_DIR / "stage2_decoding.yaml", ["train.engine=zero"])


@pytest.mark.parametrize("kind, engine, message", [
    ("FSDP", "accelerate", "accelerate's own FSDP .* launch with --config_file alignment/configs/accelerate_fsdp.yaml"),
    ("DEEPSPEED", "fsdp", "train.engine=fsdp with a DeepSpeed accelerate config: pick one"),
])
def test_launches_that_fight_the_engine_are_refused(kind, engine, message):
    from accelerate.utils import DistributedType

    from anygpt.alignment.fsdp import check_engine

    with pytest.raises(ConfigError, match=message):
        check_engine(engine, SimpleNamespace(distributed_type=DistributedType[kind]))
    check_engine(engine, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # plain is fine


def test_accelerate_fsdp_config_is_a_plain_multi_process_launch():
    import yaml

    config = yaml.safe_load((CONFIG_DIR / "accelerate_fsdp.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] > 1

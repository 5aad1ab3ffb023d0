"""Training faults end in errors that name the problem: a full disk, a folder without write
permission or on a read-only disk, a corrupt checkpoint file on resume; and the output folder is
checked before training starts. Earlier checkpoints stay intact every time.

One stage-1 run on the `tiny` preset (4 steps, checkpoints at 2 and 4) is trained once; each
test works on a copy of it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from anygpt.errors import CheckpointError, ConfigError

from anygpt.alignment.checkpointing import checkpoint_bytes, checkpoint_problem, latest_checkpoint
from anygpt.alignment.config import CONFIG_DIR, TrainConfig, load_train_config

TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch 2.x, verbatim
SAFETENSORS_DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _config(output: Path, data: dict[str, Path], *overrides: str) -> TrainConfig:
    base = ["model=tiny", f"output_dir={output}", "log.progress_bar=false", "eval.every=0", "data.val=null",
            "checkpoint.every=2", "train.batch_size=2", "train.max_steps=4", f"data.train={data['captions_train']}"]
    return load_train_config(CONFIG_DIR / "stage1_encoding.yaml", [*base, *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from anygpt.alignment.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=4, seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """The output folder of a finished 4-step run with checkpoint-00000002 and checkpoint-00000004."""
    from anygpt.alignment.recipe import train

    output = tmp_path_factory.mktemp("trained") / "run"
    train(_config(output, data))
    return output


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run's output folder."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"checkpoint-{step:08d}"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _assert_intact(run: Path, before: dict[int, dict[str, str]]) -> None:
    """The checkpoints are exactly those of ``before``, byte for byte, and no partial one is left."""
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert folders == [f"checkpoint-{s:08d}" for s in sorted(before)]
    for step, digest in before.items():
        assert _digest(_checkpoint(run, step)) == digest
        assert checkpoint_problem(_checkpoint(run, step)) is None
    assert latest_checkpoint(run / "checkpoints") == _checkpoint(run, max(before))


# Saving -------------------------------------------------------------------------------------------


def _failing_write(error: BaseException):
    """A torch.save / save_file stand-in that writes a few bytes, then fails like a full disk."""
    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise error
    return write


@pytest.mark.parametrize("target, error, words", [
    ("torch.save", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left on the disk holding"),
    ("torch.save", RuntimeError(TORCH_DISK_FULL), "most likely for lack of space on the disk holding"),
    ("safetensors.torch.save_file", RuntimeError(SAFETENSORS_DISK_FULL), "no space left on the disk holding"),
    ("torch.save", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "the disk quota is exhausted on the disk"),
    ("torch.save", OSError(errno.EROFS, os.strerror(errno.EROFS)), "is on a read-only file system"),
    ("torch.save", PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "permission denied in"),
], ids=["ENOSPC", "torch-inline-container", "safetensors", "EDQUOT", "EROFS", "EACCES"])
def test_a_failed_checkpoint_write_names_the_folder_and_the_remedy(run, data, monkeypatch, target, error, words):
    from anygpt.alignment.recipe import train

    before = {s: _digest(_checkpoint(run, s)) for s in (2, 4)}
    monkeypatch.setattr(target, _failing_write(error))
    with pytest.raises(CheckpointError) as info:
        train(_config(run, data, "train.max_steps=6"), resume=True)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {_checkpoint(run, 6)}: ") and words in message
    assert str(run / "checkpoints") in message and "output_dir=" in message and "--resume" in message
    if "disk" in words:
        assert "free some space there" in message and " free (" in message
    assert info.value.errno == (getattr(error, "errno", None) or errno.ENOSPC)
    assert isinstance(info.value.__cause__, type(error))
    _assert_intact(run, before)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_is_named(run, data):
    from anygpt.alignment.recipe import train

    before = {s: _digest(_checkpoint(run, s)) for s in (2, 4)}
    (run / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*checkpoint-00000006: permission denied "
                                                  r"in .*checkpoints.*make it writable"):
            train(_config(run, data, "train.max_steps=6"), resume=True)
    finally:
        (run / "checkpoints").chmod(0o755)
    _assert_intact(run, before)


def test_other_write_errors_pass_through_unchanged(run, data, monkeypatch):
    from anygpt.alignment.recipe import train

    before = {s: _digest(_checkpoint(run, s)) for s in (2, 4)}
    monkeypatch.setattr("torch.save", _failing_write(ValueError("a bug, not the disk")))
    with pytest.raises(ValueError, match="a bug, not the disk"):
        train(_config(run, data, "train.max_steps=6"), resume=True)
    _assert_intact(run, before)


def test_a_full_disk_while_saving_the_trained_model_is_named(run, data, monkeypatch):
    from anygpt.alignment.recipe import train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    shutil.rmtree(run / "model")
    monkeypatch.setattr("anygpt.checkpoint.save_model_directory", full)
    with pytest.raises(CheckpointError, match=rf"cannot write the trained model {run / 'model'}: no space left on "
                                              rf"the disk holding {run}, "):
        train(_config(run, data), resume=True)  # step 4 of 4: straight to the final save
    assert not (run / "model").exists()


# Resuming ---------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scribble(path: Path) -> None:
    path.write_bytes(b"\xde\xad\xbe\xef" * 16 + path.read_bytes()[64:])


@pytest.mark.parametrize("name, damage, problem", [
    ("trainable.safetensors", _truncate, "trainable weights: the file is corrupt or truncated"),
    ("trainable.safetensors", _scribble, "trainable weights: the file is not a safetensors file"),
    ("optimizer.bin", _truncate, "optimizer state: the file is corrupt or truncated"),
    ("optimizer.bin", _scribble, "optimizer state: the file is not a torch state dict"),
    ("scheduler.bin", _truncate, "scheduler state: the file is corrupt or truncated"),
    ("random_states_0.pkl", _truncate, "random-number-generator state: the file is corrupt or truncated"),
    ("train_state.json", _truncate, "train state: the file is corrupt or truncated, not JSON"),
    ("optimizer.bin", Path.unlink, "optimizer.bin"),
])
def test_a_corrupt_checkpoint_names_the_file_and_the_last_good_one(run, data, name, damage, problem):
    from anygpt.alignment.recipe import train

    good, bad = _checkpoint(run, 2), _checkpoint(run, 4)
    before = _digest(good)
    damage(bad / name)
    with pytest.raises(CheckpointError) as info:
        train(_config(run, data, "train.max_steps=6"), resume=True)
    message = str(info.value)
    assert message.startswith(f"cannot resume from {bad.name}: ")
    assert str(bad / name) in message and problem in message
    assert f"The last good checkpoint is {good}: resume from it with --resume-from {good}" in message
    assert f"or delete {bad} so that --resume picks it" in message
    assert _digest(good) == before

    result = train(_config(run, data, "train.max_steps=6"), resume=good)  # doing as the message says
    assert result.step == 6 and checkpoint_problem(_checkpoint(run, 6)) is None


def test_no_good_checkpoint_says_to_train_without_resume(run, data):
    from anygpt.alignment.recipe import train

    for step in (2, 4):
        _truncate(_checkpoint(run, step) / "trainable.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot resume from checkpoint-00000004: .*trainable.safetensors: "
                                              r".*No earlier checkpoint under .*checkpoints loads either: train "
                                              r"without --resume"):
        train(_config(run, data), resume=True)


def test_resume_from_a_missing_folder_lists_the_checkpoints(run, data):
    from anygpt.alignment.recipe import train

    with pytest.raises(ConfigError, match=r"--resume-from: no checkpoint folder .*checkpoint-00000003; checkpoints "
                                          r"under .*: checkpoint-00000002, checkpoint-00000004"):
        train(_config(run, data), resume=_checkpoint(run, 3))


def test_cli_resume_from_names_a_checkpoint(run, data, capsys):
    from anygpt.cli import main

    overrides = ["model=tiny", f"output_dir={run}", "log.progress_bar=false", "data.val=null", "checkpoint.every=2",
                 "train.batch_size=2", "train.max_steps=6", f"data.train={data['captions_train']}"]
    config = str(CONFIG_DIR / "stage1_encoding.yaml")
    _truncate(_checkpoint(run, 4) / "optimizer.bin")
    assert main(["train", "--config", config, "--resume", *overrides]) == 2
    assert f"--resume-from {_checkpoint(run, 2)}" in capsys.readouterr().err
    assert main(["train", "--config", config, "--resume-from", str(_checkpoint(run, 2)), *overrides]) == 0
    assert "trained 6 steps" in capsys.readouterr().out


# The check before training ------------------------------------------------------------------------

_Usage = namedtuple("_Usage", "total used free")


def test_no_room_for_one_checkpoint_is_refused_before_training(data, tmp_path, monkeypatch):
    from anygpt.alignment.recipe import train

    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(10**9, 10**9 - 1000, 1000))
    output = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"output_dir {output}: one checkpoint needs about [\d.]+ [KM]iB "
                                          rf"\([\d,]+ bytes\), but the disk holding it has 1,000 bytes free; free "
                                          rf"some space, set output_dir= .*or set checkpoint.every=0"):
        train(_config(output, data))
    assert not (output / "checkpoints").exists()
    train(_config(output, data, "checkpoint.every=0", "train.max_steps=1"))  # no checkpoints: no room needed


def test_the_checkpoint_estimate_covers_a_real_checkpoint(trained, tiny_pipe):
    """Before the first step (no optimizer state yet), the estimate predicts the tensors a saved
    checkpoint of the same run holds, and covers all of its files."""
    import copy

    from anygpt.alignment.checkpointing import _CHECKPOINT_OVERHEAD
    from anygpt.alignment.recipe import build_optimizer
    from anygpt.alignment.trainable import configure_trainable
    from anygpt.weightfiles import read_safetensors, read_torch_file

    config = load_train_config(trained / "train_config.yaml")
    trainable = configure_trainable(copy.deepcopy(tiny_pipe.model), config.trainable, seed=config.seed)
    estimate = checkpoint_bytes(trainable, build_optimizer(trainable, config))
    saved = _checkpoint(trained, 4)
    tensors = [*read_safetensors(saved / "trainable.safetensors").values(),
               *(v for s in read_torch_file(saved / "optimizer.bin")["state"].values() for v in s.values())]
    payload = sum(t.numel() * t.element_size() for t in tensors)
    assert abs(payload - (estimate - _CHECKPOINT_OVERHEAD)) <= 0.01 * payload
    assert sum(p.stat().st_size for p in saved.iterdir()) <= estimate


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_folder_is_refused_first(data, tmp_path, monkeypatch, code):
    from anygpt.alignment import recipe

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    loaded = []
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    monkeypatch.setattr(recipe, "_load_pipeline", lambda *a: loaded.append(1))
    with pytest.raises(ConfigError, match=rf"output_dir {tmp_path / 'run'}: cannot write there "
                                          rf"\({os.strerror(code)}\); make it writable, or set output_dir="):
        recipe.train(_config(tmp_path / "run", data))
    assert not loaded  # refused before the model is loaded


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_first(data, tmp_path):
    from anygpt.alignment.recipe import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run").chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"output_dir .*run: cannot write there \(Permission denied\)"):
            train(_config(tmp_path / "run", data))
    finally:
        (tmp_path / "run").chmod(0o755)


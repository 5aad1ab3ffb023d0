"""How AnyGPT installs and runs from outside the repository.

* the wheel holds one top-level package, ``anygpt``, with every module and data file;
* a user's own ``app.py`` in the current folder cannot shadow the chat app;
* a training config's relative paths resolve against the config file, whatever the current
  directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from test_layers import library_modules, package_dirs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the sources (the build leaves no files in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in {p.relative_to(ROOT).parts[0] for p in package_dirs(ROOT).values()}:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, env=ENV, capture_output=True)
    (path,) = out.glob("anygpt-*.whl")
    return zipfile.ZipFile(path)


@pytest.mark.slow
def test_the_wheel_installs_only_the_anygpt_package(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"anygpt"}


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_data_file(wheel):
    names = set(wheel.namelist())
    modules = {module.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
               for module, path in library_modules(ROOT).items()}
    assert modules - names == set()
    presets = ROOT / "anygpt" / "presets"  # YAML presets and model-directory presets (the trained mini)
    data = {f"anygpt/presets/{p.relative_to(presets).as_posix()}" for p in presets.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    data |= {f"anygpt/alignment/configs/{p.name}" for p in (ROOT / "alignment" / "configs").iterdir()}
    assert data - names == set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_app_starts_in_a_folder_that_holds_a_users_app_py(tmp_path):
    (tmp_path / "app.py").write_text("raise SystemExit('the user app.py was imported')\n")
    port = _free_port()
    command = [sys.executable, "-m", "anygpt", "app", "--preset", "tiny", "--port", str(port),
               "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    assert response.status == 200
                    return
            except OSError:
                time.sleep(0.5)
        output = process.stdout.read().decode() if process.poll() is not None else "(still starting)"
        pytest.fail(f"the app did not start: {output[-2000:]}")
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_a_stage_config_runs_from_any_directory(tmp_path, tiny_pipe):
    """The shipped stage-2 config, copied as-is, run from / with only numeric overrides."""
    from anygpt.alignment.synthetic import make_synthetic_dataset

    configs = tmp_path / "alignment" / "configs"
    configs.mkdir(parents=True)
    shutil.copy(ROOT / "alignment" / "configs" / "stage2_decoding.yaml", configs)
    make_synthetic_dataset(tmp_path / "data" / "synthetic", num_train=6, num_val=3)
    tiny_pipe.save_pretrained(tmp_path / "runs" / "stage1_encoding" / "model")
    overrides = ["train.max_steps=2", "train.batch_size=2", "eval.every=0", "checkpoint.every=0",
                 "log.progress_bar=false", "log.trackers=[csv]"]
    result = subprocess.run([sys.executable, "-m", "anygpt", "train", "--config",
                             str(configs / "stage2_decoding.yaml"), *overrides],
                            cwd="/", env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "stage2_decoding" / "model" / "anygpt_config.yaml").is_file()
    assert not Path("/runs").exists()

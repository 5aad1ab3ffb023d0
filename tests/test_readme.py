"""The README's code blocks run as written.

Every fenced ``python`` and ``bash`` block is run, each test in a fresh temporary working
directory holding the files the examples name (``cat.jpg``, ``cat.png``, ``a.png``, ``b.wav``,
``clip.mp4``, written by :func:`anygpt.testing.write_sample_media`), offline, with the ``anygpt``
and ``python`` of this interpreter first on ``PATH``. Python blocks run in this process, bash
blocks with ``bash -e``. ``json`` blocks must be JSONL.

A block may be marked by an HTML comment on the line just before its fence (hidden when the
README is rendered, visible to whoever edits it)::

    <!-- readme-test: tiny -->
    <!-- readme-test: tiny, server -->
    <!-- readme-test: client -->
    <!-- readme-test: skip: the reason, e.g. needs a GPU -->

- no marker: the block runs exactly as written;
- ``tiny``: the preset the block loads becomes ``tiny`` (``--preset mini`` → ``--preset tiny``,
  ``"mini"`` → ``"tiny"``); nothing else is changed, and the marker must change something;
- ``server``: a one-command block that serves until stopped (``anygpt app``, ``anygpt serve``). It
  is started in the background with ``--port`` set to a free port, and must answer HTTP there;
  the next block, which must be marked ``client``, then runs against it (its
  ``127.0.0.1:<the command's default port>`` becomes that free port), and the server is stopped;
- ``skip: REASON``: not run (only parsed, for Python); the reason shows in the test report.
  Kept for what this machine cannot do: the hub, a GPU, real weights, long builds, installs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent
KNOWN_FLAGS = {"tiny", "server", "client"}
DEFAULT_PORTS = {"app": 7860, "serve": 8000}  # the CLI's defaults (`anygpt app|serve --help`)


@dataclass
class Block:
    language: str
    code: str
    line: int  # of the opening fence
    flags: set[str] = field(default_factory=set)
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.language}-line{self.line}"


def _blocks() -> list[Block]:
    text = README.read_text()
    pattern = re.compile(r"^(?:<!--\s*readme-test:\s*(?P<marker>.*?)\s*-->\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```$",
                         flags=re.S | re.M)
    blocks = []
    for match in pattern.finditer(text):
        block = Block(match["lang"], match["code"], text.count("\n", 0, match.start("lang")) + 1)
        marker = match["marker"]
        if marker is not None:
            if marker.startswith("skip:"):
                block.skip = marker[len("skip:"):].strip()
            else:
                block.flags = {flag.strip() for flag in marker.split(",")}
        blocks.append(block)
    return blocks


BLOCKS = _blocks()


def _of(language: str) -> list[Block]:
    return [b for b in BLOCKS if b.language == language]


def _params(blocks: list[Block]):
    return [pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=b.skip)] if b.skip else []) for b in blocks]


def _client_after(server: Block) -> Block:
    later = BLOCKS[BLOCKS.index(server) + 1:]
    return next(b for b in later if b.language != "json")


def _substituted(block: Block) -> str:
    if "tiny" not in block.flags:
        return block.code
    pattern = r"--preset mini\b" if block.language == "bash" else r"([\"'])mini\1"
    code, count = re.subn(pattern, "--preset tiny" if block.language == "bash" else r"\1tiny\1", block.code)
    assert count, f"README line {block.line}: marked `tiny` but names no `mini` preset to replace"
    return code


# The markers themselves -------------------------------------------------------------------------


def test_the_readme_has_examples_of_every_kind():
    assert _of("json") and len(_of("python")) >= 3 and len(_of("bash")) >= 3


def test_every_block_is_marked_in_the_documented_way():
    markers = len(re.findall(r"<!--\s*readme-test:", README.read_text()))
    assert markers == sum(bool(b.flags or b.skip) for b in BLOCKS), \
        "a `readme-test` marker must stand on the line just before a block's opening fence"
    for block in BLOCKS:
        where = f"README line {block.line}"
        assert block.language in ("python", "bash", "json"), f"{where}: a block needs a language: python, bash or json"
        assert block.skip is None or block.skip, f"{where}: `skip:` needs a reason"
        assert block.flags <= KNOWN_FLAGS, f"{where}: unknown marker {sorted(block.flags - KNOWN_FLAGS)}"
        if "server" in block.flags:
            assert block.language == "bash", f"{where}: a `server` block is a command"
            assert "client" in _client_after(block).flags, f"{where}: a `server` block is followed by a `client` block"
        if "client" in block.flags:
            before = [b for b in BLOCKS[:BLOCKS.index(block)] if b.language != "json"]
            assert before and "server" in before[-1].flags, f"{where}: a `client` block follows a `server` block"


# Running them ----------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary working directory with the media files the README's examples name."""
    from PIL import Image

    from anygpt.testing import write_sample_media

    media = write_sample_media(tmp_path / "media")
    Image.open(media["image"]).convert("RGB").save(tmp_path / "cat.jpg")
    for name in ("cat.png", "a.png"):
        shutil.copy(media["image"], tmp_path / name)
    shutil.copy(media["audio"], tmp_path / "b.wav")
    shutil.copy(media["video"], tmp_path / "clip.mp4")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    return env


def _run_python(code: str, block: Block) -> dict:
    namespace = {"__name__": "__readme__"}
    # Padded so that a traceback names the README's own line numbers.
    exec(compile("\n" * block.line + code, str(README), "exec"), namespace)
    return namespace


@pytest.mark.slow
@pytest.mark.parametrize("block", _params([b for b in _of("python") if "client" not in b.flags]))
def test_python_block_runs(block, workdir):
    namespace = _run_python(_substituted(block), block)
    if "save_output(out, \"answer/\")" in block.code:  # the Python API tour: what its comments promise
        assert {"image_0.png", "audio_0.wav", "answer.json"} <= {p.name for p in (workdir / "answer").iterdir()}
        assert namespace["out"].media("image") and namespace["out"].media("audio")  # outputs=("image", "audio")
        assert len(namespace["outs"]) == 2 and all(o.media("image") for o in namespace["outs"])
        assert (workdir / "my-model" / "anygpt_config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("block", _params([b for b in _of("bash") if "server" not in b.flags]))
def test_bash_block_runs(block, workdir):
    result = subprocess.run(["bash", "-e", "-c", _substituted(block)], cwd=workdir, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README line {block.line} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    for out_dir in re.findall(r"--out (\S+)", block.code):  # every `--out` folder was written
        assert any((workdir / out_dir).iterdir()), f"README line {block.line}: nothing written to {out_dir}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(process: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with status {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing answered at {url} within {timeout:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("block", _params([b for b in _of("bash") if "server" in b.flags]))
def test_served_block_answers_its_client_block(block, workdir):
    argv = shlex.split(_substituted(block), comments=True)
    assert argv[0] == "anygpt" and argv[1] in DEFAULT_PORTS, f"README line {block.line}: one `anygpt app|serve` command"
    port = _free_port()
    client = _client_after(block)
    default = f"127.0.0.1:{DEFAULT_PORTS[argv[1]]}"
    assert default in client.code, f"README line {client.line}: the client should connect to {default}"
    code = _substituted(client).replace(default, f"127.0.0.1:{port}")
    log = workdir / "server.log"  # a file, not a pipe: a full pipe would stall the server
    with log.open("w") as sink:
        process = subprocess.Popen([*argv, "--port", str(port)], cwd=workdir, env=_env(),
                                   stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_until_served(process, f"http://127.0.0.1:{port}/", log)
        namespace = _run_python(code, client)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if "gradio_client" in client.code:  # the app's /chat endpoint: text, and the files it wrote
        assert isinstance(namespace["text"], str) and namespace["text"]
        assert namespace["files"] and all(Path(f).is_file() for f in namespace["files"])
        assert any(Path(f).suffix == ".png" for f in namespace["files"])  # output="image"
    if "from openai import OpenAI" in client.code:  # the API: an image part, a WAV, and a PNG
        import base64

        parts = namespace["message"].content
        assert any(p["type"] == "image_url" for p in parts)
        assert base64.b64decode(namespace["message"].audio.data)[:4] == b"RIFF"
        assert base64.b64decode(namespace["png"])[:8] == b"\x89PNG\r\n\x1a\n"


# Parsing what is not run -----------------------------------------------------------------------


@pytest.mark.parametrize("block", _params(_of("json")))
def test_json_examples_are_one_row_per_line(block):
    for line in block.code.splitlines():
        if line.strip():
            json.loads(line)  # a row split over lines fails here, as it would in a manifest


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in _of("python")])
def test_python_examples_parse(block):
    ast.parse(block.code)

"""benchmarks/bench_gpu.py in its --smoke mode: every stage on the CPU with the tiny preset,
a row each with a positive time and finite numbers, and --stages picking stages and groups."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
NUMBERS = ("time_s", "peak_gb", "floor_s", "ratio", "rate", "floor_rate")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    returned = bench.main(["--smoke", "--json", str(path)])
    return returned, json.loads(path.read_text())


def _check_row(row: dict) -> None:
    for name in NUMBERS:
        value = row[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row["stage"], name, value)
    assert row["workload"] and row["basis"]
    if row["work"] is not None:
        assert math.isfinite(row["work"]) and row["work"] > 0


def test_smoke_has_every_stage_with_positive_finite_numbers(bench, smoke, capsys):
    returned, written = smoke
    assert [row["stage"] for row in written["rows"]] == list(bench.STAGES)
    assert [row["stage"] for row in returned["rows"]] == list(bench.STAGES)
    for row in written["rows"]:
        _check_row(row)
    assert written["smoke"] is True and written["device"] == "cpu"
    assert "rough CPU default" in written["hardware"]["source"]  # the floors say what they rest on
    assert "RSS" in written["memory_kind"]


def test_smoke_floors_follow_their_basis(smoke):
    rows = {row["stage"]: row for row in smoke[1]["rows"]}
    hardware = smoke[1]["hardware"]
    prefill = rows["prefill"]
    assert prefill["floor_s"] == pytest.approx(prefill["work"] / (hardware["peak_tflops"] * 1e12))
    b1, b8 = rows["decode/b1"], rows["decode/b8"]
    assert b1["floor_s"] == pytest.approx(b1["work"] / (hardware["bandwidth_gbs"] * 1e9))
    # Batch 8 reads the weights once per step: more tokens per second at the floor.
    assert b8["extra"]["batch"] == 8 and b8["floor_rate"] > b1["floor_rate"]
    parts = rows["answer"]["extra"]["floor_parts_s"]
    assert set(parts) == {"encode/image", "prefill", "decode", "decoder/image", "decoder/audio", "decoder/video"}
    assert rows["answer"]["floor_s"] == pytest.approx(sum(parts.values()))


def test_stages_selects_stages_and_groups(bench, tmp_path, capsys):
    path = tmp_path / "some.json"
    bench.main(["--smoke", "--stages", "decode", "prefill", "--json", str(path),
                "--peak-tflops", "2", "--bandwidth-gbs", "100"])
    written = json.loads(path.read_text())
    assert [row["stage"] for row in written["rows"]] == ["prefill", "decode/b1", "decode/b8"]
    for row in written["rows"]:
        _check_row(row)
    assert written["hardware"]["source"] == "user-given"
    table = capsys.readouterr().out
    assert "decode/b8" in table and "encode/image" not in table


def test_stage_names_are_checked(bench):
    assert bench.select_stages(["decoder", "encode/audio"]) == [
        "encode/audio", "decoder/image", "decoder/audio", "decoder/video"]
    with pytest.raises(ValueError, match="unknown stage"):
        bench.select_stages(["decod"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--stages", "nope"])


@pytest.mark.parametrize(("name", "label"), [
    ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB"), ("NVIDIA L4", "L4"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA L40S", None), ("NVIDIA A100-SXM4-40GB", None),
])
def test_known_gpus_are_matched_by_name(bench, name, label):
    entry = bench.known_gpu(name)
    assert (entry[0] if entry else None) == label

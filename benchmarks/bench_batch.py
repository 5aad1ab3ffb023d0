"""Batched generation against one call per prompt, on one pipeline in one run.

Two measurements:

1. **Text**: the same prompts answered by one ``pipe(prompt)`` call each and by one
   ``pipe.batch(prompts)`` call (one padded LLM batch), with the same settings and seeds.
   Prints the generated tokens per second of each, their ratio, and how many answers are
   identical.
2. **Media**: the same prompts with a forced image (``--modality``), decoded with
   ``decode_batch_size=1`` (one decoder call per item, as before batching) and with all items in
   one decoder call. Prints the decoder time of each, the ratio, and the largest pixel
   difference between the two.

Example::

    python benchmarks/bench_batch.py --preset mini --batch 4
    python benchmarks/bench_batch.py --preset mini --batch 4 --sample --json batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?", "Name three colours.", "Describe a square in one sentence.",
    "What is two plus two?", "Say hello in Spanish.", "What sound does a cat make?",
    "Name a shape with three sides.", "Give me a word that rhymes with blue.",
]


def text_throughput(pipe, prompts: list[str], settings: dict, repeats: int) -> dict:
    """Best-of-``repeats`` wall time of one call per prompt and of one batched call."""
    seq_s, batch_s = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        single = [pipe(p, **settings) for p in prompts]
        seq_s = min(seq_s, time.perf_counter() - start)
        start = time.perf_counter()
        batched = pipe.batch(prompts, **settings)
        batch_s = min(batch_s, time.perf_counter() - start)
    tokens_seq = sum(o.num_generated_tokens for o in single)
    tokens_batch = sum(o.num_generated_tokens for o in batched)
    same = sum(a.raw_text == b.raw_text for a, b in zip(single, batched))
    return {"sequential_s": seq_s, "batched_s": batch_s, "tokens_sequential": tokens_seq,
            "tokens_batched": tokens_batch, "tokens_per_s_sequential": tokens_seq / seq_s,
            "tokens_per_s_batched": tokens_batch / batch_s,
            "ratio": (tokens_batch / batch_s) / (tokens_seq / seq_s), "identical": same, "prompts": len(prompts)}


def media_decoding(pipe, prompts: list[str], modality: str, settings: dict, repeats: int) -> dict:
    """Decoder time for the batch's media one call per item and all in one call."""
    import numpy as np

    times, media = {}, {}
    for size in (1, None):
        pipe.decode_batch_size = size
        best = float("inf")
        for _ in range(repeats):
            outputs = pipe.batch(prompts, outputs=(modality,), **settings)
            best = min(best, outputs[0].timings.get(f"decoder/{modality}", 0.0))  # the batch's, shared
        times[size] = best
        media[size] = [np.asarray(item, dtype=np.float64) if modality == "image" else
                       np.asarray(getattr(item, "waveform", getattr(item, "frames", item)), dtype=np.float64)
                       for o in outputs for item in o.media(modality)]
    pipe.decode_batch_size = None
    diff = max((float(np.abs(a - b).max()) for a, b in zip(media[1], media[None])), default=0.0)
    return {"items": len(media[None]), "one_per_call_s": times[1], "one_call_s": times[None],
            "ratio": times[1] / max(times[None], 1e-9), "max_abs_difference": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini", help="preset or model directory (default: mini)")
    parser.add_argument("--batch", type=int, default=4, help=f"prompts (at most {len(PROMPTS)}; default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per answer (default: 32)")
    parser.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    parser.add_argument("--modality", default="image", help="media decoded in the second part (default: image)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs (default: 2)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    parser.add_argument("--json", metavar="PATH", help="write the measurements as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= len(PROMPTS):
        parser.error(f"--batch must be between 1 and {len(PROMPTS)}")

    import torch

    from anygpt import AnyGPTPipeline

    torch.set_num_threads(args.threads)
    pipe = AnyGPTPipeline.from_pretrained(args.preset)
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS[:args.batch]
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "seed": 0}
    pipe(prompts[0], max_new_tokens=4)  # warm-up: first-call allocations

    text = text_throughput(pipe, prompts, settings, args.repeats)
    print(f"{args.preset}: {args.batch} prompts, {'sampled' if args.sample else 'greedy'}, "
          f"max {args.max_new_tokens} new tokens, {args.threads} threads, best of {args.repeats}")
    print(f"text   one call each: {text['sequential_s']:.2f} s, {text['tokens_per_s_sequential']:.1f} tokens/s | "
          f"batched: {text['batched_s']:.2f} s, {text['tokens_per_s_batched']:.1f} tokens/s | "
          f"{text['ratio']:.2f}x throughput; identical answers {text['identical']}/{text['prompts']}")
    media = media_decoding(pipe, prompts, args.modality, {**settings, "max_new_tokens": 8}, args.repeats)
    print(f"{args.modality:<6} {media['items']} items, one decoder call each: {media['one_per_call_s']:.2f} s | "
          f"one call: {media['one_call_s']:.2f} s | {media['ratio']:.2f}x; largest difference "
          f"{media['max_abs_difference']:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "text": text, "media": media}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

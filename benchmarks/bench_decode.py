"""Decode speed against Hugging Face ``generate()`` on the same LLM, in one run.

The baseline is what a user would otherwise run: ``model.generate()`` on the pipeline's own LLM
as transformers holds it by default on CPU (float32), greedy, from the same prompt embeddings.
Then this project's decoding loop on that model, in bfloat16, and with the compiled static-cache
step (``--compile``: inductor; the first answer pays the compile time and is not counted).

Each variant stops at end-of-sequence or ``--max-new-tokens`` (this project's loop also at the
chat template's stop strings, which ``generate()`` does not know); tokens/s counts the tokens
each wrote, and the table says how many answers agree with the float32 baseline's: the shorter
one is the start of the longer.

Example::

    python benchmarks/bench_decode.py --preset mini --max-new-tokens 64 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPTS = ["Tell me a long story about a lighthouse keeper.", "Explain in detail how rain forms.",
           "Describe your ideal city at length.", "Write a long letter to a friend about the sea."]


def prompt_embeds(pipe, text: str):
    from anygpt.conversation import Conversation

    conversation = Conversation()
    conversation.add_user(text)
    prompt = pipe.model.lm.tokenize_prompt(conversation.turns, pipe.model.num_media_tokens())
    return pipe.model.embed_prompt(prompt, []), prompt.input_ids


def hf_generate(pipe, prompts, max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall time and tokens of ``model.generate`` (greedy, stopping at end-of-sequence)."""
    import torch

    model, total, answers = pipe.model.lm.model, 0.0, []
    eos = sorted(pipe.model.lm.eos_ids)
    for embeds, _ in prompts:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(inputs_embeds=embeds.to(model.dtype), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos,
                                 attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
        total += time.perf_counter() - start
        answers.append([t for t in out[0].tolist() if t not in eos])
    return total, answers


def ours(pipe, prompts, max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall time and tokens of this project's loop (greedy, stopping at end-of-sequence)."""
    from anygpt.config import SamplingSettings
    from anygpt.generation import generate

    lm, total, answers = pipe.model.lm, 0.0, []
    settings = SamplingSettings(max_new_tokens=max_new_tokens, do_sample=False, stop_strings=())
    for embeds, ids in prompts:
        start = time.perf_counter()
        result = generate(lm, embeds.to(lm.dtype), ids, settings)
        total += time.perf_counter() - start
        answers.append(result.token_ids)
    return total, answers


def _agree(a: list[int], b: list[int]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini", help="preset or model directory (default: mini)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled static-cache step")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    parser.add_argument("--json", metavar="PATH", help="write the measurements as JSON")
    args = parser.parse_args(argv)

    import torch

    from anygpt import AnyGPTPipeline

    torch.set_num_threads(args.threads)
    pipe = AnyGPTPipeline.from_pretrained(args.preset)
    prompts = [prompt_embeds(pipe, text) for text in PROMPTS]
    n = args.max_new_tokens
    hf_generate(pipe, prompts[:1], 4)  # warm-up
    rows = {}
    base_s, base = hf_generate(pipe, prompts, n)
    rows["HF generate(), float32"] = (base_s, base)
    rows["ours, float32"] = ours(pipe, prompts, n)
    if args.compile:
        pipe.model.lm.compile()
        ours(pipe, prompts[:1], n)  # compiles
        rows["ours, float32, compiled"] = ours(pipe, prompts, n)
        pipe.model.lm.decode_step = None
    pipe.model.lm.model.to(torch.bfloat16)
    ours(pipe, prompts[:1], 4)
    rows["ours, bfloat16"] = ours(pipe, prompts, n)
    if args.compile:
        pipe.model.lm.compile()
        ours(pipe, prompts[:1], n)
        rows["ours, bfloat16, compiled"] = ours(pipe, prompts, n)
        pipe.model.lm.decode_step = None
    pipe.model.lm.model.to(torch.float32)

    print(f"{args.preset}: {len(prompts)} prompts x {n} tokens, greedy, {args.threads} threads")
    print(f"{'variant':<26} {'tokens/s':>9} {'vs HF':>6} {'agree with HF fp32':>19}")
    report = {}
    base_rate = sum(map(len, base)) / base_s
    for name, (seconds, answers) in rows.items():
        count = sum(map(len, answers))
        rate = count / seconds
        same = sum(_agree(a, b) for a, b in zip(answers, base))
        print(f"{name:<26} {rate:>9.1f} {rate / base_rate:>5.2f}x {same:>16}/{len(base)}  ({count} tokens)")
        report[name] = {"tokens_per_s": rate, "ratio": rate / base_rate, "agree": same, "tokens": count}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

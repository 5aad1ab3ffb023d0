"""Multi-turn chat with and without the KV cache kept between turns.

Runs the same greedy conversation twice on one pipeline: once with a ``Conversation`` that
keeps the LLM's KV cache (the default) and once with ``keep_cache=False``, which prefills the
whole history every turn. Prints, per turn, the prompt length, the positions reused from the
cache and the prefill time of each, and checks that both answer identically.

``--history N`` starts both conversations with N scripted exchanges of filler text, to show
the cost near a full context.

Example::

    python benchmarks/bench_chat.py --preset mini --turns 8
    python benchmarks/bench_chat.py --preset mini --turns 4 --history 120 --json chat.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

QUESTIONS = [
    "Hello! Who are you?", "What can you draw?", "What is the capital of France?", "And of Italy?",
    "Name a colour.", "Name a shape.", "What is two plus two?", "Say goodbye.",
]


def run(pipe, keep_cache: bool, turns: int, history: int, max_new_tokens: int) -> list[dict]:
    from anygpt.conversation import Conversation

    conversation = Conversation(keep_cache=keep_cache)
    for i in range(history):
        conversation.add_user(f"Tell me fact number {i} about the sea.")
        conversation.add_assistant(f"Fact {i}: the sea is large, deep and mostly salty water.")
    rows = []
    for turn in range(turns):
        start = time.perf_counter()
        output = pipe.chat(conversation, QUESTIONS[turn % len(QUESTIONS)], do_sample=False,
                           max_new_tokens=max_new_tokens, seed=0)
        rows.append({"turn": turn + 1, "prompt_tokens": output.num_prompt_tokens,
                     "cached_tokens": output.num_cached_tokens, "prefill_s": output.timings["prefill"],
                     "turn_s": time.perf_counter() - start, "answer": output.raw_text})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini", help="preset or model directory (default: mini)")
    parser.add_argument("--turns", type=int, default=8, help="chat turns (default: 8)")
    parser.add_argument("--history", type=int, default=0, help="scripted exchanges before the first turn")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="per answer (default: 24)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    parser.add_argument("--json", metavar="PATH", help="write the measurements as JSON")
    args = parser.parse_args(argv)

    import torch

    from anygpt import AnyGPTPipeline

    torch.set_num_threads(args.threads)
    pipe = AnyGPTPipeline.from_pretrained(args.preset)
    pipe.set_progress_bar_config(disable=True)
    run(pipe, True, 1, 0, 4)  # warm-up: first-call allocations are not the cache's doing
    cached = run(pipe, True, args.turns, args.history, args.max_new_tokens)
    fresh = run(pipe, False, args.turns, args.history, args.max_new_tokens)

    print(f"{args.preset}: {args.turns} turns after {args.history} scripted exchanges, greedy, "
          f"{args.threads} threads")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'prefill kept':>13} {'prefill full':>13} {'turn kept':>10} "
          f"{'turn full':>10} {'same answer':>12}")
    for a, b in zip(cached, fresh):
        print(f"{a['turn']:>4} {a['prompt_tokens']:>7} {a['cached_tokens']:>7} {a['prefill_s']:>12.3f}s "
              f"{b['prefill_s']:>12.3f}s {a['turn_s']:>9.3f}s {b['turn_s']:>9.3f}s "
              f"{str(a['answer'] == b['answer']):>12}")
    if len(cached) > 1:
        for name, rows in (("kept", cached), ("full", fresh)):
            print(f"last turn / first turn ({name}): prefill {rows[-1]['prefill_s'] / rows[0]['prefill_s']:.2f}x, "
                  f"whole turn {rows[-1]['turn_s'] / rows[0]['turn_s']:.2f}x (answers differ in length)")
    same = all(a["answer"] == b["answer"] for a, b in zip(cached, fresh))
    kept, full = sum(r["prefill_s"] for r in cached), sum(r["prefill_s"] for r in fresh)
    print(f"total prefill: {kept:.3f} s kept vs {full:.3f} s full ({full / max(kept, 1e-9):.2f}x); "
          f"identical answers: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "history": args.history,
                                               "kept": cached, "full": fresh, "identical": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

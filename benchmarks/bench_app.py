"""Latency of one chat turn through the Gradio app versus a direct pipeline call, on CPU.

For the same prompt, attached image, forced outputs, settings and seed, it measures:

* direct: ``pipe.stream(...)`` in-process, writing each media item as it arrives (the work the
  app's engine does) — time to the first streamed text, to each media item, and in total;
* app: the app launched on 127.0.0.1 around the same pipeline object, called through
  ``gradio_client`` (``submit`` on the ``/chat`` endpoint, which streams updates) — the same
  three times, seen by the client.

The app's added latency is ``app total / direct total - 1`` (goal: under 10 %). Decoders are
loaded by a warm-up turn first, so neither side pays for loading.

    python benchmarks/bench_app.py --preset mini --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def direct_turn(pipe, image: Path, outputs: tuple[str, ...], settings: dict, out_dir: Path) -> dict:
    from anygpt.conversation import Conversation
    from anygpt.modalities import get_modality
    from anygpt.types import MediaSegment, TextDelta

    start = time.perf_counter()
    first_text, media_times = None, []
    conv = Conversation()
    for event in pipe.stream(conv, "What is in this picture? Draw a similar one and make a matching sound.",
                             media={"image": [image]}, outputs=outputs, **settings):
        now = time.perf_counter() - start
        if isinstance(event, TextDelta) and first_text is None and event.text.strip():
            first_text = now
        elif isinstance(event, MediaSegment):
            spec = get_modality(event.modality)
            spec.write(event.value, out_dir / f"{len(media_times)}_{spec.name}{spec.output_suffix}")
            media_times.append(time.perf_counter() - start)
    return {"first_text": first_text, "media": media_times, "total": time.perf_counter() - start}


def app_turn(url: str, image: Path, output: str, settings: dict) -> dict:
    from gradio_client import Client, handle_file

    # A fresh client is a fresh server-side session: the turn starts a new conversation, as the
    # direct call does (one client would carry the growing conversation from turn to turn).
    client = Client(url, verbose=False)
    start = time.perf_counter()
    first_text, media_times, seen = None, [], 0
    job = client.submit({"text": "What is in this picture? Draw a similar one and make a matching sound.",
                         "files": [handle_file(str(image))]}, output=output, api_name="/chat", **settings)
    for text, files, *_ in job:
        now = time.perf_counter() - start
        if first_text is None and text.strip():
            first_text = now
        for _ in range(len(files or []) - seen):
            media_times.append(now)
        seen = len(files or [])
    job.result()
    return {"first_text": first_text, "media": media_times, "total": time.perf_counter() - start}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from anygpt import AnyGPTPipeline
    from anygpt.testing import write_sample_media
    from anygpt.app.chat import build_app
    from anygpt.app.server import launch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="anygpt-bench-app-"))
    image = write_sample_media(work / "inputs")["image"]
    pipe = AnyGPTPipeline.from_pretrained(args.preset)
    pipe.set_progress_bar_config(disable=True)
    # The modalities the preset can generate, forced: the app forces one per turn, so use one.
    output = "image"
    # The app's /chat parameters are named as the pipeline's settings: one dict serves both.
    settings = {"seed": 0, "max_new_tokens": args.max_new_tokens}

    demo = build_app(pipe, output_dir=work / "app-out")
    launch(demo, port=None, block=False, quiet=True)
    try:
        direct_turn(pipe, image, (output,), settings, work)  # warm-up: loads the decoder
        app_turn(demo.local_url, image, output, settings)
        direct, app = [], []
        for _ in range(args.runs):  # interleaved, so drift in machine load hits both alike
            direct.append(direct_turn(pipe, image, (output,), settings, work))
            app.append(app_turn(demo.local_url, image, output, settings))
    finally:
        demo.close()

    rows = [("first streamed text", "first_text"), ("total", "total")]
    print(f"preset {args.preset}, {args.runs} run(s), output={output}, max_new_tokens={args.max_new_tokens}, "
          f"torch threads={args.threads}; medians in seconds")
    print(f"  {'':28}{'direct':>10}{'app':>10}{'added':>10}")
    for label, key in rows:
        d, a = _median([r[key] for r in direct]), _median([r[key] for r in app])
        print(f"  {label:28}{d:10.3f}{a:10.3f}{(a / d - 1) * 100:9.1f}%")
    for i in range(max(len(r["media"]) for r in direct)):
        d = _median([r["media"][i] for r in direct if len(r["media"]) > i])
        a = _median([r["media"][i] for r in app if len(r["media"]) > i])
        print(f"  {'media item ' + str(i):28}{d:10.3f}{a:10.3f}{(a / d - 1) * 100:9.1f}%")
    total_d, total_a = _median([r["total"] for r in direct]), _median([r["total"] for r in app])
    verdict = "met" if total_a / total_d - 1 < 0.10 else "NOT met"
    print(f"  app added latency goal (< 10 % of the direct call): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

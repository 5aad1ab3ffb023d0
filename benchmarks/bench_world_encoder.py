"""Train the miniature's ImageBind encoder on the procedural world, and judge it by retrieval.

Builds the ``ARCH`` encoder with random weights, renders and preprocesses the training media
once (balanced over the captions; render seed ``SETTINGS.render_seed``), trains it with
:func:`anygpt.alignment.encoder_training.train_encoder` (InfoNCE of every medium against its
caption's embedding by ImageBind's own text trunk, learnt temperature), saves it with
``ImageBindEncoder.save_weights``, reloads it with
``ImageBindEncoder.from_config(EncoderConfig(pretrained=path, arch=ARCH))`` (checked bit-exact)
and reports:

* time: rendering + preprocessing, training (steps/s), evaluation; wall clock, so on a shared
  machine these are noisy;
* size: parameters, saved file size (float32) and the float16 size of the weights;
* held-out retrieval accuracy per modality: media rendered with a seed training did not use
  (``--eval-seed``), preprocessed exactly as ``AnyGPTModel.encode_items`` does (every clip),
  each matched to the nearest caption among ALL the world's captions of its modality (54 image,
  9 sound, 72 clip captions); also per attribute, the mean margin to the best wrong caption,
  the same with the captions in a held-out phrasing (text-side generalisation), and the
  accuracy on the training media.

    python benchmarks/bench_world_encoder.py --output /tmp/world-encoder.safetensors
    python benchmarks/bench_world_encoder.py --output /tmp/e.safetensors --steps 100 --json out.json
    python benchmarks/bench_world_encoder.py --output /tmp/e.safetensors --eval-only  # judge a saved file
    python benchmarks/bench_world_encoder.py --output /tmp/e.safetensors --frozen-text  # random text side

The defaults are the settings chosen for the ``mini`` preset (``ARCH`` and ``SETTINGS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_world_encoder")

#: The chosen architecture (``ImageBindModel`` keyword arguments, i.e. ``EncoderConfig.arch``).
#: Vision: 28-pixel patches (8 source pixels of the 64x64 world; 64 tokens an image), 4 frames a
#: video clip (two temporal tokens of two frames each: motion is visible locally), 64 wide, 2
#: blocks. Audio: 104 log-mel frames (the world's sounds last 1 s; 9 x 12 patches), 64 wide, 2
#: blocks. Text: 32 wide, 1 block (8 was too narrow to tell the captions apart). Depth, thermal
#: and IMU are unused and minimal.
ARCH: dict[str, Any] = {
    "out_embed_dim": 64,
    "kernel_size": [2, 28, 28], "video_frames": 4,
    "vision_embed_dim": 64, "vision_num_blocks": 2, "vision_num_heads": 4,
    "audio_embed_dim": 64, "audio_num_blocks": 2, "audio_num_heads": 4, "audio_drop_path": 0.0,
    "audio_target_len": 104,
    "text_embed_dim": 32, "text_num_blocks": 1, "text_num_heads": 2,
    "depth_embed_dim": 8, "depth_num_blocks": 1, "depth_num_heads": 1,
    "thermal_embed_dim": 8, "thermal_num_blocks": 1, "thermal_num_heads": 1,
    "imu_embed_dim": 8, "imu_num_blocks": 1, "imu_num_heads": 1, "imu_drop_path": 0.0,
}
#: The chosen training settings (see ``EncoderTraining``).
SETTINGS: dict[str, Any] = {
    "steps": 400,
    "batch_size": 32,
    "lr": 2e-3,
    "caption_bank": True,
    "caption_templates": "canonical",
    "items_per_caption": {"image": 8, "audio": 24, "video": 6},
}
#: Held-out renders of each caption (54, 9 and 72 captions).
EVAL_ITEMS_PER_CAPTION = {"image": 4, "audio": 16, "video": 3}


def _size_report(encoder, path: Path) -> dict[str, Any]:
    params = encoder.num_parameters
    floats = sum(t.numel() for t in encoder.model.state_dict().values() if t.is_floating_point())
    return {"parameters": params, "file_mb": round(path.stat().st_size / 1e6, 3),
            "fp16_mb": round(floats * 2 / 1e6, 3)}


def _bit_exact(a, b) -> bool:
    import torch

    sa, sb = a.model.state_dict(), b.model.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _media_geometry(encoder, held) -> dict[str, Any]:
    """What the input projectors will see, without the text side: for each attribute, how often
    a held-out medium's nearest other medium (cosine) shares its value, and the mean cosine
    between media of the same caption and of different captions."""
    import torch

    from anygpt.alignment import encoder_training as et

    embeddings = torch.nn.functional.normalize(et.media_embeddings(encoder, held).float(), dim=-1)
    similarity = embeddings @ embeddings.T
    same = torch.tensor([[a == b for b in held.items] for a in held.items])
    off_diagonal = ~torch.eye(len(held.items), dtype=torch.bool)
    nearest = similarity.masked_fill(~off_diagonal, float("-inf")).argmax(dim=1)
    neighbours = {name: round(sum(held.items[int(j)].attributes()[name] == item.attributes()[name]
                                  for j, item in zip(nearest, held.items)) / len(held.items), 4)
                  for name in held.items[0].attributes()}
    return {"nearest_medium_shares": neighbours,
            "cosine_same_caption": round(float(similarity[same & off_diagonal].mean()), 4),
            "cosine_other_captions": round(float(similarity[~same].mean()), 4)}


def evaluate(encoder, modalities, seed: int, items_per_caption: dict[str, int], progress: bool,
             train_sets: dict | None = None) -> dict[str, Any]:
    """Held-out retrieval per modality (and on the training media, when given)."""
    from anygpt.alignment import encoder_training as et
    from anygpt.alignment.world import CAPTIONS

    report: dict[str, Any] = {}
    for offset, modality in enumerate(et.WORLD_MODALITIES):
        if modality not in modalities:
            continue
        start = time.perf_counter()
        # Every clip kept: the exact input AnyGPTModel.encode_items builds.
        held = et.world_media_set(encoder, modality, items_per_caption[modality], seed * 1000 + offset,
                                  compact_clips=False, progress=progress)
        result = et.retrieval_accuracy(encoder, held)
        phrased = et.retrieval_accuracy(encoder, held, template=CAPTIONS[modality].held_out[0])
        entry = {"accuracy": round(result.accuracy, 4), "media": result.num_media,
                 "captions": result.num_captions,
                 "attributes": {k: round(v, 4) for k, v in result.attributes.items()},
                 "margin": round(result.margin, 4),
                 "held_out_phrasing": {"template": CAPTIONS[modality].held_out[0],
                                       "accuracy": round(phrased.accuracy, 4)}}
        entry["media_geometry"] = _media_geometry(encoder, held)
        if train_sets and modality in train_sets:
            entry["train_accuracy"] = round(et.retrieval_accuracy(encoder, train_sets[modality]).accuracy, 4)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        report[modality] = entry
        logger.info("%s: held-out retrieval %.3f among %d captions (%s), margin %.3f; held-out phrasing %.3f",
                    modality, result.accuracy, result.num_captions,
                    ", ".join(f"{k} {v:.3f}" for k, v in result.attributes.items()), result.margin,
                    phrased.accuracy)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="weights file (.safetensors or .pth)")
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    parser.add_argument("--eval-seed", type=int, default=1, help="render seed of the held-out media (not 0)")
    parser.add_argument("--frozen-text", action="store_true", help="keep the text trunk at its random init")
    parser.add_argument("--modalities", default="image,audio,video")
    parser.add_argument("--eval-only", action="store_true", help="judge the weights already at --output")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a machine whose cores other jobs also use, "
                             "2 OpenMP threads ran this model 10-25x slower than 1; 0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from anygpt.alignment import encoder_training as et
    from anygpt.config import EncoderConfig
    from anygpt.encoders import ImageBindEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    modalities = tuple(args.modalities.split(","))
    if args.eval_seed == SETTINGS.get("render_seed", 0):
        parser.error("--eval-seed must differ from the training render seed")
    settings = et.EncoderTraining(**{**SETTINGS, "steps": args.steps, "seed": args.seed,
                                     "train_text": not args.frozen_text,
                                     "progress": not args.no_progress})
    report: dict[str, Any] = {"arch": ARCH, "settings": {k: v for k, v in dataclasses.asdict(settings).items()
                                                          if k not in ("progress", "log_every")},
                              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    train_sets = None
    if args.eval_only:
        trained = ImageBindEncoder.from_config(EncoderConfig(pretrained=str(args.output), arch=dict(ARCH)))
    else:
        result = et.train_world_encoder(ARCH, settings, init_seed=args.seed, output=args.output,
                                        modalities=modalities)
        trained = result.encoder
        report["time_s"] = {"data": round(result.data_seconds, 1), "train": round(result.seconds, 1),
                            "steps_per_s": round(result.steps / result.seconds, 3)}
        report["loss"] = {"first_tenth": round(result.mean_loss(0.0, 0.1), 4),
                          "last_tenth": round(result.mean_loss(0.9, 1.0), 4),
                          **{m: round(sum(v[-max(1, len(v) // 10):]) / max(1, len(v) // 10), 4)
                             for m, v in result.modality_losses.items()}}
        report["logit_scale"] = round(result.logit_scale, 3)
        reloaded = ImageBindEncoder.from_config(EncoderConfig(pretrained=str(args.output), arch=dict(ARCH)))
        report["reload_bit_exact"] = _bit_exact(trained, reloaded)
        trained = reloaded  # judge what ships
        # Accuracy on (a subset of) the training renders: seen media, for comparison.
        train_sets = {m: et.world_media_set(trained, m, 1, settings.render_seed * 1000 + i)
                      for i, m in enumerate(et.WORLD_MODALITIES) if m in modalities}
    report["size"] = _size_report(trained, args.output)
    start = time.perf_counter()
    report["retrieval"] = evaluate(trained, modalities, args.eval_seed, EVAL_ITEMS_PER_CAPTION,
                                   not args.no_progress, train_sets)
    report.setdefault("time_s", {})["eval"] = round(time.perf_counter() - start, 1)
    report["load_average_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()

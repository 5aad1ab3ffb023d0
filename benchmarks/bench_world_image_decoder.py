"""Train the miniature's image decoder from scratch on the procedural world, and judge it.

Trains a tiny ``StableDiffusionPipeline`` (VAE, then UNet; the CLIP text encoder stays random
and frozen unless ``--train-text-encoder``) with :mod:`anygpt.alignment.decoder_training` on
rendered world images ("a red circle on a white background"), saves it as a diffusers folder,
reloads it with ``load_decoder(DecoderConfig(name="stable-diffusion", pretrained=folder))`` and
generates every one of the 54 captions with several seeds from the caption alone. Reports:

* training time and steps/s per component (wall clock: on a shared machine this is noisy);
* parameters per component and the fp16 size of the saved weights;
* accuracy per attribute (colour, shape, background, all three), judged by the world's
  detectors (:func:`anygpt.alignment.world.detect_image`; an undetected attribute counts as
  wrong) and by a simpler detector defined here (border-median background, nearest world
  colour of the far-from-background pixels, bounding-box fill ratio), for each generation
  setting (scheduler, steps, guidance) asked for.

    python benchmarks/bench_world_image_decoder.py --output /tmp/image-decoder
    python benchmarks/bench_world_image_decoder.py --output /tmp/d --unet-steps 500 --json out.json
    python benchmarks/bench_world_image_decoder.py --output /tmp/d --eval-only   # judge a saved folder

The defaults are the settings chosen for the ``mini`` preset (see ``ARCH`` and ``SETTINGS``).
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

import numpy as np  # noqa: E402

logger = logging.getLogger("bench_world_image_decoder")

#: The chosen architecture (keys of ``anygpt.decoders.image.TINY_ARCH``): 64×64 images from
#: 16×16×4 latents (VAE factor 4), a 2-level UNet, CLIP's tokenizer with a 2-layer 32-wide text
#: encoder (conditioning 77 × 32).
ARCH: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "vae_block_out_channels": (16, 32, 64),
    "latent_channels": 4,
    "text_hidden_size": 32,
    "text_num_layers": 2,
    "scheduler": "ddim",
    "prediction_type": "epsilon",
}
#: Generation settings judged by default: (scheduler, steps, guidance).
EVAL_SETTINGS = (("ddim", 10, 3.0), ("ddim", 25, 3.0), ("ddim", 25, 7.5))
#: Training images (new random sizes and positions, uniform over the 54 captions).
NUM_IMAGES = 4096


# The world ------------------------------------------------------------------------------------


def world_captions() -> list[str]:
    """The 54 image captions, in the world's attribute order."""
    from anygpt.alignment.world import all_items

    return [item.caption() for item in all_items("image")]


def world_images(count: int, seed: int) -> list[tuple[Any, str]]:
    """``count`` random (PIL image, caption) pairs of the world."""
    from PIL import Image

    from anygpt.alignment.world import render_image, sample_image

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        item = sample_image(rng)
        pairs.append((Image.fromarray(render_image(item, rng)), item.caption()))
    return pairs


def truth(caption: str) -> dict[str, str]:
    from anygpt.alignment.world import parse_caption

    return parse_caption(caption, "image").attributes()


# The simple detector --------------------------------------------------------------------------


def simple_detect(image: Any) -> dict[str, str | None]:
    """Colour, shape and background of an image, by the simplest measurements.

    Background: the world background nearest the border pixels' median. Colour: the world
    colour nearest the median of the pixels more than 60 (RGB distance) from that median.
    Shape: the foreground (pixels nearer that median colour than the background's) fills a share
    of its bounding box (rows and columns with at least 2 foreground pixels) — square ≈ 1,
    circle ≈ 0.785, triangle ≈ 0.5 — split half-way between.
    """
    from anygpt.alignment.world import BACKGROUNDS, COLOURS

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    reference = np.median(border, axis=0)
    background = _nearest_name(reference, BACKGROUNDS)
    far = np.linalg.norm(pixels - reference, axis=-1) > 60.0
    if far.sum() < 20:
        return {"colour": None, "shape": None, "background": background}
    median = np.median(pixels[far], axis=0)
    mask = np.linalg.norm(pixels - median, axis=-1) < np.linalg.norm(pixels - reference, axis=-1)
    rows, cols = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = box.mean()
    shape = "triangle" if fill < (0.5 + 0.785) / 2 else "circle" if fill < (0.785 + 1.0) / 2 else "square"
    return {"colour": _nearest_name(median, COLOURS), "shape": shape, "background": background}


def _nearest_name(value: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda name: float(np.linalg.norm(np.asarray(table[name]) - value)))


def official_detect(image: Any) -> dict[str, str | None]:
    from anygpt.alignment.world import detect_image

    return {name: detection.value for name, detection in detect_image(image).items()}


DETECTORS = {"world": official_detect, "simple": simple_detect}
ATTRIBUTES = ("colour", "shape", "background")


# Judging --------------------------------------------------------------------------------------


def judge(decoder: Any, captions: list[str], seeds: list[int], scheduler: str, steps: int,
          guidance: float, sample_dir: Path | None = None, expected: list[dict[str, str]] | None = None,
          tag: str = "") -> dict[str, Any]:
    """Accuracy per attribute of ``decoder``'s images of ``captions`` (one batch per seed);
    ``expected`` gives each caption's attributes (default: parsed from the canonical caption)."""
    expected = expected or [truth(caption) for caption in captions]
    set_scheduler(decoder, scheduler)
    condition = decoder.encode_text(captions)
    hits = {d: dict.fromkeys((*ATTRIBUTES, "all"), 0) for d in DETECTORS}
    start = time.perf_counter()
    images = []
    for seed in seeds:
        batch = decoder.decode(condition, seed=seed, steps=steps, guidance=guidance)
        images.append(batch)
        for attributes, image in zip(expected, batch, strict=True):
            for name, detector in DETECTORS.items():
                found = detector(image)
                correct = [found[a] == attributes[a] for a in ATTRIBUTES]
                for attribute, ok in zip(ATTRIBUTES, correct):
                    hits[name][attribute] += ok
                hits[name]["all"] += all(correct)
    seconds = time.perf_counter() - start
    total = len(captions) * len(seeds)
    if sample_dir is not None:
        _contact_sheet(images, sample_dir / f"samples{tag}_{scheduler}_{steps}_{guidance:g}.png")
    return {"captions": tag.strip("_") or "canonical", "scheduler": scheduler, "steps": steps, "guidance": guidance, "images": total,
            "seconds_per_image": seconds / total,
            "accuracy": {d: {k: v / total for k, v in h.items()} for d, h in hits.items()}}


def judge_reconstructions(decoder: Any, count: int = 216, seed: int = 12345) -> dict[str, Any]:
    """Accuracy per attribute of the VAE's reconstructions (posterior mean) of ``count`` new
    world images: the ceiling the decoder's VAE puts on generation. The renders themselves are
    judged too (the detectors' own accuracy)."""
    import torch
    from PIL import Image

    pairs = world_images(count, seed)
    vae = decoder.pipeline.vae
    hits = {f"{kind}/{d}": dict.fromkeys(ATTRIBUTES, 0) for kind in ("render", "reconstruction") for d in DETECTORS}
    for start in range(0, count, 64):
        chunk = pairs[start:start + 64]
        media = torch.stack([decoder.training_sample(image) for image, _ in chunk]).to(decoder.device, decoder.dtype)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(media).latent_dist.mode()).sample
        pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for (image, caption), recon in zip(chunk, pixels, strict=True):
            expected = truth(caption)
            for kind, value in (("render", image), ("reconstruction", Image.fromarray(recon))):
                for name, detector in DETECTORS.items():
                    found = detector(value)
                    for attribute in ATTRIBUTES:
                        hits[f"{kind}/{name}"][attribute] += found[attribute] == expected[attribute]
    return {key: {a: v / count for a, v in h.items()} for key, h in hits.items()}


def held_out_captions() -> list[str]:
    """The 54 items in the world's first held-out caption phrasing ("... over a ... backdrop")."""
    from anygpt.alignment.world import CAPTIONS, all_items

    template = CAPTIONS["image"].held_out[0]
    return [item.caption(template) for item in all_items("image")]


def set_scheduler(decoder: Any, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (same noise schedule and prediction type)."""
    import diffusers

    from anygpt.decoders import tiny

    class_name, kwargs = tiny.SCHEDULERS[name]
    config = {**decoder.pipeline.scheduler.config, **kwargs}
    decoder.pipeline.scheduler = getattr(diffusers, class_name).from_config(config)


def _contact_sheet(batches: list[list[Any]], path: Path) -> None:
    from PIL import Image

    size = batches[0][0].size[0]
    sheet = Image.new("RGB", (size * len(batches[0]), size * len(batches)))
    for row, batch in enumerate(batches):
        for col, image in enumerate(batch):
            sheet.paste(image, (col * size, row * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


# Sizes ----------------------------------------------------------------------------------------


def sizes(decoder: Any, folder: Path) -> dict[str, Any]:
    """Parameters per component, their fp16 bytes, and the saved folder's weight bytes."""
    out = {}
    for name in ("vae", "unet", "text_encoder"):
        module = getattr(decoder.pipeline, name)
        out[f"{name}_params"] = sum(p.numel() for p in module.parameters())
    params = sum(out[f"{n}_params"] for n in ("vae", "unet", "text_encoder"))
    out["params"] = params
    out["fp16_mb"] = params * 2 / 1e6
    out["saved_weight_mb"] = sum(p.stat().st_size for name in ("vae", "unet", "text_encoder")
                                 for p in (folder / name).glob("*.safetensors")) / 1e6
    return out


# Main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for the trained pipeline")
    parser.add_argument("--arch", type=json.loads, default={}, help="JSON overrides of ARCH")
    parser.add_argument("--num-images", type=int, default=NUM_IMAGES)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--vae-batch", type=int, default=None)
    parser.add_argument("--vae-lr", type=float, default=None)
    parser.add_argument("--kl-weight", type=float, default=None)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--unet-batch", type=int, default=None)
    parser.add_argument("--unet-lr", type=float, default=None)
    parser.add_argument("--caption-dropout", type=float, default=None)
    parser.add_argument("--ema", type=float, default=None, help="EMA decay of the UNet weights")
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="save float32 weights (default float16)")
    parser.add_argument("--reuse-vae", type=Path, default=None,
                        help="start from the trained VAE of another run's training folder (same VAE arch)")
    parser.add_argument("--zero-snr", action="store_true",
                        help="train and sample with a zero-terminal-SNR schedule (rescaled betas, "
                             "trailing timesteps; needs v_prediction)")
    parser.add_argument("--eval-only", action="store_true", help="judge the folder --output holds")
    parser.add_argument("--eval", default=None,
                        help="generation settings to judge, 'scheduler:steps:guidance,...'")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per caption")
    parser.add_argument("--held-out", action="store_true",
                        help="also judge the captions in a held-out phrasing (first eval setting)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    parser.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from anygpt.alignment import decoder_training as dt
    from anygpt.config import DecoderConfig
    from anygpt.decoders import load_decoder

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = chosen_settings()
    settings.seed, settings.progress = args.seed, args.progress
    for attr, section, key in (("vae_steps", "vae", "steps"), ("vae_batch", "vae", "batch_size"),
                               ("vae_lr", "vae", "lr"), ("kl_weight", "vae", "kl_weight"),
                               ("unet_steps", "unet", "steps"), ("unet_batch", "unet", "batch_size"),
                               ("unet_lr", "unet", "lr"), ("caption_dropout", "unet", "caption_dropout"),
                               ("ema", "unet", "ema_decay")):
        if getattr(args, attr) is not None:
            setattr(getattr(settings, section), key, getattr(args, attr))
    if args.train_text_encoder:
        settings.unet.train_text_encoder = True
    arch = {**ARCH, **args.arch}
    report: dict[str, Any] = {"arch": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
                              "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    folder = args.output

    if not args.eval_only:
        start = time.perf_counter()
        pairs = world_images(args.num_images, args.seed)
        decoder = load_decoder(DecoderConfig(name="stable-diffusion", arch=arch, seed=args.seed))
        if args.zero_snr:
            dt.set_noise_schedule(decoder, rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if args.reuse_vae is not None:
            _reuse_vae(args.reuse_vae, folder / "training")
        data = dt.training_set(decoder, pairs)
        report["data_seconds"] = time.perf_counter() - start
        results = dt.train_decoder(decoder, data, settings, output_dir=folder / "training", resume=True)
        dt.save_decoder(decoder, folder, dtype=None if args.fp32 else torch.float16)
        report["train_seconds_total"] = time.perf_counter() - start
        report["settings"] = json.loads(json.dumps(dataclasses.asdict(settings)))
        report["training"] = {name: {**dataclasses.asdict(r), "steps_per_s": r.steps_per_s} for name, r in results.items()}

    decoder = load_decoder(DecoderConfig(name="stable-diffusion", pretrained=str(folder)))
    report["sizes"] = sizes(decoder, folder)
    captions = world_captions()
    specs = EVAL_SETTINGS if args.eval is None else [
        (s.split(":")[0], int(s.split(":")[1]), float(s.split(":")[2])) for s in args.eval.split(",")]
    report["vae_reconstruction"] = judge_reconstructions(decoder)
    logger.info("VAE reconstructions: %s", json.dumps(report["vae_reconstruction"]))
    runs = [(captions, None, "", spec) for spec in specs]
    if args.held_out:
        runs.append((held_out_captions(), [truth(c) for c in captions], "_held_out", specs[0]))
    report["evaluation"] = []
    for texts, expected, tag, (scheduler, steps, guidance) in runs:
        result = judge(decoder, texts, list(range(args.seeds)), scheduler, steps, guidance, folder / "samples",
                       expected=expected, tag=tag)
        report["evaluation"].append(result)
        logger.info("%s%s %d steps guidance %g: %s", scheduler, tag, steps, guidance,
                    json.dumps({d: {k: round(v, 3) for k, v in a.items()} for d, a in result["accuracy"].items()}))
    report["load_average_end"] = os.getloadavg()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


def _reuse_vae(source: Path, training: Path) -> None:
    """Seed ``training`` with ``source``'s pipeline and a state saying only the VAE is done."""
    import shutil

    from anygpt.alignment.decoder_training import STATE_FILE

    if (training / STATE_FILE).exists():
        return
    shutil.copytree(source, training, dirs_exist_ok=True)
    state = json.loads((source / STATE_FILE).read_text())
    state["completed"] = ["vae"]
    state["results"] = {"vae": state["results"]["vae"]}
    (training / STATE_FILE).write_text(json.dumps(state, indent=2))


def chosen_settings():
    """The training settings chosen for the ``mini`` preset's image decoder."""
    from anygpt.alignment.decoder_training import DecoderTraining, UNetTraining, VAETraining

    return DecoderTraining(
        vae=VAETraining(steps=600, batch_size=16, lr=1e-3, kl_weight=1e-4),
        unet=UNetTraining(steps=2500, batch_size=32, lr=1e-3, caption_dropout=0.1),
        log_every=100,
    )


if __name__ == "__main__":
    main()

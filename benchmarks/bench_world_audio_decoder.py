"""Train the miniature's audio decoder from scratch on the procedural world, and judge it.

Builds an AudioLDM decoder (``AudioLDMPipeline``: CLAP text encoder + byte-level RoBERTa
tokenizer, a VAE over log-mel spectrograms, a UNet conditioned on the CLAP embedding through its
class embedding, a ``SpeechT5HifiGan`` vocoder) with random weights, trains its components on
the world's tones (:mod:`anygpt.alignment.world`: 1 s, 16 kHz, pitch low / medium / high,
waveform sine / square / sawtooth) and saves it, in float16, as a diffusers pipeline folder.
Then it measures, with the world's own detectors (:func:`~anygpt.alignment.world.detect_sound`,
which know only the spec), how often the pitch and the waveform come out right:

* vocoder only: ``vocoder(log_mel(real tone))``;
* VAE round trip: ``vocoder(vae.decode(vae.encode(log_mel(real tone))))``;
* the whole pipeline from the caption alone: ``decode(encode_text([caption]))`` of the folder
  reloaded with ``load_decoder(DecoderConfig(name="audioldm", pretrained=folder))``, for each
  sampler setting of ``--eval`` (canonical captions, and the held-out caption phrasings).

The components are trained one after the other: the vocoder
(:mod:`anygpt.alignment.vocoder_training`), the VAE (:mod:`anygpt.alignment.decoder_training`),
the CLAP text encoder, contrastively against the audio (:mod:`anygpt.alignment.clap_training`:
a random one gives every caption nearly the same embedding, which the UNet then ignores), and
the UNet on the frozen text encoder (:mod:`anygpt.alignment.decoder_training`). It prints the time and size of each part and
the accuracies; ``--json`` writes them too. A benchmark, not a test: the numbers depend on the
machine and on what else runs on it.

    python benchmarks/bench_world_audio_decoder.py --output /tmp/audio-decoder
    python benchmarks/bench_world_audio_decoder.py --output /tmp/a --quick     # a minute, smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_world_audio_decoder")

#: The architecture trained here (``DecoderConfig.arch`` of the ``audioldm`` decoder). The
#: vocoder's hop of 8·10·10 = 800 samples (20 mel frames a second, n_fft 4096) puts the world's
#: 220 / 440 / 880 Hz on its 20 Hz frame-rate grid (see alignment/vocoder_training.py).
ARCH = {
    "num_mel_bins": 32,
    "upsample_rates": (8, 10, 10),
    "upsample_kernel_sizes": (16, 20, 20),
    "upsample_initial_channel": 64,
    "sample_size": 10,  # latent frames: 10 × VAE factor 2 = 20 mel frames = 1.0 s
    "block_out_channels": (32, 64),
    "vae_block_out_channels": (32, 64),
    "latent_channels": 4,
    "projection_dim": 32,
    "scheduler": "ddim",
}


def world_pairs(count: int, seed: int, templates: tuple[str, ...]):
    """``count`` (Audio, caption) pairs: the 9 sound items in turn, each caption drawn from
    ``templates``."""
    import numpy as np

    from anygpt.alignment.world import all_items, render_sound

    rng = np.random.default_rng(seed)
    items = all_items("audio")
    pairs = []
    for i in range(count):
        item = items[i % len(items)]
        template = templates[int(rng.integers(len(templates)))]
        pairs.append((render_sound(item, rng), item.caption(template), item))
    return pairs


def _score(items, waves, rate: int) -> dict:
    """Share of ``waves`` whose detected pitch / waveform (value with score >= MIN_SCORE) match."""
    from anygpt.alignment.world import detect_sound

    hits = {"pitch": 0, "waveform": 0, "both": 0}
    per_class: dict[str, list[int]] = {}
    for item, wave in zip(items, waves, strict=True):
        found = detect_sound(wave, rate)
        right = {k: found[k].value == getattr(item, k) for k in ("pitch", "waveform")}
        hits["pitch"] += right["pitch"]
        hits["waveform"] += right["waveform"]
        hits["both"] += right["pitch"] and right["waveform"]
        per_class.setdefault(item.caption(), []).append(int(right["pitch"] and right["waveform"]))
    n = len(items)
    return {**{k: v / n for k, v in hits.items()}, "n": n,
            "per_class": {k: sum(v) / len(v) for k, v in per_class.items()}}


def component_sizes(decoder) -> dict:
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in decoder.pipeline.components.items() if hasattr(module, "parameters")}


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="the pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--train-clips", type=int, default=900, help="world tones to train the VAE and UNet on")
    parser.add_argument("--vocoder-clips", type=int, default=540)
    parser.add_argument("--vocoder-steps", type=int, default=600)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--text-steps", type=int, default=200)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--unet-ema", type=float, default=0.995, help="EMA decay of the UNet weights (0: off)")
    parser.add_argument("--unet-batch", type=int, default=16)
    parser.add_argument("--eval-per-class", type=int, default=10, help="generations per caption class and setting")
    parser.add_argument("--eval", default="ddim:25:3,ddim:10:3,ddim:4:3,ddim:25:1",
                        help="comma-separated scheduler:steps:guidance settings of the pipeline evaluation")
    parser.add_argument("--reuse-vocoder", type=Path, help="copy the vocoder of this saved pipeline folder "
                        "instead of training one (for experiments on the other components)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps and generations")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.vocoder_steps, args.vae_steps, args.text_steps, args.unet_steps = 20, 20, 20, 40
        args.train_clips, args.vocoder_clips, args.eval_per_class = 90, 36, 1
        args.eval = "ddim:4:3"

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    from anygpt.alignment import clap_training as ct
    from anygpt.alignment import decoder_training as dt
    from anygpt.alignment import vocoder_training as vt
    from anygpt.alignment.world import CAPTIONS, all_items, render_sound
    from anygpt.config import DecoderConfig
    from anygpt.decoders import load_decoder

    results: dict = {"arch": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()},
                     "threads": args.threads, "args": {k: str(v) for k, v in vars(args).items()}}
    timings: dict[str, float] = {}
    #: CPU seconds of this process per component: with one thread, about what the wall time
    #: would be on an otherwise idle machine (the wall times count other processes' load too).
    cpu: dict[str, float] = {}
    start_all, cpu_start = time.perf_counter(), time.process_time()
    decoder = load_decoder(DecoderConfig(name="audioldm", arch=dict(ARCH), seed=args.seed))
    rate = int(decoder.pipeline.vocoder.config.sampling_rate)
    results["parameters"] = component_sizes(decoder)
    logger.info("parameters: %s", results["parameters"])

    # Held-out real tones for the vocoder-only and VAE round-trip measures.
    import numpy as np

    rng = np.random.default_rng(10_000 + args.seed)
    items = all_items("audio")
    test_items = [items[i % len(items)] for i in range(len(items) * max(2, args.eval_per_class))]
    test_mels = torch.stack([decoder.training_sample(render_sound(item, rng)) for item in test_items])

    # 1. The vocoder.
    t, cpu_mark = time.perf_counter(), time.process_time()
    vocoder_data = vt.vocoder_set(decoder, vt.world_tone_pairs(decoder, args.vocoder_clips, seed=args.seed))
    timings["vocoder_data_s"] = time.perf_counter() - t
    if args.reuse_vocoder:  # for experiments on the other components: a vocoder trained before
        from transformers import SpeechT5HifiGan

        trained = SpeechT5HifiGan.from_pretrained(args.reuse_vocoder / "vocoder").float()
        decoder.pipeline.vocoder.load_state_dict(trained.state_dict())
        decoder.pipeline.vocoder.config.normalize_before = trained.config.normalize_before
        vocoder_result = dt.ComponentResult("vocoder", 0, 0.0, float("nan"), float("nan"))
    else:
        vocoder_result = vt.train_decoder_vocoder(
            decoder, vocoder_data, vt.VocoderTraining(steps=args.vocoder_steps), seed=args.seed,
            progress=args.progress, log_every=max(1, args.vocoder_steps // 6))
    timings["vocoder_s"] = vocoder_result.seconds
    cpu["vocoder_s"] = time.process_time() - cpu_mark
    with torch.no_grad():
        waves = decoder.pipeline.vocoder(test_mels[:, 0]).numpy()
    results["vocoder_only"] = _score(test_items, waves, rate)
    logger.info("vocoder only: %s", results["vocoder_only"])

    # 2. The VAE (generic trainer), 3. the CLAP text encoder (contrastive), 4. the UNet (generic trainer).
    t = time.perf_counter()
    templates = CAPTIONS["audio"].train
    pairs = world_pairs(args.train_clips, args.seed + 1, templates)
    data = dt.training_set(decoder, [(audio, caption) for audio, caption, _ in pairs])
    timings["data_s"] = time.perf_counter() - t
    common = {"progress": args.progress}
    cpu_mark = time.process_time()
    vae_result = dt.train_vae(decoder, data, dt.VAETraining(steps=args.vae_steps, batch_size=16), seed=args.seed,
                              log_every=max(1, args.vae_steps // 4), **common)
    latents = dt.encode_latents(decoder, data)
    dt.calibrate_scaling_factor(decoder, latents, generator=torch.Generator().manual_seed(args.seed))
    cpu["vae_s"] = time.process_time() - cpu_mark
    cpu_mark = time.process_time()
    text_result = ct.train_text_encoder(decoder, data, ct.TextEncoderTraining(steps=args.text_steps),
                                        labels=[item for _, _, item in pairs], seed=args.seed,
                                        log_every=max(1, args.text_steps // 4), **common)
    cpu["text_encoder_s"] = time.process_time() - cpu_mark
    cpu_mark = time.process_time()
    unet_result = dt.train_unet(
        decoder, latents, dt.UNetTraining(steps=args.unet_steps, batch_size=args.unet_batch, caption_dropout=0.1,
                                          ema_decay=args.unet_ema or None),
        seed=args.seed + 1, log_every=max(1, args.unet_steps // 5), **common)
    cpu["unet_s"] = time.process_time() - cpu_mark
    timings["vae_s"], timings["text_encoder_s"], timings["unet_s"] = (
        vae_result.seconds, text_result.seconds, unet_result.seconds)
    results["losses"] = {"vocoder": [vocoder_result.first_loss, vocoder_result.last_loss],
                         "vae": [vae_result.first_loss, vae_result.last_loss],
                         "text_encoder": [text_result.first_loss, text_result.last_loss],
                         "unet": [unet_result.first_loss, unet_result.last_loss]}
    results["caption_similarity"] = {"max_before": text_result.max_similarity_before,
                                     "max_after": text_result.max_similarity_after}
    with torch.no_grad():
        vae = decoder.pipeline.vae
        round_trip = vae.decode(vae.encode(test_mels).latent_dist.mode()).sample
        waves = decoder.pipeline.vocoder(round_trip[:, 0]).numpy()
    results["vae_round_trip"] = _score(test_items, waves, rate)
    results["vae_round_trip"]["mel_l1"] = float((round_trip - test_mels).abs().mean())
    logger.info("VAE round trip: %s", results["vae_round_trip"])
    timings["train_total_s"] = time.perf_counter() - start_all
    cpu["train_total_s"] = time.process_time() - cpu_start

    # Save in float16 and reload with diffusers' own loader and with load_decoder.
    dt.save_decoder(decoder, args.output, dtype=torch.float16)
    results["folder_mb_fp16"] = folder_megabytes(args.output)
    from diffusers import AudioLDMPipeline

    AudioLDMPipeline.from_pretrained(args.output)
    loaded = load_decoder(DecoderConfig(name="audioldm", pretrained=str(args.output)))

    # 4. The whole pipeline, from the caption alone.
    results["pipeline"] = {}
    for setting in args.eval.split(","):
        scheduler, steps, guidance = setting.split(":")
        if scheduler != "ddim":
            raise SystemExit("only the pipeline's own DDIM scheduler is evaluated here")
        for split in ("train", "held_out"):
            phrasings = CAPTIONS["audio"].train[:1] if split == "train" else CAPTIONS["audio"].held_out
            eval_items = [item for item in items for _ in range(args.eval_per_class)]
            captions = [item.caption(phrasings[i % len(phrasings)]) for i, item in enumerate(eval_items)]
            t = time.perf_counter()
            clips = []
            for i in range(0, len(captions), 16):
                condition = loaded.encode_text(captions[i:i + 16])
                clips += loaded.decode(condition, seed=args.seed + i, steps=int(steps), guidance=float(guidance))
            seconds = time.perf_counter() - t
            score = _score(eval_items, [c.waveform for c in clips], clips[0].sample_rate)
            score["s_per_clip"] = seconds / len(clips)
            key = f"{setting}/{'canonical' if split == 'train' else 'held_out_phrasings'}"
            results["pipeline"][key] = score
            logger.info("pipeline %s: pitch %.3f waveform %.3f (%.2f s a clip)", key, score["pitch"],
                        score["waveform"], score["s_per_clip"])
    results["timings"], results["cpu_seconds"] = timings, cpu
    _report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _report(results: dict) -> None:
    print("\n== world audio decoder ==")
    params = results["parameters"]
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in params.items())
          + f"; total {sum(params.values()) / 1e6:.3f} M; fp16 folder {results['folder_mb_fp16']:.2f} MB")
    print("training wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["timings"].items()))
    print("training CPU time:  " + ", ".join(f"{k} {v:.0f} s" for k, v in results["cpu_seconds"].items()))
    for name in ("vocoder_only", "vae_round_trip"):
        r = results[name]
        print(f"{name:>16}: pitch {r['pitch']:.3f}  waveform {r['waveform']:.3f}  both {r['both']:.3f}  (n={r['n']})")
    for key, r in results["pipeline"].items():
        worst = min(r["per_class"].items(), key=lambda kv: kv[1])
        print(f"{key:>40}: pitch {r['pitch']:.3f}  waveform {r['waveform']:.3f}  both {r['both']:.3f}  "
              f"(n={r['n']}, {r['s_per_clip']:.2f} s/clip, worst {worst[0]!r} {worst[1]:.2f})")


if __name__ == "__main__":
    main()

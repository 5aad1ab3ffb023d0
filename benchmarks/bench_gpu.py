#!/usr/bin/env python
"""Time every stage of a NExT-GPT answer at real size on a GPU, next to its hardware floor.

The system is :func:`anygpt.realsize.full_size_config`: the ``nextgpt-7b`` preset with every
released weight replaced by its public architecture (ImageBind-huge, Vicuna-7B, SD-1.5,
AudioLDM-L-full, zeroscope v2 576w) and random weights, in bfloat16 on CUDA. Nothing is
downloaded. Stages (``--stages`` picks some; a group name such as ``encode`` picks its members):

==================  ==========================================================  ==============
stage               workload                                                    floor
==================  ==========================================================  ==============
``encode/image``    ImageBind-huge, one 224 x 224 image                         FLOPs / peak
``encode/audio``    ImageBind-huge, one audio clip (its preprocessed clips)     FLOPs / peak
``encode/video``    ImageBind-huge, one video (its preprocessed clips)          FLOPs / peak
``prefill``         Vicuna-7B, 512 prompt tokens, logits of the last one        FLOPs / peak
``decode/b1``       ``anygpt.generation.generate``, 64 greedy tokens after 512  bytes / HBM BW
``decode/b8``       plain HF forward loop with a ``DynamicCache``, batch 8      bytes / HBM BW
``decoder/image``   SD-1.5, 50 steps, 512 x 512, classifier-free guidance 7.5   FLOPs / peak
``decoder/audio``   AudioLDM-L-full, 50 steps, 5 s                              FLOPs / peak
``decoder/video``   zeroscope v2 576w, 50 steps, 24 frames 320 x 576            FLOPs / peak
``answer``          the whole turn: an image in, a text, an image, a sound and  sum of the
                    a clip out (``AnyGPTPipeline.__call__``)                    parts' floors
==================  ==========================================================  ==============

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward (the
encoders, the prefill) or on the whole decode at 2 and 3 steps, extrapolated linearly to the
step count (one step's UNet work, guidance included, plus the fixed VAE decode). Only matmuls,
convolutions and attention are counted, so the floors are lower bounds. Decode moves the LLM's
weights (all but the input embedding table) and each sequence's KV cache once per step; its
floor is those bytes over the HBM bandwidth. ``x floor`` is time / floor (1 is the floor).

Peak dense bf16 FLOP/s and HBM bandwidth come from :data:`KNOWN_GPUS`, keyed by
``torch.cuda.get_device_name()``; ``--peak-tflops`` and ``--bandwidth-gbs`` override them (and
are needed on a GPU the table lacks). Memory is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` per stage; every stage holds the weights of the whole system.

``--smoke`` runs the same stages on the CPU with the ``tiny`` preset (every component a layer or
two deep, tiny resolutions, 2 steps) in seconds, for CI; its floors use rough CPU defaults
unless given, and its memory column is the process's peak RSS (it never goes down).

    python benchmarks/bench_gpu.py                              # every stage on cuda:0
    python benchmarks/bench_gpu.py --stages decode prefill --json /tmp/llm.json
    python benchmarks/bench_gpu.py --peak-tflops 400 --bandwidth-gbs 1500   # an unlisted GPU
    python benchmarks/bench_gpu.py --smoke --json /tmp/smoke.json           # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    import torch

    from anygpt.config import AnyGPTConfig
    from anygpt.pipeline import AnyGPTPipeline

logger = logging.getLogger("bench_gpu")

OUTPUTS = ("image", "audio", "video")
STAGES = ("encode/image", "encode/audio", "encode/video", "prefill", "decode/b1", "decode/b8",
          "decoder/image", "decoder/audio", "decoder/video", "answer")
PROMPT = "<image> Describe the picture, then make a picture, a sound and a clip of it."

#: ``(pattern on torch.cuda.get_device_name(), label, dense bf16 TFLOP/s, HBM GB/s)``, first match
#: wins (so the PCIe H100 comes before the SXM one). Dense: without 2:4 sparsity.
KNOWN_GPUS: tuple[tuple[str, str, float, float], ...] = (
    (r"H200", "H200", 989.0, 4800.0),
    (r"H100.*PCIe", "H100 PCIe", 756.0, 2000.0),
    (r"H100", "H100 SXM", 989.0, 3350.0),
    (r"A100.*80GB", "A100 80GB", 312.0, 2000.0),
    (r"\bL4\b", "L4", 121.0, 300.0),
    (r"RTX 4090", "RTX 4090", 165.0, 1000.0),
)
#: Rough CPU figures for ``--smoke`` floors (not measured; only there to exercise the columns).
CPU_ROUGH_TFLOPS = 1.0
CPU_ROUGH_GBS = 50.0


# --------------------------------------------------------------------------------------------
# Workload sizes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """The workload of every stage.

    Attributes:
        prefill_tokens: prompt length of ``prefill`` and the context of the decode stages.
        decode_tokens: tokens generated per sequence in ``decode/*`` (``decode/b<N>``: batch N).
        steps: denoising steps of every decoder.
        guidance: classifier-free guidance of every decoder (> 1 doubles the UNet's batch).
        decode: each decoder's size options (``DecodeOptions`` fields).
        answer_tokens: free tokens of ``answer`` before its three forced signal runs.
    """

    prefill_tokens: int
    decode_tokens: int
    steps: int
    guidance: float
    decode: dict[str, dict[str, Any]]
    answer_tokens: int


FULL = Sizes(prefill_tokens=512, decode_tokens=64, steps=50, guidance=7.5,
             decode={"image": {"height": 512, "width": 512}, "audio": {"audio_length_s": 5.0},
                     "video": {"num_frames": 24, "height": 320, "width": 576}},
             answer_tokens=32)
SMOKE = Sizes(prefill_tokens=32, decode_tokens=4, steps=2, guidance=7.5,
              decode={"image": {}, "audio": {}, "video": {"num_frames": 2}}, answer_tokens=4)


# --------------------------------------------------------------------------------------------
# Hardware peaks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """The peaks the floors divide by (None: unknown, no floor of that kind)."""

    name: str
    peak_tflops: float | None
    bandwidth_gbs: float | None
    source: str

    @property
    def flops_per_s(self) -> float | None:
        return None if self.peak_tflops is None else self.peak_tflops * 1e12

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.bandwidth_gbs is None else self.bandwidth_gbs * 1e9


def known_gpu(name: str) -> tuple[str, float, float] | None:
    """``(label, TFLOP/s, GB/s)`` of the first :data:`KNOWN_GPUS` entry matching ``name``."""
    for pattern, label, tflops, gbs in KNOWN_GPUS:
        if re.search(pattern, name):
            return label, tflops, gbs
    return None


def resolve_hardware(device: torch.device, peak_tflops: float | None, bandwidth_gbs: float | None) -> Hardware:
    """The device's peaks: the table's (CUDA) or rough defaults (CPU), each overridable."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = known_gpu(name)
        if entry is None:
            base, label = (None, None), "unknown GPU, no floor"
            if peak_tflops is None or bandwidth_gbs is None:
                logger.warning("%s is not in KNOWN_GPUS: pass --peak-tflops and --bandwidth-gbs for its floors",
                               name)
        else:
            base, label = (entry[1], entry[2]), f"table: {entry[0]}"
    else:
        name = platform.processor() or platform.machine() or "cpu"
        base, label = (CPU_ROUGH_TFLOPS, CPU_ROUGH_GBS), "rough CPU default, not measured"
    tflops = peak_tflops if peak_tflops is not None else base[0]
    gbs = bandwidth_gbs if bandwidth_gbs is not None else base[1]
    sources = ["user-given" if value is not None else label for value in (peak_tflops, bandwidth_gbs)]
    source = sources[0] if sources[0] == sources[1] else f"peak: {sources[0]}; bandwidth: {sources[1]}"
    return Hardware(name=name, peak_tflops=tflops, bandwidth_gbs=gbs, source=source)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
class Meter:
    """Synchronised wall time and per-stage peak memory on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    @property
    def memory_kind(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated since the stage began"
        return "peak RSS of the process (getrusage ru_maxrss; never goes down)"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def held_gb(self) -> float:
        """Memory allocated now (CUDA: tensors; CPU: the process's current RSS), in GB."""
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated(self.device) / 1e9
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9

    def peak_gb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """``(seconds, fn())`` with the device synchronised before and after."""
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` (matmuls, convolutions, attention) by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@dataclass
class Row:
    """One stage's measurement next to its floor.

    Attributes:
        stage: the stage's name (:data:`STAGES`).
        workload: what was run.
        time_s: median seconds of the timed runs.
        peak_gb: peak memory (see :attr:`Meter.memory_kind`).
        floor_s: the hardware floor in seconds (None: peaks unknown).
        basis: what the floor divides (``FLOPs / peak``, ``bytes / HBM BW``, ``sum of parts``).
        work: the FLOPs or bytes the floor divides (None where it sums floors of both kinds).
        rate: the achieved rate in ``rate_unit`` (tokens/s for decode, TFLOP/s otherwise).
        floor_rate: the rate at the floor.
        extra: stage-specific details.
    """

    stage: str
    workload: str
    time_s: float
    peak_gb: float
    floor_s: float | None
    basis: str
    work: float | None
    rate: float
    rate_unit: str
    floor_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """time / floor."""
        return None if not self.floor_s else self.time_s / self.floor_s


def _floor(work: float, per_s: float | None) -> float | None:
    return None if per_s is None else work / per_s


# --------------------------------------------------------------------------------------------
# The system
# --------------------------------------------------------------------------------------------
def system_config(smoke: bool, sizes: Sizes, folder: Path, dtype: str) -> AnyGPTConfig:
    """The full-size ``nextgpt-7b`` config (``tiny`` for ``--smoke``) with the decoders' sizes,
    steps, guidance and dtype set from ``sizes``, so that ``answer`` decodes as the stages do."""
    from anygpt.config import AnyGPTConfig
    from anygpt.realsize import full_size_config, vicuna_tokenizer

    if smoke:
        config = AnyGPTConfig.from_name("tiny")
    else:
        config = full_size_config(vicuna_tokenizer(folder / "tokenizer"), llm_dtype=dtype)
    for modality in OUTPUTS:
        decoder = config.modalities[modality].decoder
        decoder.steps, decoder.guidance, decoder.dtype = sizes.steps, sizes.guidance, dtype
        for name, value in sizes.decode[modality].items():
            setattr(decoder, name, value)
    return config


@contextlib.contextmanager
def default_device(device: torch.device | None) -> Iterator[None]:
    """``device`` as torch's default device (None: leave it), through
    :func:`anygpt.realsize.on_device`."""
    from anygpt.realsize import on_device

    if device is None:
        yield
        return
    with on_device(device):
        yield


def build_pipeline(config: AnyGPTConfig, device: torch.device, dtype: torch.dtype, modalities: Sequence[str],
                   on_device: bool) -> AnyGPTPipeline:
    """The pipeline on ``device`` with the decoders of ``modalities`` loaded.

    Args:
        on_device: initialise the weights on ``device`` (fast on a GPU) rather than on the CPU
            and move them (the path every other script takes).
    """
    from anygpt.model import AnyGPTModel
    from anygpt.pipeline import AnyGPTPipeline

    start = time.perf_counter()
    with default_device(device if on_device else None):
        pipe = AnyGPTPipeline(AnyGPTModel.from_config(config)).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        for modality in modalities:
            pipe.decoder(modality)
    logger.info("built %s on %s in %.1f s (decoders: %s)", config.name, device, time.perf_counter() - start,
                ", ".join(modalities) or "none")
    return pipe


def media_batches(pipe: AnyGPTPipeline, files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Each input modality's sample file preprocessed at the encoder's geometry, batch 1
    (what ``AnyGPTModel.encode_items`` does before it encodes)."""
    import torch

    from anygpt.modalities import get_modality

    batches = {}
    for modality, path in files.items():
        spec = get_modality(modality)
        geometry = pipe.model.encoder.preprocess_options(spec.encoder_input)
        batches[modality] = torch.stack([spec.preprocess(spec.load(path), **geometry)])
    return batches


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------
class Bench:
    """The stages of one system on one device; floors' parts are counted once and cached."""

    def __init__(self, pipe: AnyGPTPipeline, sizes: Sizes, hardware: Hardware, meter: Meter,
                 files: dict[str, Path], repeats: int, warmup: bool):
        self.pipe, self.sizes, self.hw, self.meter = pipe, sizes, hardware, meter
        self.files, self.repeats, self.warmup = files, repeats, warmup
        self.batches = media_batches(pipe, files)
        self.lm = pipe.model.lm
        self._cached: dict[Any, float] = {}

    # Running -----------------------------------------------------------------------------
    def run(self, stage: str) -> Row:
        """Measure ``stage`` (one of :data:`STAGES`)."""
        group, _, name = stage.partition("/")
        method = getattr(self, "_" + group)
        self.meter.reset()
        held = self.meter.held_gb()
        row = method(name) if name else method()
        row.extra["held_gb_at_start"] = held
        logger.info("%s: %.4g s", stage, row.time_s)
        return row

    def _timed(self, fn: Callable[[], Any], warmup: Callable[[], Any] | None = None) -> tuple[float, Any]:
        """Median seconds of ``repeats`` synchronised runs of ``fn`` after one ``warmup`` run
        (default ``fn``); and the last run's result."""
        if self.warmup:
            self.meter.time(warmup or fn)
        times, result = [], None
        for _ in range(self.repeats):
            seconds, result = self.meter.time(fn)
            times.append(seconds)
        return statistics.median(times), result

    def _once(self, key: Any, fn: Callable[[], float]) -> float:
        if key not in self._cached:
            self._cached[key] = fn()
        return self._cached[key]

    # Encoders ----------------------------------------------------------------------------
    def encode_flops(self, modality: str) -> float:
        batch = self.batches[modality]
        encode = self.pipe.model.encode_media
        return self._once(("encode", modality), lambda: count_flops(lambda: encode(modality, batch)))

    def _encode(self, modality: str) -> Row:
        batch = self.batches[modality]
        seconds, _ = self._timed(lambda: self.pipe.model.encode_media(modality, batch))
        flops = self.encode_flops(modality)
        return self._compute_row(f"encode/{modality}", f"ImageBind, one preprocessed {modality} "
                                 f"{tuple(batch.shape)}",
                                 seconds, flops)

    def _compute_row(self, stage: str, workload: str, seconds: float, flops: float, **extra: Any) -> Row:
        floor = _floor(flops, self.hw.flops_per_s)
        return Row(stage, workload, seconds, self.meter.peak_gb(), floor, "FLOPs / peak", flops,
                   flops / seconds / 1e12, "TFLOP/s", self.hw.peak_tflops, extra)

    # LLM ---------------------------------------------------------------------------------
    def _prompt(self, batch: int = 1) -> torch.Tensor:
        """``(batch, prefill_tokens)`` random token ids, seeded."""
        import torch

        vocab = self.lm.model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (batch, self.sizes.prefill_tokens), generator=generator)
        return ids.to(self.lm.device)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self.lm.embed(ids)

    def _forward(self, **inputs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.lm.model(**inputs, use_cache=True, logits_to_keep=1)

    def llm_parameters(self) -> dict[str, int]:
        """``total``, ``embedding`` (the input table) and ``head`` (the output projection) counts."""
        model = self.lm.model
        return {"total": sum(p.numel() for p in model.parameters()),
                "embedding": model.get_input_embeddings().weight.numel(),
                "head": model.get_output_embeddings().weight.numel()}

    def prefill_flops_analytic(self, tokens: int) -> float:
        """``2 * params * tokens`` without the embedding table, the head for the last token only
        (attention's own FLOPs left out)."""
        params = self.llm_parameters()
        body = params["total"] - params["embedding"] - params["head"]
        return 2.0 * body * tokens + 2.0 * params["head"]

    def _prefill(self) -> Row:
        embeds = self._embed(self._prompt())
        seconds, _ = self._timed(lambda: self._forward(inputs_embeds=embeds))
        flops = self._once("prefill", lambda: count_flops(lambda: self._forward(inputs_embeds=embeds)))
        tokens = self.sizes.prefill_tokens
        return self._compute_row("prefill", f"LLM forward, {tokens} tokens, logits of the last", seconds, flops,
                                 analytic_flops=self.prefill_flops_analytic(tokens), tokens_per_s=tokens / seconds)

    def weight_bytes_per_step(self) -> float:
        """Bytes of LLM weights one decode step reads: all but the input embedding table."""
        model = self.lm.model
        table = model.get_input_embeddings().weight
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        return float(total - table.numel() * table.element_size())

    def kv_bytes_per_position(self) -> float:
        """Bytes of K and V one sequence position holds across all layers."""
        config = self.lm.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return 2.0 * config.num_hidden_layers * kv_heads * head_dim * self.lm.dtype.itemsize

    def decode_step_bytes(self, batch: int, context: float) -> float:
        """Bytes one decode step reads: the weights once, each sequence's KV cache of ``context``."""
        return self.weight_bytes_per_step() + batch * context * self.kv_bytes_per_position()

    def _decode_row(self, stage: str, workload: str, seconds: float, batch: int, steps: int, **extra: Any) -> Row:
        context = self.sizes.prefill_tokens + steps / 2  # the mean KV length over the steps
        step_bytes = self.decode_step_bytes(batch, context)
        step_floor = _floor(step_bytes, self.hw.bytes_per_s)
        floor = None if step_floor is None else steps * step_floor
        return Row(stage, workload, seconds, self.meter.peak_gb(), floor, "bytes / HBM BW", steps * step_bytes,
                   batch * steps / seconds, "tok/s", None if step_floor is None else batch / step_floor,
                   {"steps": steps, "batch": batch, "bytes_per_step": step_bytes, **extra})

    def _decode(self, name: str) -> Row:
        batch = int(name.removeprefix("b"))
        return self._decode_generate() if batch == 1 else self._decode_loop(batch)

    def _decode_generate(self) -> Row:
        """Batch 1 through our loop; its time is the loop's own clock (``LLMResult.decode_s``),
        which begins once the prefill is launched (any of it still running is included)."""
        from anygpt.config import SamplingSettings
        from anygpt.generation import generate

        ids = self._prompt()
        embeds = self._embed(ids)

        def answer(tokens: int):
            settings = SamplingSettings(max_new_tokens=tokens, do_sample=False, seed=0)
            return generate(self.lm, embeds, ids[0], settings)

        wall, result = self._timed(lambda: answer(self.sizes.decode_tokens), warmup=lambda: answer(2))
        steps = max(len(result.token_ids), 1)
        return self._decode_row("decode/b1", f"anygpt.generation.generate (its LLMResult.decode_s), {steps} "
                                f"greedy tokens after {self.sizes.prefill_tokens}", result.decode_s, 1, steps,
                                wall_s_with_prefill=wall, stop_reason=result.stop_reason)

    def _decode_loop(self, batch: int) -> Row:
        """A plain HF forward loop with a ``DynamicCache`` (our loop is batch 1 only); the
        prefill is outside the timed part."""
        from transformers import DynamicCache

        from anygpt.generation import cache_argument

        ids = self._prompt(batch)
        steps = self.sizes.decode_tokens

        def loop(count: int) -> float:
            cache = DynamicCache(config=self.lm.model.config)
            out = self._forward(input_ids=ids, **{cache_argument(): cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            self.meter.sync()
            start = time.perf_counter()
            for _ in range(count):
                out = self._forward(input_ids=token, **{cache_argument(): cache})
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            self.meter.sync()
            return time.perf_counter() - start

        _, seconds = self._timed(lambda: loop(steps), warmup=lambda: loop(2))
        return self._decode_row(f"decode/b{batch}", f"plain HF forward loop + DynamicCache (not our loop), batch "
                                f"{batch}, {steps} greedy tokens after {self.sizes.prefill_tokens}",
                                seconds, batch, steps)

    # Decoders ----------------------------------------------------------------------------
    def _condition(self, modality: str) -> torch.Tensor:
        import torch

        decoder = self.pipe.decoder(modality)
        generator = torch.Generator().manual_seed(0)
        return torch.randn(1, *decoder.condition_shape, generator=generator).to(decoder.device, decoder.dtype)

    def _decode_media(self, modality: str, steps: int) -> Any:
        return self.pipe.decoder(modality).decode(self._condition(modality), seed=0, steps=steps)

    def decoder_flops(self, modality: str) -> float:
        """FLOPs of one decode at ``sizes.steps``: counted at 2 and 3 steps, extrapolated."""
        def counted() -> float:
            two, three = (count_flops(lambda s=s: self._decode_media(modality, s)) for s in (2, 3))
            return two + (self.sizes.steps - 2) * (three - two)

        return self._once(("decoder", modality), counted)

    def _decoder(self, modality: str) -> Row:
        steps = self.sizes.steps
        seconds, _ = self._timed(lambda: self._decode_media(modality, steps),
                                 warmup=lambda: self._decode_media(modality, min(2, steps)))
        decoder = self.pipe.decoder(modality)
        options = {k: v for k, v in decoder.resolve_options({"steps": steps}).items() if v is not None}
        sizes = ", ".join(f"{k} {v}" for k, v in options.items() if k not in ("steps", "guidance"))
        name = (decoder.config.arch or {}).get("architecture") or f"{decoder.name} (tiny)"
        return self._compute_row(f"decoder/{modality}", f"{name}, {steps} steps, guidance {options['guidance']}"
                                 + (f", {sizes}" if sizes else ""), seconds, self.decoder_flops(modality),
                                 steps_per_s=steps / seconds)

    # The whole answer --------------------------------------------------------------------
    def _answer(self) -> Row:
        pipe, image = self.pipe, self.files["image"]

        def answer(tokens: int, **options: Any):
            return pipe(PROMPT, images=[image], outputs=OUTPUTS, max_new_tokens=tokens, do_sample=False, seed=0,
                        **options)

        seconds, out = self._timed(lambda: answer(self.sizes.answer_tokens),
                                   warmup=lambda: answer(1, steps=min(2, self.sizes.steps)))
        parts = self.answer_floor_parts(out.num_prompt_tokens, out.num_generated_tokens)
        floor = None if None in parts.values() else sum(parts.values())
        return Row("answer", f"AnyGPTPipeline: image + {out.num_prompt_tokens}-token prompt in; "
                   f"{out.num_generated_tokens} tokens, image, audio, video out", seconds, self.meter.peak_gb(),
                   floor, "sum of parts", None, 1.0 / seconds, "answers/s",
                   None if floor is None else 1.0 / floor,
                   {"floor_parts_s": parts, "timings_s": dict(out.timings),
                    "prompt_tokens": out.num_prompt_tokens, "generated_tokens": out.num_generated_tokens})

    def answer_floor_parts(self, prompt_tokens: int, generated: int) -> dict[str, float | None]:
        """The floor of each part of an answer: encode the image, prefill the prompt (analytic
        FLOPs), decode ``generated`` tokens at batch 1, run each decoder."""
        step = _floor(self.decode_step_bytes(1, prompt_tokens + generated / 2), self.hw.bytes_per_s)
        parts = {"encode/image": _floor(self.encode_flops("image"), self.hw.flops_per_s),
                 "prefill": _floor(self.prefill_flops_analytic(prompt_tokens), self.hw.flops_per_s),
                 "decode": None if step is None else generated * step}
        for modality in OUTPUTS:
            parts[f"decoder/{modality}"] = _floor(self.decoder_flops(modality), self.hw.flops_per_s)
        return parts


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def format_table(rows: Sequence[Row], hardware: Hardware, meter: Meter, system: str) -> str:
    """The rows as fixed-width text, with the system, the peaks and the memory's kind above them."""
    lines = [f"system: {system}",
             f"device: {hardware.name}; peak {_num(hardware.peak_tflops)} TFLOP/s, HBM "
             f"{_num(hardware.bandwidth_gbs)} GB/s ({hardware.source})",
             f"memory: {meter.memory_kind}",
             f"{'stage':<14} {'time s':>9} {'peak GB':>8} {'floor s':>9} {'x floor':>8}  "
             f"{'achieved / at floor':<28} {'floor basis':<15} workload"]
    lines.append("-" * len(lines[-1]))
    for row in rows:
        rate = f"{_num(row.rate)} / {_num(row.floor_rate)} {row.rate_unit}"
        lines.append(f"{row.stage:<14} {_num(row.time_s):>9} {_num(row.peak_gb, 3):>8} {_num(row.floor_s):>9} "
                     f"{_num(row.ratio, 3):>8}  {rate:<28} {row.basis:<15} {row.workload}")
    return "\n".join(lines)


def report(rows: Sequence[Row], hardware: Hardware, meter: Meter, system: str,
           args: argparse.Namespace) -> dict[str, Any]:
    """The JSON report: the peaks, the memory's kind and every row with its ratio."""
    import torch

    return {"system": system, "hardware": asdict(hardware), "memory_kind": meter.memory_kind, "smoke": args.smoke,
            "device": str(meter.device), "dtype": args.dtype, "torch": torch.__version__,
            "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def select_stages(names: Sequence[str]) -> list[str]:
    """Stages named, or in a named group (``encode``, ``decode``, ``decoder``), in table order."""
    unknown = [n for n in names if n not in STAGES and not any(s.startswith(n + "/") for s in STAGES)]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)} "
                         "or a group (encode, decode, decoder)")
    return [s for s in STAGES if s in names or s.split("/")[0] in names]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny preset on the CPU at tiny sizes and 2 steps (seconds; for CI)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE",
                        help=f"stages or groups to run (default: all): {', '.join(STAGES)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="weights dtype (default: bfloat16; float32 on the CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s (overrides the table)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="HBM GB/s (overrides the table)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per stage, median reported (default 1)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip each stage's warmup run")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode stage (default 64)")
    parser.add_argument("--build-on-device", action="store_true",
                        help="initialise the random weights on the device rather than on the CPU (faster)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as set)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage as it runs")
    args = parser.parse_args(argv)
    try:
        args.stages = select_stages(args.stages)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device is None:
        args.device = "cpu" if args.smoke else "cuda"
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


def needed_decoders(stages: Sequence[str]) -> list[str]:
    if "answer" in stages:
        return list(OUTPUTS)
    return [s.split("/")[1] for s in stages if s.startswith("decoder/")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    from anygpt.testing import write_sample_media

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (CPU) or --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    if args.decode_tokens:
        sizes = replace(sizes, decode_tokens=args.decode_tokens)
    meter = Meter(device)
    hardware = resolve_hardware(device, args.peak_tflops, args.bandwidth_gbs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = system_config(args.smoke, sizes, folder, args.dtype)
        pipe = build_pipeline(config, device, getattr(torch, args.dtype), needed_decoders(args.stages),
                              on_device=args.build_on_device)
        bench = Bench(pipe, sizes, hardware, meter, write_sample_media(folder / "media"), args.repeats, args.warmup)
        rows = [bench.run(stage) for stage in args.stages]
    system = f"{config.name} ({args.dtype}, {meter.device})"
    print(format_table(rows, hardware, meter, system), flush=True)
    result = report(rows, hardware, meter, system, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()

"""TargetCache at scale: build 200 000 tiny targets in shards, then read them back.

The text encoder is a **fake** (``_FakeTextEncoder``): a sinusoidal function of the caption's
number, so that encoding costs next to nothing and the benchmark measures the cache itself
(streaming writes, index merge, memory-mapped reads). It has a ``text_encoder`` module only so
that :meth:`TargetCache.decoder_id` can hash it, like a real decoder's.

Reports: peak RSS (the process's lifetime peak, ``getrusage``, and the RSS sampled during each
phase with psutil where installed, split into anonymous memory and file-backed pages of the
memory-mapped shards, which are the kernel's reclaimable page cache), shards written, build
throughput (targets/s), index load time, random-batch read throughput (rows/s) and a check that
the rows read back equal the encoder's output in the storage dtype. Exits 1 when the peak RSS exceeds ``--max-rss-mb``.

Example::

    python benchmarks/bench_target_cache.py                      # 200 000 × (8, 16) float16
    python benchmarks/bench_target_cache.py --rows 50000 --world-size 2 --json cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path


class _FakeTextEncoder:
    """FAKE decoder text encoder (labelled as such in the report): caption ``"caption <i> ..."``
    → ``sin(i · f)`` over ``prod(shape)`` frequencies, computed elementwise so that any batching
    gives the same values."""

    name = "fake-sinusoid"

    def __init__(self, shape: tuple[int, int], dtype):
        import torch

        self.condition_shape = shape
        self.dtype = dtype
        self.text_encoder = torch.nn.Linear(1, shape[0] * shape[1])  # hashed by decoder_id only
        self.frequencies = torch.linspace(0.001, 1.0, shape[0] * shape[1], dtype=torch.float64)

    def encode_text(self, captions):
        import torch

        ids = torch.tensor([int(c.split()[1]) for c in captions], dtype=torch.float64)
        return torch.sin(ids[:, None] * self.frequencies[None, :]).float().reshape(len(captions), *self.condition_shape)


class _RssSampler:
    """The largest resident set size seen (psutil, every 5 ms) while a phase runs."""

    def __init__(self):
        try:
            import psutil
        except ImportError:  # psutil is optional: only the getrusage peak is reported then
            self.process = None
        else:
            self.process = psutil.Process()
        self.peak = self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.process is not None:
            self.peak = self.process.memory_info().rss
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)
            anon, mapped = _rss_split()
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, mapped)

    def __exit__(self, *exc):
        if self.process is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def mb(self) -> float | None:
        return self.peak / 2**20 if self.process is not None else None

    def split_mb(self) -> str | None:
        """Peak anonymous (process-private) and file-backed (mapped shards, shared page cache) RSS."""
        if not self.peak_anon and not self.peak_file:
            return None
        return f"anon {self.peak_anon / 2**20:.0f} MB, file-backed {self.peak_file / 2**20:.0f} MB"


def _rss_split() -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes from /proc/self/status (Linux; zeros elsewhere)."""
    values = {"RssAnon:": 0, "RssFile:": 0}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key = line.split(None, 1)[0]
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values["RssAnon:"], values["RssFile:"]


def current_rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """The process's peak RSS so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from anygpt.alignment.targets import TargetCache
    from anygpt.dtypes import torch_dtype

    dtype = torch_dtype(args.dtype, "--dtype")
    encoder = _FakeTextEncoder(tuple(args.shape), dtype)
    ident = TargetCache.decoder_id(encoder)
    captions = [f"caption {i} of a tiny scene" for i in range(args.rows)]
    report: dict = {"encoder": "FAKE sinusoidal text encoder (benchmarks the cache, not a model)",
                    "rows": args.rows, "shape": list(args.shape), "dtype": args.dtype, "shard_size": args.shard_size,
                    "batch_size": args.batch_size, "world_size": args.world_size,
                    "rss_after_imports_mb": current_rss_mb()}

    cache = TargetCache(workdir)
    with _RssSampler() as sampler:
        start = time.perf_counter()
        if args.world_size == 1:
            encoded = cache.build(encoder, captions, batch_size=args.batch_size, shard_size=args.shard_size)
        else:  # the ranks' work one after another, as separate processes would do it side by side
            encoded = sum(TargetCache(workdir).build_part(encoder, captions, rank=r, world_size=args.world_size,
                                                          batch_size=args.batch_size, shard_size=args.shard_size)
                          for r in range(args.world_size))
            cache.merge(ident)
        build_s = time.perf_counter() - start
    assert encoded == args.rows, (encoded, args.rows)
    shards = sorted((workdir / ident).glob("*.safetensors"))
    report.update(build_s=build_s, build_targets_per_s=args.rows / build_s, build_peak_rss_mb=sampler.mb,
                  build_peak_rss_split=sampler.split_mb(),
                  shards_written=len(shards), bytes_on_disk=sum(s.stat().st_size for s in shards),
                  index_bytes=(workdir / ident / "index.jsonl").stat().st_size)

    del cache
    start = time.perf_counter()
    cache = TargetCache(workdir)
    report["index_load_s"] = time.perf_counter() - start
    assert len(cache) == args.rows

    rng = random.Random(0)
    batches = [rng.sample(captions, args.read_batch) for _ in range(args.read_batches)]
    with _RssSampler() as sampler:
        start = time.perf_counter()
        for batch in batches:
            cache.get(ident, batch)
        read_s = time.perf_counter() - start
    report.update(read_batch=args.read_batch, read_batches=args.read_batches, read_s=read_s,
                  read_rows_per_s=args.read_batch * args.read_batches / read_s, read_peak_rss_mb=sampler.mb,
                  read_peak_rss_split=sampler.split_mb())

    check = batches[0] + captions[-3:]
    report["rows_equal_encoder_output"] = bool(torch.equal(cache.get(ident, check),
                                                           encoder.encode_text(check).to(dtype)))
    report["again_encodes"] = cache.build(encoder, captions[: args.shard_size])  # all cached: 0
    report["peak_rss_mb"] = peak_rss_mb()
    report["max_rss_mb"] = args.max_rss_mb
    report["rss_ok"] = report["peak_rss_mb"] < args.max_rss_mb
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shape", type=int, nargs=2, default=[8, 16], metavar=("TOKENS", "WIDTH"))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--world-size", type=int, default=1, help="simulated processes (built one after another)")
    parser.add_argument("--read-batch", type=int, default=64)
    parser.add_argument("--read-batches", type=int, default=2000)
    parser.add_argument("--max-rss-mb", type=float, default=1024.0)
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench-targets-") as tmp:
            report = run(args, Path(tmp))
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.workdir)
    for key, value in report.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["rss_ok"] and report["rows_equal_encoder_output"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

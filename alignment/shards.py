"""WebDataset tar shards as a training source: conversion, per-rank streams and exact resume.

A shard set is a folder of ``*.tar`` files (plus ``shards.json``, the sample count of each, that
:func:`write_shards` writes), one ``.tar`` file, or a brace pattern
(``/data/cc3m/shard-{000000..000299}.tar``). Each sample is the tar members sharing a key:
``<key>.txt`` (the caption) and one media file per modality, named by a suffix that modality reads
(``<key>.jpg``, ``<key>.wav``, ``<key>.mp4``), the layout img2dataset and ``webdataset`` write.

:class:`ShardStream` reads them for one process of a run (stages 1 and 2):

* **order**: each epoch, the shards are permuted by ``(seed, epoch)`` and dealt round-robin to the
  processes; a process streams its shards through a seeded shuffle buffer. Every process stops
  after the same number of samples (the smallest process's share), so that all take the same
  number of steps; the rest of that epoch's samples are left out (different ones each epoch).
* **decoding in workers**: DataLoader worker ``w`` of ``W`` decodes and preprocesses the media of
  the batches ``w, w + W, …`` of the process's stream (it reads the others' bytes without
  decoding them), so that the loader yields the batches in stream order whatever ``W``; the main
  process only runs the frozen encoder on each batch (:class:`StreamBatcher`).
* **exact resume**: the stream is a pure function of ``(seed, epoch, rank)``, so the position is
  the number of batches consumed (``TrainState.batches``); resuming skips that many without
  decoding them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from anygpt.errors import ConfigError, MediaError
from anygpt.modalities import MODALITIES, get_modality, modality_for_suffix

from anygpt.alignment.config import is_shard_source
from anygpt.alignment.data import (STAGE1_PROMPTS, STAGE2_PROMPTS, AlignmentDataset, ManifestError, Sample,
                                   _decode_problem, collate)

if TYPE_CHECKING:
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["Shard", "ShardStream", "StreamBatcher", "is_shard_source", "list_shards", "write_shards",
           "collate_raw", "INDEX_FILE", "CAPTION_SUFFIX", "DEFAULT_SHARD_SIZE"]

#: The sample counts of a shard folder, written by :func:`write_shards`.
INDEX_FILE = "shards.json"
#: The tar member that holds a sample's caption.
CAPTION_SUFFIX = "txt"
DEFAULT_SHARD_SIZE = 10_000


@dataclass(frozen=True)
class Shard:
    """One tar file and how many samples it holds."""

    path: Path
    count: int


# =============================================================================================
# Listing shards
# =============================================================================================


def list_shards(source: str | os.PathLike) -> list[Shard]:
    """The shards ``source`` names, in name order, with their sample counts (from the folder's
    ``shards.json`` when there is one, else by reading each tar's member names).

    Raises:
        ManifestError: nothing is there, or a file is not a readable tar.
    """
    source = str(source)
    folder = Path(source).expanduser()
    if folder.is_dir():
        if (folder / INDEX_FILE).is_file():
            return _read_index(folder)
        paths = sorted(folder.glob("*.tar"))
    else:
        import braceexpand

        paths = [Path(p).expanduser() for p in braceexpand.braceexpand(source)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ManifestError(f"data.train {source}: {len(missing)} shard file(s) missing; check the path or "
                            f"pattern", missing[:5])
    if not paths:
        raise ManifestError(f"data.train {source}: no *.tar shards in this folder; convert image + caption pairs "
                            f"with `python -m anygpt.alignment.shards FOLDER OUT` (see alignment/README.md)")
    return [Shard(p.resolve(), _count(p)) for p in paths]


def _read_index(folder: Path) -> list[Shard]:
    file = folder / INDEX_FILE
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))["shards"]
        shards = [Shard((folder / e["file"]).resolve(), int(e["count"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{file}: not a shard index ({type(exc).__name__}: {exc}); delete it to count the "
                            f"shards from the tars, or rewrite the shards with write_shards") from exc
    missing = [str(s.path) for s in shards if not s.path.is_file()]
    if missing:
        raise ManifestError(f"{file}: lists shard(s) that are missing; restore them or rewrite the shards",
                            missing[:5])
    return shards


def _count(path: Path) -> int:
    """Samples (distinct keys) in one tar."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(path) as tar:
            return len({base_plus_ext(name)[0] for name in tar.getnames()} - {None})
    except (OSError, tarfile.TarError) as exc:
        raise ManifestError(f"{path}: not a readable tar shard ({exc})") from exc


# =============================================================================================
# Converting a folder of pairs
# =============================================================================================


def write_shards(folder: str | os.PathLike, output: str | os.PathLike, *, shard_size: int = DEFAULT_SHARD_SIZE,
                 on_error: str = "skip") -> list[Shard]:
    """Convert a folder of CC3M-style pairs to WebDataset shards.

    A pair is a media file (any suffix a modality reads: ``.jpg``, ``.png``, ``.wav``, ``.mp4``…)
    and a caption file of the same stem, ``<stem>.txt``, anywhere under ``folder``. Each media
    file is decoded once (a corrupt one is a bad pair), and the pairs are written in path order
    to ``output/shard-000000.tar``, … (``shard_size`` pairs each) with ``shards.json``.

    Args:
        on_error: ``skip`` logs each bad pair (no caption, empty caption, undecodable media) and
            leaves it out; ``fail`` raises listing them all.

    Raises:
        ManifestError: no usable pair, or (``fail``) any bad pair.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, not {shard_size}")
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    folder, output = Path(folder).expanduser().resolve(), Path(output).expanduser().resolve()
    pairs, problems = _pairs(folder)
    if problems and on_error == "fail":
        raise ManifestError(f"{folder}: {len(problems)} bad pair(s); fix them or pass on_error='skip'", problems)
    for problem in problems:
        logger.warning("%s", problem)
    if not pairs:
        raise ManifestError(f"{folder}: no usable media + caption pair; each media file needs a caption file "
                            f"of the same name ending in .txt", problems[:5])
    output.mkdir(parents=True, exist_ok=True)
    shards = [_write_shard(output / f"shard-{i // shard_size:06d}.tar", pairs[i:i + shard_size], first=i)
              for i in range(0, len(pairs), shard_size)]
    index = {"shards": [{"file": s.path.name, "count": s.count} for s in shards]}
    (output / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
    logger.info("wrote %d pair(s) in %d shard(s) to %s (%d bad pair(s) left out)", len(pairs), len(shards),
                output, len(problems))
    return shards


def _pairs(folder: Path) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """``(media file, modality, caption)`` of every good pair under ``folder``, and the problems."""
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such folder of media + caption pairs")
    pairs, problems = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        spec = modality_for_suffix(path.suffix) if path.suffix else None
        if spec is None:
            continue
        caption, problem = _caption(path.with_suffix(".txt"))
        problem = problem or _decode_problem(spec.name, path)
        if problem is None:
            pairs.append((path, spec.name, caption))
        else:
            problems.append(problem)
    return pairs, problems


def _caption(file: Path) -> tuple[str, str | None]:
    """The caption in ``file`` and, when it is not usable, why."""
    if not file.is_file():
        return "", f"{file}: no such caption file (each media file needs <stem>.txt beside it)"
    try:
        caption = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return "", f"{file}: cannot read the caption ({exc}); it must be UTF-8 text"
    return caption, None if caption else f"{file}: the caption is empty"


def _write_shard(path: Path, pairs: Sequence[tuple[Path, str, str]], first: int) -> Shard:
    from webdataset import TarWriter

    tmp = path.with_name(f".{path.name}.tmp")  # a crash leaves no shard that looks complete
    with TarWriter(str(tmp), encoder=False) as writer:
        for number, (media, _, caption) in enumerate(pairs, start=first):
            writer.write({"__key__": f"{number:09d}", media.suffix.lower().lstrip("."): media.read_bytes(),
                          CAPTION_SUFFIX: caption.encode("utf-8")})
    os.replace(tmp, path)
    return Shard(path, len(pairs))


# =============================================================================================
# The stream of one process
# =============================================================================================


class ShardStream(torch.utils.data.IterableDataset):
    """The samples of one process's shards, decoded in DataLoader workers (see the module doc).

    Args:
        shards: every shard of the run (:func:`list_shards`); each process gets its own.
        batch_size: samples per batch (the DataLoader's; workers take whole batches).
        decode: modality → the encoder's preprocessing geometry, for the media the stage feeds
            the encoder (stage 1); a stage that needs no pixels (2) passes none.
        keep: the modalities a sample's media may count as (others are ignored).
        rank, world_size: this process and how many there are.
        seed: seeds the shard order and the shuffle buffer.
        shuffle_buffer: samples held for shuffling within a process's stream (0: shard order).

    Yields dicts: ``key`` (``shard#key``), ``caption``, ``modalities`` (those present),
    ``inputs`` (modality → preprocessed tensor, for ``decode``'s) and ``position`` in the epoch.
    """

    def __init__(self, shards: Sequence[Shard], *, batch_size: int, decode: dict[str, dict[str, Any]],
                 keep: Sequence[str], rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, {world_size})")
        if len(shards) < world_size:
            raise ConfigError(f"data.train: {len(shards)} shard(s) for {world_size} processes; every process "
                              f"needs at least one: write smaller shards (write_shards(shard_size=…))")
        self.shards, self.batch_size, self.decode = list(shards), batch_size, dict(decode)
        self.keep, self.rank, self.world_size = tuple(keep), rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch, self.start = 0, 0

    # Positions ---------------------------------------------------------------------------------
    def _assignment(self, epoch: int) -> list[list[Shard]]:
        """The shards of every process in ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=generator).tolist()]
        return [order[r::self.world_size] for r in range(self.world_size)]

    def samples_per_epoch(self, epoch: int) -> int:
        """Samples every process takes in ``epoch`` (the smallest process's share)."""
        return min(sum(s.count for s in part) for part in self._assignment(epoch))

    def batches_per_epoch(self, epoch: int) -> int:
        return math.ceil(self.samples_per_epoch(epoch) / self.batch_size)

    def locate(self, consumed: int) -> tuple[int, int]:
        """``(epoch, batch within it)`` after ``consumed`` batches."""
        epoch = 0
        while consumed >= (size := self.batches_per_epoch(epoch)):
            if size == 0:
                raise ConfigError("data.train: the shards hold no samples; check the shard files")
            consumed -= size
            epoch += 1
        return epoch, consumed

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Stream ``epoch`` from its batch ``start`` on (before the DataLoader's workers start)."""
        self.epoch, self.start = epoch, start

    # Iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        limit = self.samples_per_epoch(self.epoch)
        seen = 0
        with tempfile.TemporaryDirectory(prefix="anygpt-shard-") as scratch:
            for position, raw in enumerate(self._raw(self.epoch)):
                if position >= limit:
                    return
                seen = position + 1
                batch = position // self.batch_size
                # Whole batches per worker, in turn: the loader then yields them in stream order.
                if batch >= self.start and (batch - self.start) % workers == worker:
                    yield {**self._sample(raw, Path(scratch)), "position": position}
        if seen == limit:
            return
        # Fewer samples than counted would give this process fewer steps than the others.
        raise ManifestError(f"data.train: process {self.rank}'s shards of epoch {self.epoch} hold {seen} samples, "
                            f"fewer than the {limit} their counts promise; delete a stale {INDEX_FILE} (the "
                            f"counts are then read from the tars) or rewrite the shards")

    def _raw(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This process's undecoded samples in ``epoch``, shuffled."""
        from webdataset.tariterators import tarfile_samples

        shards = self._assignment(epoch)[self.rank]
        samples = tarfile_samples([{"url": str(s.path)} for s in shards])
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        return _shuffled(samples, self.shuffle_buffer, rng)

    def _sample(self, raw: dict[str, Any], scratch: Path) -> dict[str, Any]:
        where = f"{raw['__url__']}#{raw['__key__']}"
        if CAPTION_SUFFIX not in raw:
            raise ManifestError(f"{where}: no {CAPTION_SUFFIX} caption; every sample needs <key>.txt (rewrite the "
                                f"shards with write_shards, which checks each pair)")
        media = self._media(raw)
        inputs = {m: self._preprocess(m, raw[suffix], suffix, scratch, where)
                  for m, suffix in media.items() if m in self.decode}
        return {"key": where, "caption": raw[CAPTION_SUFFIX].decode("utf-8").strip(),
                "modalities": sorted(media, key=MODALITIES.names().index), "inputs": inputs}

    def _media(self, raw: dict[str, Any]) -> dict[str, str]:
        """Modality → the member suffix of a raw sample's media (the modalities in ``keep``)."""
        media = {}
        for suffix in raw:
            spec = None if suffix.startswith("__") else modality_for_suffix(suffix)
            if spec is not None and spec.name in self.keep:
                media[spec.name] = suffix
        return media

    def _preprocess(self, modality: str, data: bytes, suffix: str, scratch: Path, where: str) -> torch.Tensor:
        # The modality loaders read files (audio and video decoders need one), so the bytes go
        # to a scratch file first; this keeps one decoding path for manifests and shards.
        file = scratch / f"media.{suffix}"
        file.write_bytes(data)
        spec = get_modality(modality)
        try:
            value = spec.load(file)
        except MediaError as exc:
            raise ManifestError(f"{where}: cannot decode the {modality} ({exc}); rewrite the shards with "
                                f"write_shards, which leaves out undecodable media") from exc
        return spec.preprocess(value, **self.decode[modality])

    def caption_samples(self) -> list[Sample]:
        """Every sample of every shard as a caption row, reading no media (the decoder targets are
        built from them before training)."""
        from webdataset.tariterators import tarfile_samples

        out = []
        for raw in tarfile_samples([{"url": str(s.path)} for s in self.shards]):
            if CAPTION_SUFFIX in raw:
                key, media = f"{raw['__url__']}#{raw['__key__']}", self._media(raw)
                out.append(Sample(line=len(out), caption=raw[CAPTION_SUFFIX].decode("utf-8").strip(),
                                  media={m: [Path(f"{key}.{m}")] for m in media}))
        return out


def _shuffled(items: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """``items`` through a shuffle buffer of ``size`` (a pure function of the items and ``rng``)."""
    if size <= 1:
        yield from items
        return
    buffer: list[dict] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def collate_raw(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of :class:`ShardStream` samples (in the worker): each modality's inputs stacked."""
    inputs = {}
    for modality in {m for s in samples for m in s["inputs"]}:
        rows = [i for i, s in enumerate(samples) if modality in s["inputs"]]
        inputs[modality] = (torch.stack([samples[i]["inputs"][modality] for i in rows]), rows)
    return {"keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples],
            "modalities": [s["modalities"] for s in samples], "inputs": inputs,
            "positions": [s["position"] for s in samples]}


# =============================================================================================
# The main process's side
# =============================================================================================


class StreamBatcher:
    """Turns a :func:`collate_raw` batch into a training batch (:func:`alignment.data.collate`):
    the frozen encoder embeds the batch's media, and the stage's dialogues are tokenised by
    :class:`AlignmentDataset`, exactly as for a manifest."""

    def __init__(self, model: "AnyGPTModel", stage: int, pad_id: int, modalities: Sequence[str] | None = None):
        if stage not in (1, 2):
            raise ConfigError(f"stage {stage}: WebDataset shards hold caption pairs, for stages 1 and 2; "
                              f"stage 3 reads a dialogue manifest (.jsonl)")
        self.model, self.stage, self.pad_id, self.modalities = model, stage, pad_id, modalities
        self.prompts = STAGE1_PROMPTS if stage == 1 else STAGE2_PROMPTS

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        samples = [Sample(line=i, caption=caption, media={m: [Path(f"{key}.{m}")] for m in mods})
                   for i, (key, caption, mods) in enumerate(zip(raw["keys"], raw["captions"], raw["modalities"]))]
        # Prompts rotate over the epoch's stream, as over a manifest's rows, not restarting per batch.
        shift = raw["positions"][0] % len(self.prompts)
        dataset = AlignmentDataset(samples, self.stage, self.model, modalities=self.modalities,
                                   prompts=self.prompts[shift:] + self.prompts[:shift], encode_batch_size=None)
        for modality, (batch, rows) in raw["inputs"].items():
            embeddings = self.model.encode_media(modality, batch).detach().float().cpu()
            dataset.embeddings.update({samples[r].media[modality][0]: e for r, e in zip(rows, embeddings)})
        return collate([dataset[i] for i in range(len(dataset))], self.pad_id)


def stream_plan(model: "AnyGPTModel", stage: int, modalities: Sequence[str] | None) -> tuple[dict, list[str]]:
    """What a stage's workers decode (modality → encoder geometry) and which media they keep."""
    if stage == 1:
        keep = list(modalities or model.input_projectors)
        geometry = {m: model.encoder.preprocess_options(get_modality(m).encoder_input) for m in keep}
        return geometry, keep
    return {}, list(modalities or model.output_projectors)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anygpt.alignment.shards FOLDER OUT [--shard-size N] [--on-error skip|fail]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m anygpt.alignment.shards",
                                     description="Convert a folder of media + caption (.txt) pairs to "
                                                 "WebDataset shards for data.train.")
    parser.add_argument("folder", type=Path, help="folder of <stem>.jpg (or any media) + <stem>.txt pairs")
    parser.add_argument("output", type=Path, help="folder for shard-NNNNNN.tar and shards.json")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="pairs per shard")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="what to do with a bad pair")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shards = write_shards(args.folder, args.output, shard_size=args.shard_size, on_error=args.on_error)
    logger.info("data.train: %s (%d samples)", args.output, sum(s.count for s in shards))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

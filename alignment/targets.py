"""Decoding-side alignment targets: each decoder's native text conditioning of the captions.

The decoders' text encoders are frozen, so a caption's target never changes: it is computed once
(:meth:`TargetCache.build`) and read back from memory-mapped shards during training
(:meth:`TargetCache.get`). Targets are keyed by ``(decoder_id, caption)``, where the id hashes
the text encoder's weights, so a different decoder never reuses another's targets.

Layout (format ``anygpt-targets-2``)::

    <directory>/<decoder_id>/
        index.jsonl                 one line per caption: {"caption": ..., "shard": ..., "row": ...}
        <digest>.safetensors        one tensor "targets" (rows, *condition_shape) in the storage
                                    dtype; metadata {"format", "decoder_id"}; at most shard_size rows
        parts/<rank>-....jsonl      per-process index lines of a build in progress (merged, removed)

A build is streamed: captions are encoded ``batch_size`` at a time and written straight into the
shard file, so memory holds one batch, never a shard or the whole set. Under several processes
each one writes the shards of its deterministic slice of the missing captions and its own part
file; the main process then merges the parts into ``index.jsonl`` through a temporary file and a
rename, so a reader sees the old index or the new one, never a torn one. Only ``index.jsonl``
says which targets exist: a shard it does not name (left by a crash) is ignored.

Caches written before (format ``anygpt-targets-1``: ``<directory>/<decoder_id>-<digest>.safetensors``
with the captions as JSON in the header) are still read; new targets go to the format above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from anygpt.errors import AnyGPTError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["TargetCache", "MissingTargetsError", "DEFAULT_SHARD_SIZE"]

FORMAT = "anygpt-targets-2"
LEGACY_FORMAT = "anygpt-targets-1"
INDEX = "index.jsonl"
PARTS = "parts"
#: Rows per shard unless told otherwise: 10 000 SD-1.5 targets (77×768 fp16) are ~1.2 GB.
DEFAULT_SHARD_SIZE = 10_000
#: safetensors dtype name → (numpy dtype the bytes are mapped as, torch dtype they are).
#: numpy has no bfloat16, so its bytes are mapped as int16 and reinterpreted by torch.
_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "F32": ("float32", torch.float32), "F16": ("float16", torch.float16),
    "BF16": ("int16", torch.bfloat16), "F64": ("float64", torch.float64),
}
_NAMES = {torch_type: name for name, (_, torch_type) in _DTYPES.items()}
_ROW_BITS = 32  # a location is shard_number << 32 | row: one int per caption keeps the index small
_IDS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


class MissingTargetsError(AnyGPTError, KeyError):
    """Captions asked of a :class:`TargetCache` that were never built."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class TargetCache:
    """Decoders' native text conditionings of captions, computed once, stored as fixed-size
    safetensors shards under ``directory`` with a JSONL caption index, keyed by
    ``(decoder_id, caption)``.

    Example::

        cache = TargetCache("runs/targets")
        cache.build(pipe.decoder("image"), captions)          # encodes only what is missing
        target = cache.get(TargetCache.decoder_id(pipe.decoder("image")), batch_captions)

    Args:
        directory: the cache folder (created by the first build).
        max_open_shards: shards kept memory-mapped at once (the least recently read is closed).
    """

    def __init__(self, directory: str | Path, *, max_open_shards: int = 64):
        self.directory = Path(directory).expanduser()
        self.max_open_shards = max(1, int(max_open_shards))
        self._index: dict[str, dict[str, int]] = {}  # decoder id → caption → location
        self._shards: list[Path] = []
        self._numbers: dict[Path, int] = {}
        self._maps: OrderedDict[int, tuple["np.memmap", torch.dtype]] = OrderedDict()
        self.reload()

    # Identity --------------------------------------------------------------------------------
    @staticmethod
    def decoder_id(decoder: Any) -> str:
        """A stable id of ``decoder``'s text conditioning: its registry name, condition shape and
        a hash of its text encoder's weights (computed once per decoder object)."""
        cached = _IDS.get(decoder)
        if cached is not None:
            return cached
        digest = hashlib.sha256(repr(tuple(decoder.condition_shape)).encode())
        for name, tensor in sorted(_text_encoder(decoder).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        ident = f"{getattr(decoder, 'name', type(decoder).__name__)}-{digest.hexdigest()[:16]}"
        try:
            _IDS[decoder] = ident
        except TypeError:  # not weak-referenceable: just recompute next time
            pass
        return ident

    # Loading the index -----------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read every index (and format-1 shard) under the directory, e.g. after another
        process merged a build."""
        self._index.clear()
        self._shards.clear()
        self._numbers.clear()
        self._maps.clear()
        if not self.directory.is_dir():
            return
        for folder in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            if (folder / INDEX).is_file():
                self._load_index(folder)
        legacy = 0
        for shard in sorted(self.directory.glob("*.safetensors")):
            legacy += self._add_legacy_shard(shard)
        if legacy:
            logger.info("%s: read %d target(s) from format-1 shard(s); new targets are written as %s",
                        self.directory, legacy, FORMAT)

    def _load_index(self, folder: Path) -> None:
        ident, present = folder.name, {p.name for p in folder.glob("*.safetensors")}
        table = self._index.setdefault(ident, {})
        torn = lost = 0
        for entry in _entries(folder / INDEX):
            if entry is None:
                torn += 1
            elif entry["shard"] not in present:
                lost += 1
            else:
                number = self._shard_number(folder / entry["shard"])
                table.setdefault(entry["caption"], number << _ROW_BITS | entry["row"])
        if torn:
            logger.warning("%s: %d unreadable line(s) ignored", folder / INDEX, torn)
        if lost:
            logger.warning("%s: %d target(s) point to missing shards and are ignored; the next "
                           "TargetCache.build re-encodes them", folder / INDEX, lost)

    def _add_legacy_shard(self, shard: Path) -> int:
        """Index a format-1 shard's captions (metadata only; tensors are read on demand)."""
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as handle:
                meta = handle.metadata() or {}
            ident, captions = meta["decoder_id"], json.loads(meta["captions"])
        except Exception as exc:  # a foreign or damaged file must not stop training
            logger.warning("%s: not a target shard, ignored (%s); delete it if it is damaged", shard, exc)
            return 0
        number, table = self._shard_number(shard), self._index.setdefault(ident, {})
        for row, caption in enumerate(captions):
            table.setdefault(caption, number << _ROW_BITS | row)
        return len(captions)

    def _shard_number(self, shard: Path) -> int:
        number = self._numbers.get(shard)
        if number is None:
            number = self._numbers[shard] = len(self._shards)
            self._shards.append(shard)
        return number

    # Building --------------------------------------------------------------------------------
    def missing(self, decoder_id: str, captions: Sequence[str]) -> list[str]:
        """The distinct ``captions`` with no cached target for ``decoder_id``, in first-seen order."""
        table = self._index.get(decoder_id, {})
        return [c for c in dict.fromkeys(captions) if c not in table]

    def build(self, decoder: Any, captions: Sequence[str], *, batch_size: int = 32,
              shard_size: int = DEFAULT_SHARD_SIZE, dtype: str | torch.dtype | None = None,
              accelerator: Any = None) -> int:
        """Encode the captions not yet cached for ``decoder`` into new shards and index them.

        Shards are written to temporary files and renamed, and the index is replaced by a rename,
        so an interrupted build leaves the cache as it was (plus unindexed shards that the next
        build reuses).

        Args:
            decoder: the decoder whose ``encode_text`` makes the targets.
            captions: every caption that will be asked for (duplicates and cached ones are skipped).
            batch_size: captions per ``encode_text`` call.
            shard_size: most rows per shard file.
            dtype: storage dtype (``float16``, ``bfloat16``, ``float32``); default the decoder's.
            accelerator: an ``accelerate.Accelerator`` to split the work across its processes:
                every process must call ``build`` with the same captions; each encodes its slice,
                the main process merges the index, and all return once it is merged.

        Returns:
            How many captions were encoded, by all processes together (0 when all were cached).
        """
        ident = self.decoder_id(decoder)
        world = 1 if accelerator is None else int(accelerator.num_processes)
        if world == 1:
            self.merge(ident)  # index what a crashed build finished before asking what is missing
            count = len(self.missing(ident, captions))
            self.build_part(decoder, captions, batch_size=batch_size, shard_size=shard_size, dtype=dtype)
            self.merge(ident)
            return count
        # Every process reads the same index (it changes only between the barriers below), so
        # they agree on what is missing and on its split.
        count = len(self.missing(ident, captions))
        self.build_part(decoder, captions, rank=int(accelerator.process_index), world_size=world,
                        batch_size=batch_size, shard_size=shard_size, dtype=dtype)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.merge(ident)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            self.reload()
        return count

    def build_part(self, decoder: Any, captions: Sequence[str], *, rank: int = 0, world_size: int = 1,
                   batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE,
                   dtype: str | torch.dtype | None = None) -> int:
        """Encode process ``rank``'s share of the missing captions into shards and a part index.

        The missing captions (:meth:`missing`) are cut into consecutive shards of ``shard_size``
        rows (smaller when there are fewer than ``shard_size`` per process, so that every process
        gets work), dealt out round-robin: process ``rank`` writes shards ``rank``,
        ``rank + world_size``, .... The targets become readable after :meth:`merge`.

        Returns:
            How many captions this process encoded.

        Raises:
            ValueError: a size or rank is out of range.
            AnyGPTError: a target is not finite in the storage dtype, or encode_text returned
                the wrong number of rows or shapes that differ.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, not {shard_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        ident = self.decoder_id(decoder)
        storage = _storage_dtype(decoder, dtype)
        missing = self.missing(ident, captions)
        plan = _plan(len(missing), shard_size, world_size)[rank::world_size]
        if not plan:
            return 0
        folder = self.directory / ident
        (folder / PARTS).mkdir(parents=True, exist_ok=True)
        part = folder / PARTS / f"{rank:05d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        written = 0
        with part.open("a", encoding="utf-8") as index:
            for start, stop in plan:
                chunk = missing[start:stop]
                shard = self._write_shard(folder, ident, decoder, chunk, storage, batch_size)
                # Index lines follow the shard's rename, so a part never names a shard that is not whole.
                index.writelines(json.dumps({"caption": c, "shard": shard.name, "row": r}, ensure_ascii=False) + "\n"
                                 for r, c in enumerate(chunk))
                index.flush()
                os.fsync(index.fileno())
                written += len(chunk)
        logger.info("rank %d/%d encoded %d caption target(s) for %s into %d shard(s) under %s", rank, world_size,
                    written, ident, len(plan), folder)
        return written

    def _write_shard(self, folder: Path, ident: str, decoder: Any, captions: list[str],
                     storage: torch.dtype | None, batch_size: int) -> Path:
        """Stream ``captions``' targets into one shard: header first, then each batch's bytes."""
        digest = hashlib.sha256(f"{ident}\0{storage}\0".encode())
        for caption in captions:
            digest.update(json.dumps(caption).encode() + b"\n")
        shard = folder / f"{digest.hexdigest()[:20]}.safetensors"
        if _whole_shard(shard, len(captions)):  # a crashed build finished it: nothing to encode
            return shard
        tmp = shard.with_name(f".{shard.name}.tmp{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                shape: tuple[int, ...] | None = None
                for start in range(0, len(captions), batch_size):
                    batch = captions[start:start + batch_size]
                    block = _encode(decoder, batch, storage, ident)
                    if shape is None:
                        shape = tuple(block.shape[1:])
                        _write_header(out, ident, block.dtype, (len(captions), *shape))
                    elif tuple(block.shape[1:]) != shape:
                        raise AnyGPTError(f"decoder {ident}: encode_text returned targets of shape "
                                          f"{tuple(block.shape[1:])} after {shape}; a decoder's conditionings "
                                          f"must all have its condition_shape")
                    out.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, shard)
        finally:
            tmp.unlink(missing_ok=True)
        return shard

    def merge(self, decoder_id: str | None = None) -> int:
        """Merge the part indexes of finished builds into ``index.jsonl`` (main process only).

        The merged index is written to a temporary file, synced and renamed over the old one, so
        a crash leaves the old index valid; the parts are removed only after the rename (a part
        merged twice adds nothing, as captions already indexed are skipped).

        Args:
            decoder_id: merge only this decoder's parts (default: every decoder's).

        Returns:
            How many captions were added to the index.
        """
        if not self.directory.is_dir():
            return 0
        folders = [self.directory / decoder_id] if decoder_id else sorted(p for p in self.directory.iterdir()
                                                                            if p.is_dir())
        added, merged = 0, False
        for folder in folders:
            parts = sorted((folder / PARTS).glob("*.jsonl")) if (folder / PARTS).is_dir() else []
            if parts:
                added += _merge_folder(folder, parts)
                merged = True
        if merged:
            self.reload()
        return added

    # Reading ---------------------------------------------------------------------------------
    def get(self, decoder_id: str, captions: Sequence[str]) -> torch.Tensor:
        """The cached targets of ``captions``: (B, *condition_shape) on the CPU, in the storage
        dtype (rows are read from memory-mapped shards; only the asked rows are copied).

        Raises:
            MissingTargetsError: a caption was never built for ``decoder_id``.
            AnyGPTError: a shard is damaged (the message says which, and how to rebuild it).
        """
        import numpy as np

        if isinstance(captions, str) or not captions:
            raise ValueError("get expects a non-empty list of captions")
        table = self._index.get(decoder_id, {})
        missing = [c for c in captions if c not in table]
        if missing:
            raise MissingTargetsError(
                f"{len(missing)} caption(s) have no cached target for decoder {decoder_id} in "
                f"{self.directory} (first: {missing[0]!r}); run TargetCache.build(decoder, captions) "
                f"with every training caption first")
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, caption in enumerate(captions):
            location = table[caption]
            by_shard.setdefault(location >> _ROW_BITS, []).append((i, location & ((1 << _ROW_BITS) - 1)))
        blocks = []
        for number, wanted in by_shard.items():
            array, torch_type = self._map(number)
            rows = np.fromiter((row for _, row in wanted), dtype=np.int64, count=len(wanted))
            if rows.size and int(rows.max()) >= array.shape[0]:
                raise AnyGPTError(f"{self._shards[number]}: the index names row {int(rows.max())} of a shard of "
                                  f"{array.shape[0]} rows; delete {self._shards[number].parent} and run "
                                  f"TargetCache.build again")
            block = torch.from_numpy(np.ascontiguousarray(array[rows]))  # copies only these rows
            blocks.append(([i for i, _ in wanted], block.view(torch_type) if block.dtype != torch_type else block))
        dtype = blocks[0][1].dtype
        for _, block in blocks[1:]:
            dtype = torch.promote_types(dtype, block.dtype)
        out = torch.empty((len(captions), *blocks[0][1].shape[1:]), dtype=dtype)
        for positions, block in blocks:
            out[positions] = block.to(dtype)
        return out

    def _map(self, number: int) -> tuple["np.memmap", torch.dtype]:
        """Shard ``number`` memory-mapped (opened once, kept in a small LRU)."""
        found = self._maps.get(number)
        if found is not None:
            self._maps.move_to_end(number)
            return found
        found = self._maps[number] = _open_shard(self._shards[number])
        while len(self._maps) > self.max_open_shards:
            self._maps.popitem(last=False)
        return found

    def shards(self, decoder_id: str | None = None) -> list[Path]:
        """The shard files the index names (of ``decoder_id``, or of every decoder)."""
        tables = [self._index.get(decoder_id, {})] if decoder_id else list(self._index.values())
        numbers = sorted({location >> _ROW_BITS for table in tables for location in table.values()})
        return [self._shards[n] for n in numbers]

    def __contains__(self, key: tuple[str, str]) -> bool:
        ident, caption = key
        return caption in self._index.get(ident, {})

    def __len__(self) -> int:
        return sum(map(len, self._index.values()))

    def __repr__(self) -> str:
        return f"TargetCache({str(self.directory)!r}, {len(self)} target(s))"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()  # memory maps do not pickle; reopened on first read
        return state


# =============================================================================================
# Shard files
# =============================================================================================


def _plan(count: int, shard_size: int, world_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard over ``count`` missing captions."""
    rows = min(shard_size, max(1, -(-count // world_size)))
    return [(start, min(start + rows, count)) for start in range(0, count, rows)]


def _storage_dtype(decoder: Any, dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype to store targets in: ``dtype``, else the decoder's; None keeps encode_text's."""
    from anygpt.dtypes import torch_dtype

    if dtype is not None:
        return torch_dtype(dtype, "TargetCache dtype")
    found = getattr(decoder, "dtype", None)
    return found if isinstance(found, torch.dtype) and found in _NAMES else None


def _encode(decoder: Any, captions: list[str], storage: torch.dtype | None, ident: str) -> torch.Tensor:
    with torch.no_grad():
        block = decoder.encode_text(captions).detach()
    block = (block.to("cpu") if storage is None else block.to("cpu", storage)).contiguous()
    if block.shape[0] != len(captions):
        raise AnyGPTError(f"decoder {ident}: encode_text returned {block.shape[0]} rows for {len(captions)} captions")
    if block.dtype not in _NAMES:
        raise AnyGPTError(f"decoder {ident}: targets of dtype {block.dtype} cannot be stored; pass "
                          f"dtype='float32', 'float16' or 'bfloat16' to TargetCache.build")
    if block.is_floating_point() and not bool(torch.isfinite(block).all()):
        bad = int((~torch.isfinite(block.reshape(len(captions), -1))).any(1).nonzero()[0, 0])
        raise AnyGPTError(f"decoder {ident}: the target of {captions[bad]!r} is not finite in {block.dtype} (it "
                          f"overflows, or the encoder returned inf/nan); pass dtype='float32' or 'bfloat16' to "
                          f"TargetCache.build")
    return block


def _write_header(out: Any, ident: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """The safetensors header of a one-tensor file, padded to 8 bytes as safetensors does."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    header = json.dumps({"__metadata__": {"format": FORMAT, "decoder_id": ident},
                         "targets": {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    out.write(struct.pack("<Q", len(header)))
    out.write(header)


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts."""
    with path.open("rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        if not 0 < size < 100_000_000:
            raise ValueError(f"header size {size} is implausible")
        return json.loads(handle.read(size)), 8 + size


def _open_shard(path: Path) -> tuple["np.memmap", torch.dtype]:
    """Memory-map a shard's ``targets`` tensor (read-only: nothing is read until rows are)."""
    import numpy as np

    try:
        header, data = _read_header(path)
        info = header["targets"]
        numpy_type, torch_type = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * np.dtype(numpy_type).itemsize or path.stat().st_size < data + end:
            raise ValueError("the file is shorter than its header says")
        return np.memmap(path, dtype=numpy_type, mode="r", offset=data + begin, shape=shape), torch_type
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise AnyGPTError(f"{path}: damaged target shard ({exc}); delete it and run TargetCache.build again "
                          f"to re-encode its captions") from exc


def _whole_shard(path: Path, rows: int) -> bool:
    """Whether ``path`` is a finished shard of ``rows`` rows (files are renamed into place whole)."""
    try:
        header, data = _read_header(path)
        info = header["targets"]
        return (header.get("__metadata__", {}).get("format") == FORMAT and info["shape"][0] == rows
                and path.stat().st_size >= data + info["data_offsets"][1])
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


# =============================================================================================
# Index files
# =============================================================================================


def _entries(path: Path) -> Iterator[dict | None]:
    """An index file's entries, one line at a time (None for a line that does not parse: a part
    file's last line, torn by a crash)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                caption, shard, row = entry["caption"], entry["shard"], entry["row"]
                if isinstance(caption, str) and isinstance(shard, str) and isinstance(row, int) and row >= 0:
                    yield entry
                    continue
            except (ValueError, KeyError, TypeError):
                pass
            yield None


def _merge_folder(folder: Path, parts: list[Path]) -> int:
    """Write ``folder``'s index plus ``parts``' new entries to a temporary file, rename it over the
    index, then remove the parts. Returns how many captions were added."""
    index, present = folder / INDEX, {p.name for p in folder.glob("*.safetensors")}
    tmp = folder / f".{INDEX}.tmp{os.getpid()}"
    seen: set[str] = set()
    added = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            sources = ([index] if index.is_file() else []) + parts
            for source in sources:
                for entry in _entries(source):
                    if entry is None or entry["caption"] in seen or entry["shard"] not in present:
                        continue
                    seen.add(entry["caption"])
                    out.write(json.dumps({"caption": entry["caption"], "shard": entry["shard"], "row": entry["row"]},
                                         ensure_ascii=False) + "\n")
                    added += source is not index
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, index)
        _fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    for part in parts:
        part.unlink(missing_ok=True)
    logger.info("%s: merged %d part(s), %d new target(s), %d in all", index, len(parts), added, len(seen))
    return added


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _text_encoder(decoder: Any) -> torch.nn.Module:
    """The module whose weights determine ``decoder.encode_text``."""
    pipeline = getattr(decoder, "pipeline", None)
    module = getattr(decoder, "text_encoder", None) or getattr(pipeline, "text_encoder", None)
    if not isinstance(module, torch.nn.Module):
        raise AnyGPTError(f"{type(decoder).__name__} has no text encoder module (decoder.pipeline.text_encoder); "
                          f"TargetCache needs one to identify the decoder's targets")
    return module

"""Decoding-side alignment targets: each decoder's native text conditioning of the captions.

The decoders' text encoders are frozen, so a caption's target never changes: it is computed once
(:meth:`TargetCache.build`) and read back from safetensors shards during training
(:meth:`TargetCache.get`). Targets are keyed by ``(decoder_id, caption)``, where the id hashes
the text encoder's weights, so a different decoder never reuses another's targets.

Layout: ``<directory>/<decoder_id>-<digest>.safetensors``, each holding one tensor ``targets``
(N, *condition_shape) and metadata ``{"decoder_id", "captions" (JSON list, row order)}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch

from anygpt.errors import AnyGPTError

logger = logging.getLogger(__name__)

__all__ = ["TargetCache", "MissingTargetsError"]

FORMAT = "anygpt-targets-1"
_IDS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


class MissingTargetsError(AnyGPTError, KeyError):
    """Captions asked of a :class:`TargetCache` that were never built."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class TargetCache:
    """Decoders' native text conditionings of captions, computed once, stored as safetensors
    shards under ``directory``, keyed by ``(decoder_id, caption)``.

    Example::

        cache = TargetCache("runs/targets")
        cache.build(pipe.decoder("image"), captions)          # encodes only what is missing
        target = cache.get(TargetCache.decoder_id(pipe.decoder("image")), batch_captions)
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self._index: dict[tuple[str, str], tuple[Path, int]] = {}
        if self.directory.is_dir():
            for shard in sorted(self.directory.glob("*.safetensors")):
                self._add_shard(shard)

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

    # Building --------------------------------------------------------------------------------
    def build(self, decoder: Any, captions: Sequence[str], *, batch_size: int = 32) -> int:
        """Encode the captions not yet cached for ``decoder`` and store them in a new shard.

        The shard is written to a temporary file and renamed, so an interrupted build leaves
        no partial shard behind.

        Returns:
            How many captions were encoded (0 when all were cached).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        ident = self.decoder_id(decoder)
        missing = [c for c in dict.fromkeys(captions) if (ident, c) not in self]
        if not missing:
            return 0
        chunks = [decoder.encode_text(missing[i:i + batch_size]).detach().cpu()
                  for i in range(0, len(missing), batch_size)]
        self._write_shard(ident, missing, torch.cat(chunks))
        logger.info("encoded %d caption target(s) for %s into %s", len(missing), ident, self.directory)
        return len(missing)

    def _write_shard(self, ident: str, captions: list[str], targets: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:12]
        shard = self.directory / f"{ident}-{digest}.safetensors"
        tmp = shard.with_name(f".{shard.name}.tmp{os.getpid()}")
        metadata = {"format": FORMAT, "decoder_id": ident, "captions": json.dumps(captions)}
        try:
            save_file({"targets": targets.contiguous()}, str(tmp), metadata=metadata)
            os.replace(tmp, shard)
        finally:
            tmp.unlink(missing_ok=True)
        self._add_shard(shard)

    def _add_shard(self, shard: Path) -> None:
        """Index a shard's captions (metadata only; tensors are read on demand)."""
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as handle:
                meta = handle.metadata() or {}
            ident, captions = meta["decoder_id"], json.loads(meta["captions"])
        except Exception as exc:  # a foreign or damaged file must not stop training
            logger.warning("%s: not a target shard, ignored (%s); delete it if it is damaged", shard, exc)
            return
        for row, caption in enumerate(captions):
            self._index.setdefault((ident, caption), (shard, row))

    # Reading ---------------------------------------------------------------------------------
    def get(self, decoder_id: str, captions: Sequence[str]) -> torch.Tensor:
        """The cached targets of ``captions``: (B, *condition_shape) on the CPU.

        Raises:
            MissingTargetsError: a caption was never built for ``decoder_id``.
        """
        from safetensors import safe_open

        if isinstance(captions, str) or not captions:
            raise ValueError("get expects a non-empty list of captions")
        missing = [c for c in captions if (decoder_id, c) not in self._index]
        if missing:
            raise MissingTargetsError(
                f"{len(missing)} caption(s) have no cached target for decoder {decoder_id} in "
                f"{self.directory} (first: {missing[0]!r}); run TargetCache.build(decoder, captions) "
                f"with every training caption first")
        rows: list[torch.Tensor | None] = [None] * len(captions)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, caption in enumerate(captions):
            shard, row = self._index[(decoder_id, caption)]
            by_shard.setdefault(shard, []).append((i, row))
        for shard, wanted in by_shard.items():
            with safe_open(str(shard), framework="pt") as handle:
                table = handle.get_slice("targets")
                for i, row in wanted:
                    rows[i] = table[row:row + 1][0]
        return torch.stack(rows)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"TargetCache({str(self.directory)!r}, {len(self)} target(s))"


def _text_encoder(decoder: Any) -> torch.nn.Module:
    """The module whose weights determine ``decoder.encode_text``."""
    pipeline = getattr(decoder, "pipeline", None)
    module = getattr(decoder, "text_encoder", None) or getattr(pipeline, "text_encoder", None)
    if not isinstance(module, torch.nn.Module):
        raise AnyGPTError(f"{type(decoder).__name__} has no text encoder module (decoder.pipeline.text_encoder); "
                          f"TargetCache needs one to identify the decoder's targets")
    return module

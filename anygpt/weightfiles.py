"""Reading weight files and model configs, with errors that name the file and say how to fix it.

Every place AnyGPT reads tensors (safetensors files, ``torch.save``'d state dicts, Hugging Face
model folders) goes through these helpers. The libraries' own errors (``SafetensorError``,
``pickle.UnpicklingError``, a size-mismatch ``RuntimeError``) become a
:class:`~anygpt.errors.WeightsNotFoundError` that says which file, what is wrong with it (not a
safetensors file, corrupt or truncated, a pickle that needs code to run, a tensor of the wrong
shape) and how to fix it; the library's error stays as ``__cause__``. Impossible sizes in a
model config become a :class:`~anygpt.errors.ConfigError` naming the key.

``torch.load`` is only ever called with ``weights_only=True``: a pickle that would run code to
load is refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anygpt.errors import ConfigError, WeightsNotFoundError

if TYPE_CHECKING:
    import torch

__all__ = ["FIX", "read_safetensors", "safetensors_shapes", "check_folder", "read_torch_file", "check_state",
           "shape_mismatch", "is_size_mismatch", "check_dims", "LLM_SIZE_KEYS"]

#: How to fix a bad weight file, when the caller knows nothing more specific.
FIX = "re-download or re-convert it, or check the config entry that names it"

_PICKLE_PROTOCOL = re.compile(rb"\A\x80[\x02-\x05]")
_ZIP_MAGIC = b"PK\x03\x04"


def _sniff(path: Path) -> str:
    """What the bytes of ``path`` look like, for a file the safetensors reader refused."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "is empty (an interrupted download or copy?)"
    if _PICKLE_PROTOCOL.match(head) or head.startswith(_ZIP_MAGIC):
        return ("is a pickle (torch.save / pytorch_model.bin format), not a safetensors file; pickles are not "
                "loaded from .safetensors files, since they can run code")
    if len(head) < 8:
        return "is not a safetensors file (too short to hold a header)"
    (header_len,) = struct.unpack("<Q", head)
    if header_len > 100_000_000:
        return "is not a safetensors file (its first bytes are no safetensors header: random or foreign bytes)"
    if 8 + header_len > size:
        return f"is truncated or corrupt (its header needs {header_len} bytes, the file has {size - 8})"
    return "is corrupt or truncated (its header or tensor data do not add up)"


def read_safetensors(path: str | os.PathLike, *, what: str = "weights", fix: str = FIX) -> dict[str, "torch.Tensor"]:
    """All tensors of a ``.safetensors`` file, on the CPU.

    Args:
        what: what the file holds, for messages ("projector weights").
        fix: how to fix a bad file, for messages.

    Raises:
        WeightsNotFoundError: the file is missing, not a safetensors file, corrupt or truncated.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(f"{path}: no such file ({what}); {fix}") from exc
    except (SafetensorError, OSError) as exc:
        raise WeightsNotFoundError(f"{path}: {what}: the file {_sniff(path)} ({exc}); {fix}") from exc


def safetensors_shapes(path: str | os.PathLike, *, what: str = "weights",
                       fix: str = FIX) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from the header of a ``.safetensors`` file; no tensor data is read.

    Raises:
        WeightsNotFoundError: as :func:`read_safetensors`.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(f"{path}: no such file ({what}); {fix}") from exc
    except (SafetensorError, OSError) as exc:
        raise WeightsNotFoundError(f"{path}: {what}: the file {_sniff(path)} ({exc}); {fix}") from exc


def check_folder(folder: str | os.PathLike, *, what: str = "weights", fix: str = FIX) -> dict[Path, dict[str, tuple]]:
    """Read the header of every ``.safetensors`` file under ``folder`` (a Hugging Face model or
    diffusers pipeline folder), so that a corrupt one is named before a library trips over it.

    Returns:
        each file → its tensor shapes ({} when ``folder`` is not a local folder).

    Raises:
        WeightsNotFoundError: a file is not a safetensors file, corrupt or truncated.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {path: safetensors_shapes(path, what=what, fix=fix) for path in sorted(folder.rglob("*.safetensors"))}


def read_torch_file(path: str | os.PathLike, *, what: str = "weights", fix: str = FIX) -> Any:
    """What ``torch.load(path, weights_only=True)`` gives (memory-mapped where the format allows).

    Raises:
        WeightsNotFoundError: the file is missing, corrupt or truncated, not a torch file, or a
            pickle that needs code to run to load (refused, not run).
    """
    import torch

    path = Path(path)
    try:
        try:  # memory-map: a multi-GB checkpoint is not copied into RAM twice
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(f"{path}: no such file ({what}); {fix}") from exc
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "")
        # An unknown opcode ("Unsupported operand N") is corrupt bytes, not a pickle that runs code.
        if "Unsupported operand" not in detail and ("weights only" in str(exc).lower() or "weights_only" in str(exc)):
            problem = ("is a pickle that needs code to run to load" + (f" ({detail})" if detail else "")
                       + "; refused, since such a pickle can run anything (torch.load runs with weights_only=True)")
        else:
            problem = f"is not a torch state dict (corrupt, or random or foreign bytes: {detail or exc})"
        raise WeightsNotFoundError(f"{path}: {what}: the file {problem}; {fix}") from exc
    # torch's weights-only unpickler, fed random bytes, also fails inside its stack and memo
    # (IndexError: pop from empty list; KeyError) or on an absurd size (OverflowError, MemoryError).
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, IndexError, KeyError, OverflowError,
            MemoryError) as exc:
        raise WeightsNotFoundError(f"{path}: {what}: the file is corrupt or truncated, or not a torch "
                                   f"file ({type(exc).__name__}: {exc}); {fix}") from exc


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def shape_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """``tensor K has shape X in the file, the model expects Y`` for each key of both whose shapes differ."""
    return [f"tensor {key!r} has shape {_shape(found[key])} in the file, the model expects {_shape(expected[key])}"
            for key in sorted(set(expected) & set(found)) if tuple(found[key]) != tuple(expected[key])]


def check_state(expected: Mapping[str, Any], found: Mapping[str, Any], *, source: object,
                what: str = "weights", fix: str = FIX, allow_unexpected: bool = False) -> None:
    """Check that ``found`` (name → tensor or shape) has exactly the keys and shapes of ``expected``.

    Raises:
        WeightsNotFoundError: naming ``source``, the first misshapen, missing and unexpected tensors.
    """
    def shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(getattr(v, "shape", v)) for k, v in state.items()}

    expected, found = shapes(expected), shapes(found)
    problems = shape_mismatch(expected, found)[:5]
    missing = sorted(set(expected) - set(found))
    unexpected = [] if allow_unexpected else sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensor(s) {', '.join(map(repr, missing[:5]))}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s) {', '.join(map(repr, unexpected[:5]))}"
                        + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    if problems:
        raise WeightsNotFoundError(f"{source}: {what} do not fit the model: {'; '.join(problems)}. Was it saved "
                                   f"with a different config? {fix[0].upper()}{fix[1:]}")


def is_size_mismatch(exc: BaseException) -> bool:
    """Whether a library's ``RuntimeError``/``ValueError`` reports tensors of the wrong shape."""
    text = str(exc)
    return any(s in text for s in ("size mismatch", "ignore_mismatched_sizes", "expected shape"))


# Model configs ------------------------------------------------------------------------------------

#: Sizes of a transformers LLM config that must be positive integers where present.
LLM_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim",
                 "n_embd", "n_layer", "n_head", "n_positions", "d_model", "ffn_dim", "num_layers", "num_heads")


def check_dims(values: Mapping[str, Any], where: str, keys: tuple[str, ...] = LLM_SIZE_KEYS,
               heads: tuple[tuple[str, str], ...] = (("hidden_size", "num_attention_heads"),
                                                     ("num_attention_heads", "num_key_value_heads"),
                                                     ("n_embd", "n_head"))) -> None:
    """Check the sizes of a model config: each of ``keys`` present a positive integer, and each
    ``(size, count)`` of ``heads`` divisible (as transformers' own validation requires).

    Args:
        where: the config, for messages (``llm.arch``, ``/path/llm/config.json``).

    Raises:
        ConfigError: naming ``where`` and the key.
    """
    for key in keys:
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}; fix the config "
                              f"(or re-download the model whose config it is)")
    for size, count in heads:
        a, b = values.get(size), values.get(count)
        if isinstance(a, int) and isinstance(b, int) and b > 0 and a % b:
            raise ConfigError(f"{where}: {size} ({a}) must be divisible by {count} ({b}); fix the config "
                              f"(or re-download the model whose config it is)")


def read_json_config(path: str | os.PathLike) -> dict[str, Any]:
    """A model's ``config.json`` as a dict.

    Raises:
        ConfigError: the file is not a JSON object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON config ({exc}); re-download or re-save the model") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object; re-download or re-save the model")
    return data

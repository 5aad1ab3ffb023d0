"""The weight dtypes AnyGPT accepts, by the names configs and the command line use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from anygpt.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "torch_dtype", "dtype_name"]

#: Accepted names, in the order error messages list them.
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def torch_dtype(name: "str | torch.dtype", field: str = "dtype") -> "torch.dtype":
    """The ``torch.dtype`` called ``name`` (a dtype passes through).

    Raises:
        ConfigError: ``name`` is not one of :data:`DTYPE_NAMES`; the message names ``field``.
    """
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise ConfigError(f"{field}: must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def dtype_name(dtype: "torch.dtype") -> str:
    """``torch.float16`` → ``"float16"``."""
    return str(dtype).removeprefix("torch.")

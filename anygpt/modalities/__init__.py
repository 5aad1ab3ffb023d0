"""The modality registry: the single source of everything keyed by modality name.

Each :class:`ModalitySpec` says what a modality is called (in configs, the API, prompts and the
app), which files it reads and writes, how ImageBind encodes it and which decoder generates it.
Adding a modality is one new file in this package that builds a spec and registers it with
:func:`register_modality` (plus, if the modality can be generated, one decoder in
``decoders/``): the package imports every module in it, and :data:`MODALITIES` lists the specs
in :attr:`ModalitySpec.rank` order, whatever order they were registered in.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from anygpt.errors import MediaError
from anygpt.registry import Registry

if TYPE_CHECKING:
    import torch

__all__ = ["ModalitySpec", "MODALITIES", "get_modality", "modality_for_suffix",
           "register_modality", "unregister_modality"]


@dataclass(frozen=True, kw_only=True)
class ModalitySpec:
    """Everything modality-specific, in one place.

    Attributes:
        name: the key used in configs, the API and the CLI (``image``).
        plural: the pipeline's keyword argument for items of this modality (``images``).
        noun: the modality with its article, for messages and prompts (``an image``).
        signal_prefix: signal tokens are ``[{prefix}{i}]`` (``[IMG0]``).
        default_signal_tokens: length of the signal run when the config does not set one
            (NExT-GPT's: image 4, audio 8, video 24).
        encoder_input: the ImageBind modality that encodes it (``vision``, ``audio``).
        input_suffixes: accepted file suffixes, lower case with the dot (``.png``).
        output_suffix: suffix of written files (``.png``); None for an input-only modality.
        default_decoder: decoder registry name used when a config names none; None if the
            modality has no decoder.
        ui_component: name of the Gradio component class that displays it (``Image``).
        rank: position in the canonical modality order (image 0, audio 1, video 2).
        loader: path or already-loaded value → validated value (raises ``MediaError``).
        preprocessor: value → the encoder's input tensor for one item (no batch dim); takes
            the encoder's geometry as keyword arguments and ignores keys it does not use.
        writer: ``(value, path) → path`` written; None for an input-only modality.
    """

    name: str
    plural: str
    noun: str
    signal_prefix: str
    default_signal_tokens: int
    encoder_input: str
    input_suffixes: tuple[str, ...]
    output_suffix: str | None = None
    default_decoder: str | None = None
    ui_component: str
    rank: int
    loader: Callable[[Any], Any]
    preprocessor: Callable[..., "torch.Tensor"]
    writer: Callable[[Any, Any], Path] | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.input_suffixes if not s.startswith(".") or s != s.lower()]
        if bad:
            raise ValueError(f"modality {self.name!r}: input_suffixes must be lower case with the "
                             f"dot (like '.png'), got {bad}")
        if (self.output_suffix is None) != (self.writer is None):
            raise ValueError(f"modality {self.name!r}: give both output_suffix and writer (an "
                             "output modality) or neither (an input-only one)")
        if self.default_signal_tokens < 1:
            raise ValueError(f"modality {self.name!r}: default_signal_tokens must be at least 1, "
                             f"got {self.default_signal_tokens}")

    def load(self, item: Any) -> Any:
        """Load and validate one item: a file path, or an already-loaded value.

        A path's suffix is checked first (a path without one is left to the loader, which
        identifies the content).

        Raises:
            MediaError: the suffix is not one of :attr:`input_suffixes`, or the loader refuses
                the file or value.
        """
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            suffix = path.suffix.lower()
            if suffix and suffix not in self.input_suffixes:
                preferred = self.input_suffixes[0].lstrip(".").upper()
                raise MediaError(
                    f"{path}: unsupported {self.name} file type {suffix}; accepted: "
                    f"{', '.join(self.input_suffixes)}. Convert it to {preferred} (or rename it "
                    "if the suffix is wrong)")
        return self.loader(item)

    def preprocess(self, value: Any, **geometry: Any) -> "torch.Tensor":
        """The encoder's input tensor for one item (see :attr:`preprocessor`).

        Args:
            value: a path or a loaded value.
            geometry: the encoder's sizes (``ImageBindEncoder.preprocess_options``); omitted
                ones take ImageBind's values.
        """
        return self.preprocessor(value, **geometry)

    def write(self, value: Any, path: str | os.PathLike[str]) -> Path:
        """Write one generated value to ``path`` (parents created); return the path.

        Raises:
            MediaError: the modality is input-only, the value is invalid or the file cannot
                be written.
        """
        if self.writer is None:
            raise MediaError(f"{path}: cannot write {self.noun}: the {self.name} modality is "
                             "input-only (its spec has no writer); generate an output modality")
        return self.writer(value, path)

    def signal_tokens(self, count: int | None = None) -> list[str]:
        """The run of ``count`` signal tokens (default :attr:`default_signal_tokens`), in order."""
        count = self.default_signal_tokens if count is None else count
        return [f"[{self.signal_prefix}{i}]" for i in range(count)]


#: Every registered modality, iterated in rank order.
MODALITIES: Registry[ModalitySpec] = Registry("modality")


def get_modality(name: str) -> ModalitySpec:
    """The spec registered under ``name``; the error lists the valid names."""
    return MODALITIES.get(name)


def modality_for_suffix(suffix: str) -> ModalitySpec | None:
    """The first modality (in rank order) that reads files with ``suffix``, or None.

    Args:
        suffix: a file suffix, with or without the dot, any case (``.PNG``, ``wav``).
    """
    key = suffix.lower() if suffix.startswith(".") else f".{suffix.lower()}"
    return next((spec for spec in map(get_modality, MODALITIES) if key in spec.input_suffixes), None)


def register_modality(spec: ModalitySpec) -> ModalitySpec:
    """Register ``spec`` (a plugin's own modality, say) at its rank; return it.

    Raises:
        ValueError: a modality of that name is already registered.
    """
    if spec.name in MODALITIES:
        raise ValueError(f"modality {spec.name!r} is already registered; unregister it first")
    # The registry keeps insertion order: take out the specs that rank after this one and put
    # them back behind it.
    later = [MODALITIES.remove(name) for name in MODALITIES.names()
             if get_modality(name).rank > spec.rank]
    MODALITIES.add(spec.name, spec)
    for other in later:
        MODALITIES.add(other.name, other)
    return spec


def unregister_modality(name: str) -> ModalitySpec:
    """Remove the modality ``name`` from the registry (tests, plugins); return its spec."""
    return MODALITIES.remove(name)


def _import_spec_modules() -> None:
    """Import every public module of this package; each registers its spec."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_spec_modules()

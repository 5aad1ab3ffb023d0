"""The modality registry: what each modality is called, how its files load and how it is encoded.

Adding a modality is one file here that registers a :class:`ModalitySpec` (plus, if the modality
can be generated, one decoder in ``decoders/``). Everything else (signal tokens, projectors,
prompt placeholders, outputs) is keyed by the spec's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from anygpt.registry import Registry

if TYPE_CHECKING:
    import torch

__all__ = ["ModalitySpec", "MODALITIES", "get_modality"]


@dataclass(frozen=True)
class ModalitySpec:
    """Everything modality-specific, in one place.

    Attributes:
        name: the key used in configs, the API and the CLI (``image``).
        signal_prefix: signal tokens are ``[{prefix}{i}]`` (``[IMG0]``).
        encoder_input: the ImageBind modality that encodes it (``vision``, ``audio``).
        extensions: accepted file suffixes, lower case with the dot.
        default_decoder: decoder registry name used by presets for this modality.
        load: path → validated media value (raises ``MediaError``).
        preprocess: media value → the encoder's input tensor for one item (no batch dim).
    """

    name: str
    signal_prefix: str
    encoder_input: str
    extensions: tuple[str, ...]
    default_decoder: str
    load: Callable[[Any], Any]
    preprocess: Callable[[Any], "torch.Tensor"]

    def signal_tokens(self, count: int) -> list[str]:
        """The run of ``count`` signal tokens, in order."""
        return [f"[{self.signal_prefix}{i}]" for i in range(count)]


MODALITIES: Registry[ModalitySpec] = Registry("modality")


def get_modality(name: str) -> ModalitySpec:
    """The spec registered under ``name``; the error lists the valid names."""
    return MODALITIES.get(name)


def lazy(module: str, attr: str) -> Callable[..., Any]:
    """A callable that imports ``module.attr`` on first use (keeps ``import anygpt`` light)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{attr}"
    return call


def _register(spec: ModalitySpec) -> ModalitySpec:
    MODALITIES.add(spec.name, spec)
    return spec


# Each module registers its spec on import; the order is the canonical modality order.
from anygpt.modalities import image, audio, video  # noqa: E402,F401

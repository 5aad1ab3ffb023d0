"""Diffusion decoders behind one protocol: conditioning tensor in, media out.

Each decoder wraps a diffusers pipeline (never a fork of one) and is selected by registry name:

========================  =========  ==========================  ======================
name                      modality   pipeline                    conditioning (real)
========================  =========  ==========================  ======================
``stable-diffusion``      image      ``StableDiffusionPipeline``  77 × 768 (SD-1.5)
``audioldm``              audio      ``AudioLDMPipeline``         1 × 512 (CLAP)
``text-to-video``         video      ``TextToVideoSDPipeline``    77 × 1024 (zeroscope)
========================  =========  ==========================  ======================

Every decoder also turns a loaded media value of its modality into a training sample
(:meth:`Decoder.training_sample`) for its denoising loss (:meth:`Decoder.denoising_loss`).

Importing this package imports neither diffusers nor transformers; loading a decoder does.
Loaded decoders are not cached here: the caller keeps the instance and reuses it.

Example::

    from anygpt.config import DecoderConfig
    from anygpt.decoders import load_decoder

    decoder = load_decoder(DecoderConfig(name="stable-diffusion", arch={}, steps=2))
    image = decoder.decode(decoder.encode_text(["a photo of a cat"]), seed=0)[0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anygpt.decoders.base import DECODERS, Decoder

# Each module registers its decoder on import (without importing diffusers), in modality order.
from anygpt.decoders import image, audio, video  # noqa: F401,I001  isort: skip

if TYPE_CHECKING:
    import torch

    from anygpt.config import DecoderConfig

__all__ = ["DECODERS", "Decoder", "load_decoder", "condition_shape", "get_decoder_class"]


def get_decoder_class(name: str) -> type[Decoder]:
    """The decoder class registered under ``name``; the error lists the valid names."""
    return DECODERS.get(name)


def load_decoder(
    config: DecoderConfig,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Decoder:
    """Load (``config.pretrained``) or build (``config.arch``) the decoder named ``config.name``.

    The arguments, defaults and other errors are :meth:`Decoder.from_config`'s.

    Raises:
        UnknownNameError: ``config.name`` is not a registered decoder.
    """
    return get_decoder_class(config.name).from_config(config, device=device, dtype=dtype)


def condition_shape(config: DecoderConfig) -> tuple[int, int]:
    """The conditioning shape of the decoder ``config`` describes, without loading its weights."""
    return get_decoder_class(config.name).condition_shape_from_config(config)

"""Stable Diffusion (``StableDiffusionPipeline``): text-to-image, conditioned on CLIP hidden states.

Registry name ``stable-diffusion``; real weights e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``
(conditioning 77 × 768).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from anygpt.decoders import tiny
from anygpt.decoders.base import ClipConditionedDecoder, image_tensor, register

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["TINY_ARCH", "StableDiffusionDecoder"]

#: Sizes of the tiny random Stable Diffusion; ``DecoderConfig.arch`` overrides any key.
#: Defaults give 64×64 images (latent ``sample_size`` 16 × VAE factor 4) and conditioning 77 × 32;
#: ``{"architecture": "stable-diffusion-v1-5"}`` builds SD-1.5 at full size instead.
TINY_ARCH: dict[str, Any] = {**tiny.CLIP_TINY_ARCH, "scheduler": "pndm"}


@register
class StableDiffusionDecoder(ClipConditionedDecoder):
    """Images from Stable Diffusion 1.x / 2.x, conditioned on CLIP text hidden states.

    The safety checker is disabled (``safety_checker=None, requires_safety_checker=False``):
    generated images are returned unfiltered, and no CLIP image model is loaded for it. Filter
    outputs yourself where your use requires it.
    """

    name = "stable-diffusion"
    modality = "image"
    pipeline_class = "StableDiffusionPipeline"
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    tiny_arch = TINY_ARCH
    size_options = {"height": "height", "width": "width"}
    output_type = "pil"

    @classmethod
    def _tiny_components(cls, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel

        if arch["architecture"]:
            # The safety checker is left out: the pipeline is built with safety_checker=None.
            parts = tiny.architecture_components(arch, seed, ("unet", "vae", "text_encoder", "scheduler"))
            return {**parts, "tokenizer": tiny.clip_tokenizer(tiny.architecture_tokenizer_length(arch)),
                    "feature_extractor": None}
        unet = tiny.unet(UNet2DConditionModel, arch, seed, cross_attention_dim=arch["text_hidden_size"])
        return {
            "unet": unet,
            "vae": tiny.vae(arch, seed),
            **cls._tiny_text_components(arch, seed),
            "scheduler": tiny.scheduler(arch),
            "feature_extractor": None,
        }

    def _to_media(self, output: Any, fps: float | None) -> list[Any]:
        return list(output.images)

    def training_sample(self, value: Image.Image, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """An RGB image → ``(3, H, W)`` in [-1, 1] at :meth:`pixel_size` (bicubic resize)."""
        return image_tensor(value, self.pixel_size(options))

"""Text-to-video (``TextToVideoSDPipeline``): ModelScope / zeroscope, conditioned on CLIP states.

Registry name ``text-to-video``; real weights e.g. ``cerspense/zeroscope_v2_576w``
(conditioning 77 × 1024).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from anygpt.types import Video
from anygpt.decoders import tiny
from anygpt.decoders.base import ClipConditionedDecoder, image_tensor, register

__all__ = ["TINY_ARCH", "TextToVideoDecoder"]

#: Sizes of the tiny random text-to-video model; ``DecoderConfig.arch`` overrides any key.
#: Defaults give 64×64 frames (latent ``sample_size`` 16 × VAE factor 4) and conditioning 77 × 32;
#: decoders built from ``arch`` make 4 frames by default. ``{"architecture": "zeroscope-v2-576w"}``
#: builds zeroscope at full size instead.
TINY_ARCH: dict[str, Any] = {**tiny.CLIP_TINY_ARCH, "scheduler": "ddim"}


@register
class TextToVideoDecoder(ClipConditionedDecoder):
    """Videos from a ``TextToVideoSDPipeline`` (3-D UNet over frames, per-frame VAE).

    Frames come back as uint8 ``(F, H, W, 3)`` with ``fps`` from the call, the config, or 8.
    """

    name = "text-to-video"
    modality = "video"
    pipeline_class = "TextToVideoSDPipeline"
    tiny_arch = TINY_ARCH
    tiny_call_defaults = {"num_frames": 4}
    size_options = {"height": "height", "width": "width", "num_frames": "num_frames"}
    output_type = "np"
    #: frame rate when neither the call nor the config gives one (the pipeline's documented 8 fps).
    default_fps: float = 8.0
    #: frames when neither the call nor the config gives a count (the pipeline's default).
    default_num_frames: int = 16

    @classmethod
    def _tiny_components(cls, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        from diffusers import UNet3DConditionModel

        if arch["architecture"]:
            parts = tiny.architecture_components(arch, seed, ("unet", "vae", "text_encoder", "scheduler"))
            return {**parts, "tokenizer": tiny.clip_tokenizer(tiny.architecture_tokenizer_length(arch))}
        unet = tiny.unet(UNet3DConditionModel, arch, seed, suffix="3D",
                         cross_attention_dim=arch["text_hidden_size"])
        return {
            "unet": unet,
            "vae": tiny.vae(arch, seed),
            **cls._tiny_text_components(arch, seed),
            "scheduler": tiny.scheduler(arch),
        }

    def _to_media(self, output: Any, fps: float | None) -> list[Video]:
        fps = float(fps or self.default_fps)
        return [Video(frames=to_uint8(frames), fps=fps) for frames in output.frames]

    def training_sample(self, value: Video, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """A clip → ``(3, F, H, W)`` in [-1, 1]: as many frames as :meth:`decode` generates
        (with ``options``), evenly spaced over the clip (repeated if it is shorter), each resized
        like an image to :meth:`pixel_size`."""
        count = self.resolve_options(options)["num_frames"] or self.default_num_frames
        index = np.linspace(0, value.num_frames - 1, count).round().astype(int)
        size = self.pixel_size(options)
        return torch.stack([image_tensor(value.frames[i], size) for i in index], dim=1)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] → uint8 (rounded, as diffusers' ``numpy_to_pil`` does)."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)

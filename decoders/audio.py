"""AudioLDM (``AudioLDMPipeline``): text-to-audio, conditioned on one CLAP text embedding.

Registry name ``audioldm``; real weights e.g. ``cvssp/audioldm-l-full`` (conditioning 1 × 512).
The conditioning is CLAP's projected text embedding after the L2 normalisation the pipeline
applies; it enters the UNet as a class embedding, not through cross-attention.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anygpt.types import Audio
from anygpt.decoders import tiny
from anygpt.decoders.base import Decoder, register

__all__ = ["TINY_ARCH", "AudioLDMDecoder"]

#: Sizes of the tiny random AudioLDM; ``DecoderConfig.arch`` overrides any key.
#: The vocoder upsamples 160× at 16 kHz (10 ms per mel frame), so the default 1.0 s of audio is
#: 100 mel frames (latent ``sample_size`` 50 × VAE factor 2). Conditioning: 1 × ``projection_dim``.
TINY_ARCH: dict[str, Any] = {
    **tiny.CLIP_TINY_ARCH,
    "sample_size": 50,
    "projection_dim": 32,
    "vae_block_out_channels": (32, 64),
    "num_mel_bins": 16,
    "sampling_rate": 16000,
    "upsample_rates": (10, 16),
    "upsample_kernel_sizes": (20, 32),
    "upsample_initial_channel": 32,
    "scheduler": "ddim",
}


@register
class AudioLDMDecoder(Decoder):
    """Audio clips from AudioLDM: latent diffusion over a mel spectrogram, then a HiFi-GAN vocoder.

    Waveforms come back mono at the vocoder's sampling rate, clipped to [-1, 1].
    """

    name = "audioldm"
    modality = "audio"
    pipeline_class = "AudioLDMPipeline"
    text_config_class = "ClapTextConfig"
    tiny_arch = TINY_ARCH
    size_options = {"audio_length_s": "audio_length_in_s"}
    output_type = "np"

    @staticmethod
    def _condition_shape(text_config: Any, max_length: int) -> tuple[int, int]:
        return (1, int(text_config.projection_dim))

    @staticmethod
    def _tiny_text_config(arch: dict[str, Any]) -> Any:
        return tiny.clap_text_config(arch)

    @classmethod
    def _tiny_components(cls, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel
        from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

        blocks = tuple(arch["block_out_channels"])
        with tiny.seeded(seed):
            unet = UNet2DConditionModel(
                sample_size=arch["sample_size"],
                in_channels=arch["latent_channels"],
                out_channels=arch["latent_channels"],
                block_out_channels=blocks,
                layers_per_block=arch["layers_per_block"],
                attention_head_dim=arch["attention_head_dim"],
                norm_num_groups=arch["norm_num_groups"],
                # AudioLDM: no text cross-attention (attention blocks attend to themselves); the
                # CLAP embedding is projected and concatenated to the timestep embedding.
                cross_attention_dim=blocks,
                class_embed_type="simple_projection",
                projection_class_embeddings_input_dim=arch["projection_dim"],
                class_embeddings_concat=True,
                **tiny.unet_block_types(len(blocks)),
            )
        vocoder_config = SpeechT5HifiGanConfig(
            model_in_dim=arch["num_mel_bins"],
            sampling_rate=arch["sampling_rate"],
            upsample_initial_channel=arch["upsample_initial_channel"],
            upsample_rates=list(arch["upsample_rates"]),
            upsample_kernel_sizes=list(arch["upsample_kernel_sizes"]),
            resblock_kernel_sizes=[3, 7],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
            normalize_before=False,
        )
        with tiny.seeded(seed):
            vocoder = SpeechT5HifiGan(vocoder_config)
        return {
            "unet": unet,
            "vae": tiny.vae(arch, seed, channels=1),
            "text_encoder": tiny.clap_text_encoder(arch, seed),
            "tokenizer": tiny.byte_level_roberta_tokenizer(arch["model_max_length"]),
            "scheduler": tiny.scheduler(arch),
            "vocoder": vocoder,
        }

    def _encode_prompt(self, captions: list[str]) -> torch.Tensor:
        # AudioLDMPipeline has no public encode_prompt; its `_encode_prompt` is the code its
        # __call__ runs (CLAP text_embeds, then L2-normalised). The pipeline is deprecated, so
        # frozen; the parity test pins the equality.
        return self.pipeline._encode_prompt(captions, self.device, 1, False)

    def _pipeline_embeds(self, condition: torch.Tensor) -> torch.Tensor:
        return condition.squeeze(1)

    def _unet_condition(self, condition: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": None, "class_labels": condition.squeeze(1)}

    def _to_media(self, output: Any, fps: float | None) -> list[Audio]:
        rate = int(self.pipeline.vocoder.config.sampling_rate)
        return [Audio(waveform=np.clip(wave, -1.0, 1.0).astype(np.float32), sample_rate=rate)
                for wave in output.audios]

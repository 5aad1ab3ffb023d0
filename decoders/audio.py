"""AudioLDM (``AudioLDMPipeline``): text-to-audio, conditioned on one CLAP text embedding.

Registry name ``audioldm``; real weights e.g. ``cvssp/audioldm-l-full`` (conditioning 1 × 512).
The conditioning is CLAP's projected text embedding after the L2 normalisation the pipeline
applies; it enters the UNet as a class embedding, not through cross-attention. The UNet and VAE
work on log-mel spectrograms whose parameters are the vocoder's (:func:`log_mel_spectrogram`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anygpt.seeding import seeded
from anygpt.types import Audio
from anygpt.decoders import tiny
from anygpt.decoders.base import Decoder, register

__all__ = ["TINY_ARCH", "AudioLDMDecoder", "log_mel_spectrogram"]

#: Floor of the mel magnitudes before the log (AudioLDM's ``dynamic_range_compression``).
MEL_FLOOR = 1e-5

#: Sizes of the tiny random AudioLDM; ``DecoderConfig.arch`` overrides any key.
#: The vocoder upsamples 160× at 16 kHz (10 ms per mel frame), so the default 1.0 s of audio is
#: 100 mel frames (latent ``sample_size`` 50 × VAE factor 2). Conditioning: 1 × ``projection_dim``.
#: ``{"architecture": "audioldm-l-full"}`` builds AudioLDM-L-full at full size instead.
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
        return tiny.text_config(arch, tiny.clap_text_config)

    @classmethod
    def _tiny_components(cls, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel
        from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

        if arch["architecture"]:
            parts = tiny.architecture_components(arch, seed,
                                                 ("unet", "vae", "text_encoder", "scheduler", "vocoder"))
            # RoBERTa's BPE is not available offline; byte-level ids fit its 50 265-row vocabulary.
            return {**parts, "tokenizer": tiny.byte_level_roberta_tokenizer(tiny.architecture_tokenizer_length(arch))}
        unet = tiny.unet(
            UNet2DConditionModel, arch, seed,
            # AudioLDM: no text cross-attention (attention blocks attend to themselves); the CLAP
            # embedding is projected and concatenated to the timestep embedding.
            cross_attention_dim=tuple(arch["block_out_channels"]),
            class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=arch["projection_dim"],
            class_embeddings_concat=True,
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
        with seeded(seed):
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

    def training_waveform(self, value: Audio, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """A clip as AudioLDM prepares its training audio, before the log-mel: mixed to mono,
        resampled to the vocoder's rate, mean removed and scaled to a peak of 0.5, then cut or
        zero-padded to the length :meth:`decode` generates with ``options`` (``T * hop`` samples)."""
        import torchaudio

        vocoder = self.pipeline.vocoder.config
        rate, hop = int(vocoder.sampling_rate), math.prod(vocoder.upsample_rates)
        mono = value.waveform if value.waveform.ndim == 1 else value.waveform.mean(axis=0)
        wave = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
        if value.sample_rate != rate:
            wave = torchaudio.functional.resample(wave, value.sample_rate, rate)
        wave = wave - wave.mean()
        wave = 0.5 * wave / (wave.abs().max() + 1e-8)
        length = self._mel_frames(rate, hop, options) * hop
        return F.pad(wave[:length], (0, max(0, length - len(wave))))

    def training_sample(self, value: Audio, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """A clip → its log-mel spectrogram ``(1, T, mels)``, the vocoder's input representation:
        :func:`log_mel_spectrogram` of :meth:`training_waveform`."""
        vocoder = self.pipeline.vocoder.config
        wave = self.training_waveform(value, options)
        hop = math.prod(vocoder.upsample_rates)
        return log_mel_spectrogram(wave, int(vocoder.sampling_rate), hop, int(vocoder.model_in_dim))[None]

    def _mel_frames(self, rate: int, hop: int, options: Mapping[str, Any] | None = None) -> int:
        """Mel frames of the audio :meth:`decode` generates, computed as the pipeline computes
        its spectrogram height (rounded up to a multiple of the VAE's scale factor)."""
        scale = int(self.pipeline.vae_scale_factor)
        seconds = self.resolve_options(options)["audio_length_s"]
        if seconds is None:
            return int(self.pipeline.unet.config.sample_size) * scale
        frames = int(seconds / (hop / rate))
        return math.ceil(frames / scale) * scale


def log_mel_spectrogram(wave: torch.Tensor, rate: int, hop: int, mels: int) -> torch.Tensor:
    """A mono waveform of ``T × hop`` samples → its ``(T, mels)`` log-mel spectrogram.

    AudioLDM's ``TacotronSTFT``: the magnitude STFT (periodic Hann window of ``n_fft`` = the
    smallest power of two >= 4 × ``hop`` samples, 1024 for AudioLDM's hop of 160; the waveform
    reflect-padded by ``n_fft - hop`` so that there is one frame per ``hop`` samples) through a
    Slaney mel filter bank (``mels`` bands, 0 Hz to Nyquist, librosa's default), then
    ``log(max(mel, MEL_FLOOR))``.
    """
    import torchaudio

    n_fft = 1 << (4 * hop - 1).bit_length()
    left = (n_fft - hop) // 2
    padded = F.pad(wave[None, None], (left, n_fft - hop - left), mode="reflect")[0, 0]
    window = torch.hann_window(n_fft, dtype=wave.dtype)
    magnitude = torch.stft(padded, n_fft, hop_length=hop, window=window, center=False,
                           return_complex=True).abs()  # (n_fft // 2 + 1, T)
    bank = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, rate / 2, mels, rate,
                                                 norm="slaney", mel_scale="slaney")  # (freqs, mels)
    return torch.log((magnitude.T @ bank).clamp(min=MEL_FLOOR))

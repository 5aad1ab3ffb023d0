"""Tests of the ``decoders`` package on tiny random decoders (offline, CPU).

Parity tests check that ``decode(encode_text([caption]))`` is exactly what the wrapped diffusers
pipeline gives for ``prompt=caption``: the decoders add nothing to the pipelines but the
conditioning interface.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from anygpt import decoders
from anygpt.config import DecodeOptions, DecoderConfig
from anygpt.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from anygpt.modalities import get_modality
from anygpt.options import options_of
from anygpt.types import Audio, Video

NAMES = ["stable-diffusion", "audioldm", "text-to-video"]
STEPS = 2
GUIDANCE = 7.5
CAPTION = "a photo of a cat"
# Expected tiny conditioning shapes with `arch: {}`.
TINY_SHAPES = {"stable-diffusion": (77, 32), "audioldm": (1, 32), "text-to-video": (77, 32)}
# Sizes passed to decode() and to the raw pipeline alike.
SIZES = {
    "stable-diffusion": ({"height": 64, "width": 64}, {"height": 64, "width": 64}),
    "audioldm": ({"audio_length_s": 1.0}, {"audio_length_in_s": 1.0}),
    "text-to-video": ({"num_frames": 4}, {"num_frames": 4}),
}


def tiny_config(name: str, **overrides) -> DecoderConfig:
    fields = {"name": name, "arch": {}, "steps": STEPS, "guidance": GUIDANCE, "seed": 0, **overrides}
    return DecoderConfig(**fields)


def as_array(media) -> np.ndarray:
    if isinstance(media, Audio):
        return media.waveform
    if isinstance(media, Video):
        return media.frames
    return np.asarray(media)


def raw_pipeline_media(decoder, pipeline_output) -> np.ndarray:
    """The pipeline's own output, converted the way the decoder documents."""
    if decoder.modality == "image":
        return np.asarray(pipeline_output.images[0])
    if decoder.modality == "audio":
        return np.clip(pipeline_output.audios[0], -1.0, 1.0).astype(np.float32)
    return decoders.video.to_uint8(pipeline_output.frames[0])


@pytest.fixture(scope="module", params=NAMES)
def decoder(request):
    return decoders.load_decoder(tiny_config(request.param))


@pytest.fixture(scope="module")
def seed0_media(decoder):
    """One decode per decoder with seed 0, shared by several tests."""
    return decoder.decode(decoder.encode_text([CAPTION]), seed=0, **SIZES[decoder.name][0])[0]


# Import and registry ------------------------------------------------------------------------


def test_import_does_not_load_diffusers_or_transformers():
    code = ("import sys, decoders; heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; print(sorted(decoders.DECODERS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(NAMES))


def test_unknown_decoder_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        decoders.load_decoder(DecoderConfig(name="dall-e", arch={}))
    for name in NAMES:
        assert name in str(info.value)
    with pytest.raises(UnknownNameError):
        decoders.condition_shape(DecoderConfig(name="dall-e", arch={}))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_arch_key_raises_config_error_listing_keys(name):
    with pytest.raises(ConfigError, match="unknown key.*blocks.*valid keys: .*block_out_channels"):
        decoders.condition_shape(tiny_config(name, arch={"blocks": 3}))
    with pytest.raises(ConfigError, match="arch.scheduler: must be one of .*magic"):
        decoders.load_decoder(tiny_config(name, arch={"scheduler": "magic"}))


def test_unbuildable_arch_raises_config_error():
    with pytest.raises(ConfigError, match="cannot build the tiny components"):
        decoders.load_decoder(tiny_config("stable-diffusion", arch={"norm_num_groups": 7}))


def test_clip_tokenizer_offline_matches_openai_clip():
    tokenizer = decoders.tiny.clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# Conditioning --------------------------------------------------------------------------------


def test_condition_shape_from_config(decoder):
    config = tiny_config(decoder.name)
    assert decoders.condition_shape(config) == decoder.condition_shape == TINY_SHAPES[decoder.name]
    embeds = decoder.encode_text([CAPTION, "a dog barking"])
    assert embeds.shape == (2, *decoder.condition_shape)
    assert embeds.dtype == torch.float32 and not embeds.requires_grad


def test_a_declared_condition_shape_is_used_without_reading_the_pipeline():
    # A hub id that is in no cache, offline: only the declared shape can answer.
    config = DecoderConfig(name="stable-diffusion", pretrained="nobody/no-such-pipeline", condition_shape=[77, 768])
    assert decoders.condition_shape(config) == (77, 768)


@pytest.mark.parametrize("name", NAMES)
def test_a_declared_condition_shape_is_checked_when_the_decoder_loads(name):
    declared = list(TINY_SHAPES[name])
    assert decoders.load_decoder(tiny_config(name, condition_shape=declared)).condition_shape == tuple(declared)
    wrong = [declared[0], declared[1] + 1]
    with pytest.raises(ConfigError, match=rf"condition_shape says {wrong[0]}×{wrong[1]}.*set condition_shape to"):
        decoders.load_decoder(tiny_config(name, condition_shape=wrong))


@pytest.mark.parametrize("shape", [[77], [77, 0], [77, 768.0], [True, 768]])
def test_a_malformed_condition_shape_is_a_config_error(shape):
    with pytest.raises(ConfigError, match="condition_shape"):
        DecoderConfig(name="stable-diffusion", pretrained="x/y", condition_shape=shape).validate("decoder")


@pytest.mark.parametrize("name", NAMES)
def test_condition_shape_follows_arch_overrides(name):
    width_key = "projection_dim" if name == "audioldm" else "text_hidden_size"
    shape = decoders.condition_shape(tiny_config(name, arch={width_key: 48, "model_max_length": 40}))
    assert shape == ((1, 48) if name == "audioldm" else (40, 48))


def test_negative_condition_is_the_empty_caption_computed_once(decoder):
    first = decoder.negative_condition
    assert decoder.negative_condition is first
    assert torch.equal(first, decoder.encode_text([""]))


def test_audio_condition_is_l2_normalised():
    decoder = decoders.load_decoder(tiny_config("audioldm"))
    norms = decoder.encode_text([CAPTION, ""]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_encode_text_rejects_a_bare_string(decoder):
    with pytest.raises(ValueError, match="list of captions"):
        decoder.encode_text(CAPTION)


def test_decode_rejects_wrong_condition_shape(decoder):
    bad = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match=r"shape \(batch, "):
        decoder.decode(bad)


# Decoding ------------------------------------------------------------------------------------


def test_decode_returns_media_of_the_right_type_and_size(decoder, seed0_media):
    media = seed0_media
    if decoder.modality == "image":
        assert media.size == (64, 64) and media.mode == "RGB"
    elif decoder.modality == "audio":
        assert isinstance(media, Audio)
        assert media.sample_rate == 16000 and media.waveform.shape == (16000,)
        assert media.waveform.dtype == np.float32 and np.abs(media.waveform).max() <= 1.0
    else:
        assert isinstance(media, Video)
        assert media.frames.shape == (4, 64, 64, 3) and media.frames.dtype == np.uint8
        assert media.fps == 8.0


def test_decode_size_options():
    image = decoders.load_decoder(tiny_config("stable-diffusion", height=32))
    assert image.decode(image.negative_condition, width=48, seed=0)[0].size == (48, 32)
    audio = decoders.load_decoder(tiny_config("audioldm", audio_length_s=0.5))
    clips = audio.decode(audio.encode_text(["a", "b"]), seed=0)
    assert [clip.waveform.shape for clip in clips] == [(8000,), (8000,)]
    video = decoders.load_decoder(tiny_config("text-to-video", fps=12.0))
    clip = video.decode(video.negative_condition, num_frames=2, height=32, width=32, seed=0)[0]
    assert clip.frames.shape == (2, 32, 32, 3) and clip.fps == 12.0


def test_decode_options_are_the_declared_ones(decoder):
    assert tuple(decoders.base.DECODE_OPTIONS) == tuple(opt.name for opt in options_of(DecodeOptions))
    with pytest.raises(ConfigError, match="unknown decode option.*heigth; valid options: steps, guidance, height"):
        decoder.decode(decoder.negative_condition, heigth=32)
    with pytest.raises(ConfigError, match="'steps': must be >= 1 and <= 1000, got 0"):
        decoder.decode(decoder.negative_condition, steps=0)
    with pytest.raises(ConfigError, match="'width': expected an integer, got 32.5"):
        decoder.decode(decoder.negative_condition, width=32.5)


def test_resolve_options_call_then_config_then_tiny_defaults():
    video = decoders.load_decoder(tiny_config("text-to-video", fps=12))
    resolved = video.resolve_options({"height": 32, "steps": None})
    assert resolved == {"steps": STEPS, "guidance": GUIDANCE, "height": 32, "width": None, "num_frames": 4,
                        "fps": 12.0, "audio_length_s": None}
    assert video.resolve_options({"num_frames": 2})["num_frames"] == 2


def test_decode_equals_the_pipeline_called_with_the_prompt(decoder, seed0_media):
    decode_sizes, pipeline_sizes = SIZES[decoder.name]
    reference = decoder.pipeline(
        prompt=CAPTION,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type=decoder.output_type,
        **pipeline_sizes,
    )
    assert np.array_equal(as_array(seed0_media), raw_pipeline_media(decoder, reference))


def test_same_seed_same_media_other_seed_other_media(decoder, seed0_media):
    condition = decoder.encode_text([CAPTION])
    sizes = SIZES[decoder.name][0]
    again = decoder.decode(condition, seed=0, **sizes)[0]
    other = decoder.decode(condition, seed=1, **sizes)[0]
    assert np.array_equal(as_array(again), as_array(seed0_media))
    assert not np.array_equal(as_array(other), as_array(seed0_media))


def test_explicit_negative_condition_and_no_guidance(decoder, seed0_media):
    condition = decoder.encode_text([CAPTION])
    sizes = SIZES[decoder.name][0]
    explicit = decoder.decode(condition, negative_condition=decoder.encode_text([""]), seed=0, **sizes)[0]
    assert np.array_equal(as_array(explicit), as_array(seed0_media))
    unguided = decoder.decode(condition, guidance=1.0, seed=0, **sizes)[0]
    assert not np.array_equal(as_array(unguided), as_array(seed0_media))


# Saving and loading --------------------------------------------------------------------------


def test_save_pretrained_reloads_identically(decoder, seed0_media, tmp_path_factory):
    directory = decoder.save_pretrained(tmp_path_factory.mktemp(decoder.name))
    config = DecoderConfig(name=decoder.name, pretrained=str(directory), steps=STEPS, guidance=GUIDANCE)
    assert decoders.condition_shape(config) == decoder.condition_shape
    reloaded = decoders.load_decoder(config)
    assert type(reloaded) is type(decoder) and reloaded.dtype == torch.float32
    assert torch.equal(reloaded.encode_text([CAPTION]), decoder.encode_text([CAPTION]))
    media = reloaded.decode(reloaded.encode_text([CAPTION]), seed=0, **SIZES[decoder.name][0])[0]
    assert np.array_equal(as_array(media), as_array(seed0_media))


@pytest.mark.parametrize("pretrained", ["/no/such/decoder_dir", "./missing/local/dir", "nobody-xyz/no-such-model"])
def test_missing_pretrained_raises_weights_not_found(pretrained):
    config = DecoderConfig(name="stable-diffusion", pretrained=pretrained)
    with pytest.raises(WeightsNotFoundError, match=pretrained):
        decoders.load_decoder(config)
    with pytest.raises(WeightsNotFoundError, match=pretrained):
        decoders.condition_shape(config)


def test_directory_without_pipeline_raises_weights_not_found(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="model_index.json"):
        decoders.load_decoder(DecoderConfig(name="audioldm", pretrained=str(tmp_path)))


def test_half_precision_request_stays_float32_on_cpu():
    decoder = decoders.load_decoder(tiny_config("audioldm"), dtype=torch.float16)
    assert decoder.dtype == torch.float32 and decoder.device.type == "cpu"


# Training ------------------------------------------------------------------------------------


def test_denoising_loss_from_images_has_gradient_to_condition():
    decoder = decoders.load_decoder(tiny_config("stable-diffusion"))
    condition = decoder.encode_text([CAPTION, "a dog"]).clone().requires_grad_(True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = decoder.denoising_loss(condition, images, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert condition.grad is not None and condition.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.pipeline.unet.parameters())
    again = decoder.denoising_loss(condition.detach(), images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, loss.detach())


def test_denoising_loss_on_latents_for_every_decoder(decoder):
    latent_shape = {"image": (1, 4, 8, 8), "audio": (1, 4, 8, 8), "video": (1, 4, 2, 8, 8)}[decoder.modality]
    condition = decoder.encode_text([CAPTION]).requires_grad_(True)
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
    loss = decoder.denoising_loss(condition, latents, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and condition.grad.abs().sum() > 0


class _OracleUNet:
    """Stands in for the UNet's forward: predicts exactly what ``prediction_type`` asks for,
    recovered from the noisy latents, the timesteps and the known clean latents."""

    def __init__(self, scheduler, clean: torch.Tensor, kind: str):
        self.scheduler, self.clean, self.kind = scheduler, clean, kind

    def __call__(self, noisy, timesteps, **_conditioning):
        alpha = self.scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - self.scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        noise = (noisy - alpha * self.clean) / sigma
        prediction = {"epsilon": noise, "v_prediction": alpha * noise - sigma * self.clean,
                      "sample": self.clean}[self.kind]
        return type("UNetOutput", (), {"sample": prediction})()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_target_follows_the_prediction_type(kind, monkeypatch):
    """A UNet that predicts the right target has zero loss; one that predicts another has not."""
    decoder = decoders.load_decoder(tiny_config("stable-diffusion", arch={"prediction_type": kind}))
    assert decoder.noise_scheduler.config.prediction_type == kind
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # not the noise's seed
    condition = decoder.encode_text([CAPTION, "a dog"])
    for predicted in ("epsilon", "v_prediction", "sample"):
        oracle = _OracleUNet(decoder.noise_scheduler, latents, predicted)
        monkeypatch.setattr(decoder.pipeline.unet, "forward", oracle)
        loss = decoder.denoising_loss(condition, latents, generator=torch.Generator().manual_seed(0))
        if predicted == kind:
            assert loss.item() < 1e-6, (kind, loss.item())
        else:
            assert loss.item() > 1e-2, (kind, predicted, loss.item())


def test_denoising_loss_on_training_samples_goes_down(decoder, media_files):
    """Gradient steps on the conditioning (what the output projector learns) lower the loss of a
    decoder's own training sample under fixed noise."""
    sample = decoder.training_sample(get_modality(decoder.modality).load(media_files[decoder.modality]))[None]
    condition = decoder.encode_text([CAPTION]).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([condition], lr=0.05)

    def loss() -> torch.Tensor:
        return decoder.denoising_loss(condition, sample, generator=torch.Generator().manual_seed(0))

    first = loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first


# Training samples ----------------------------------------------------------------------------


def test_image_training_sample_is_the_bicubic_resize_in_unit_range(media_files):
    from PIL import Image

    decoder = decoders.load_decoder(tiny_config("stable-diffusion", height=32))
    image = get_modality("image").load(media_files["image"])
    sample = decoder.training_sample(image)
    assert sample.shape == (3, 32, 64) and sample.dtype == torch.float32
    pixels = np.asarray(image.convert("RGB").resize((64, 32), Image.BICUBIC))
    expected = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(sample, expected)


def test_video_training_sample_has_the_generated_frames_and_size(media_files):
    decoder = decoders.load_decoder(tiny_config("text-to-video"))
    clip = get_modality("video").load(media_files["video"])  # 6 frames of 48 × 64
    sample = decoder.training_sample(clip)
    assert sample.shape == (3, 4, 64, 64) and sample.min() >= -1 and sample.max() <= 1
    short = decoder.training_sample(Video(frames=clip.frames[:1], fps=8.0))  # repeated to 4 frames
    assert short.shape == (3, 4, 64, 64) and torch.equal(short[:, 0], short[:, 3])
    assert decoder.training_sample(clip).shape == sample.shape  # deterministic
    last = decoders.base.image_tensor(clip.frames[-1], (64, 64))
    assert torch.equal(sample[:, -1], last)  # evenly spaced from the first to the last frame


def test_audio_training_sample_is_the_vocoders_log_mel(media_files):
    decoder = decoders.load_decoder(tiny_config("audioldm"))
    vocoder = decoder.pipeline.vocoder.config
    tone = get_modality("audio").load(media_files["audio"])  # 1 s of 440 Hz at 22.05 kHz
    mel = decoder.training_sample(tone)
    frames = int(decoder.pipeline.unet.config.sample_size) * decoder.pipeline.vae_scale_factor
    assert mel.shape == (1, frames, vocoder.model_in_dim) == (1, 100, 16)
    assert mel.min() >= np.log(1e-5) - 1e-4
    # the loudest band is the one holding 440 Hz (Slaney mel scale, 0 Hz to Nyquist)
    import torchaudio

    bank = torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 16, 16000, norm="slaney", mel_scale="slaney")
    assert int(mel[0, 10:90].mean(0).argmax()) == int(bank[round(440 / 8000 * 512)].argmax())
    # its length follows the decoder's audio length, whatever the input's
    short = decoders.load_decoder(tiny_config("audioldm", audio_length_s=0.5))
    assert short.training_sample(tone).shape == (1, 50, 16)
    long = Audio(waveform=np.tile(tone.waveform, 3), sample_rate=tone.sample_rate)
    assert decoder.training_sample(long).shape == mel.shape


def test_training_samples_encode_with_the_decoders_vae(decoder, media_files):
    sample = decoder.training_sample(get_modality(decoder.modality).load(media_files[decoder.modality]))
    latents = decoder._latents(sample[None], torch.Generator().manual_seed(0))
    assert latents.shape[1] == decoder.pipeline.unet.config.in_channels

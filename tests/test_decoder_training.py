"""Training a decoder's own components (anygpt.alignment.decoder_training) on tiny archs.

A few optimizer steps on a 16×16 Stable Diffusion must lower the VAE's and the UNet's losses,
and the trained pipeline must save to a folder that diffusers and ``load_decoder`` both load and
that reproduces the in-memory decoder's output for a fixed seed. No timing is asserted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anygpt.alignment import decoder_training as dt
from anygpt.config import DecoderConfig
from anygpt.decoders import load_decoder

#: A 16×16 Stable Diffusion: 8×8×4 latents (VAE factor 2), a 1-layer 16-wide text encoder.
ARCH = {"sample_size": 8, "block_out_channels": (16, 32), "vae_block_out_channels": (16, 32),
        "norm_num_groups": 8, "attention_head_dim": 8, "text_hidden_size": 16, "text_intermediate_size": 32,
        "text_num_layers": 1, "text_num_heads": 2, "model_max_length": 16, "scheduler": "ddim"}
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def _pairs(count: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """16×16 images of a coloured square on a plain background, with their captions."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        colour, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        image = np.empty((16, 16, 3), dtype=np.uint8)
        image[:] = BACKGROUNDS[background]
        x, y = rng.integers(0, 8, size=2)
        image[y:y + 8, x:x + 8] = COLOURS[colour]
        pairs.append((image, f"a {colour} square on a {background} background"))
    return pairs


def _decoder(**arch):
    return load_decoder(DecoderConfig(name="stable-diffusion", arch={**ARCH, **arch}, steps=2, guidance=2.0))


@pytest.fixture(scope="module")
def data():
    return dt.training_set(_decoder(), _pairs(48))


SETTINGS = dt.DecoderTraining(
    vae=dt.VAETraining(steps=25, batch_size=8, lr=3e-3, warmup_steps=2),
    unet=dt.UNetTraining(steps=25, batch_size=8, lr=3e-3, warmup_steps=2),
    progress=False, log_every=0)
#: Just enough training to exercise saving, loading and resuming.
SHORT = dt.DecoderTraining(vae=dt.VAETraining(steps=4, batch_size=8), unet=dt.UNetTraining(steps=4, batch_size=8),
                           progress=False, log_every=0)


def _fixed_reconstruction(decoder, data) -> float:
    with torch.no_grad():
        media = data.samples[:16].float()
        return float(dt.reconstruction_loss(decoder.pipeline.vae, media, SETTINGS.vae,
                                            torch.Generator().manual_seed(0))[1])


def test_training_set_holds_the_decoders_samples(data):
    assert data.samples.shape == (48, 3, 16, 16)
    assert data.samples.dtype == torch.float16
    assert -1.0 <= float(data.samples.min()) and float(data.samples.max()) <= 1.0
    assert data.captions[0].endswith("background")


def test_vae_steps_reduce_the_reconstruction_loss(data):
    decoder = _decoder()
    before = _fixed_reconstruction(decoder, data)
    result = dt.train_vae(decoder, data, SETTINGS.vae, seed=0, progress=False)
    after = _fixed_reconstruction(decoder, data)
    assert result.steps == 25
    assert after < 0.7 * before
    # The decoder keeps its components frozen and in eval mode.
    assert not any(p.requires_grad for p in decoder.pipeline.vae.parameters())
    assert not decoder.pipeline.vae.training


def test_scaling_factor_gives_unit_variance_latents(data):
    decoder = _decoder()
    latents = dt.encode_latents(decoder, data)
    factor = dt.calibrate_scaling_factor(decoder, latents, generator=torch.Generator().manual_seed(0))
    assert decoder.pipeline.vae.config.scaling_factor == pytest.approx(factor)
    scaled = latents.sample(torch.arange(len(latents)), torch.Generator().manual_seed(1))
    assert float(scaled.std()) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_unet_steps_reduce_the_denoising_loss(data, train_text_encoder):
    decoder = _decoder()
    latents = dt.encode_latents(decoder, data)
    dt.calibrate_scaling_factor(decoder, latents)
    text_before = [p.clone() for p in decoder.pipeline.text_encoder.parameters()]
    negative_before = decoder.negative_condition.clone()
    before = dt.evaluate_denoising_loss(decoder, latents, batch_size=16, num_batches=3)
    settings = dt.UNetTraining(steps=25, batch_size=8, lr=3e-3, warmup_steps=2,
                               train_text_encoder=train_text_encoder)
    dt.train_unet(decoder, latents, settings, seed=0, progress=False)
    after = dt.evaluate_denoising_loss(decoder, latents, batch_size=16, num_batches=3)
    assert after < 0.8 * before
    text_after = list(decoder.pipeline.text_encoder.parameters())
    changed = any(not torch.equal(a, b) for a, b in zip(text_before, text_after, strict=True))
    assert changed == train_text_encoder
    # A trained text encoder changes the unconditional embedding the decoder guides with.
    assert torch.equal(decoder.negative_condition, negative_before) != train_text_encoder
    assert not any(p.requires_grad for p in decoder.pipeline.unet.parameters())


def test_trained_folder_loads_in_diffusers_and_load_decoder(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    decoder = _decoder()
    results = dt.train_decoder(decoder, data, SHORT, output_dir=tmp_path)
    assert list(results) == ["vae", "unet"]
    assert results["vae"].extra["scaling_factor"] == pytest.approx(decoder.pipeline.vae.config.scaling_factor)
    state = json.loads((tmp_path / dt.STATE_FILE).read_text())
    assert state["completed"] == ["vae", "unet"]

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(decoder.pipeline.vae.config.scaling_factor)
    image = pipe("a red square on a white background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3)

    loaded = load_decoder(DecoderConfig(name="stable-diffusion", pretrained=str(tmp_path), steps=2, guidance=2.0))
    condition = loaded.encode_text(["a red square on a white background", "a blue square on a black background"])
    torch.testing.assert_close(condition, decoder.encode_text(["a red square on a white background",
                                                               "a blue square on a black background"]))
    first = loaded.decode(condition, seed=3)
    again = loaded.decode(condition, seed=3)
    original = decoder.decode(condition, seed=3)
    for a, b, c in zip(first, again, original, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.abs(np.asarray(a).astype(int) - np.asarray(c).astype(int)).max() <= 1


def test_resume_loads_completed_components_instead_of_training(data, tmp_path, monkeypatch):
    trained = _decoder()
    dt.train_decoder(trained, data, SHORT, output_dir=tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a completed component was trained again")

    monkeypatch.setattr(dt, "train_vae", refuse)
    monkeypatch.setattr(dt, "train_unet", refuse)
    fresh = _decoder()
    results = dt.train_decoder(fresh, data, SHORT, output_dir=tmp_path)
    assert results["unet"].steps == SHORT.unet.steps
    for name in ("vae", "unet", "text_encoder"):
        for a, b in zip(getattr(trained.pipeline, name).parameters(), getattr(fresh.pipeline, name).parameters(),
                        strict=True):
            assert torch.equal(a, b)
    assert fresh.pipeline.vae.config.scaling_factor == trained.pipeline.vae.config.scaling_factor


def test_save_decoder_in_half_precision(data, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    decoder = _decoder()
    dt.save_decoder(decoder, tmp_path, dtype=torch.float16)
    assert decoder.dtype == torch.float32
    with safe_open(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as reader:
        assert {reader.get_tensor(k).dtype for k in reader.keys()} == {torch.float16}
    # Plain diffusers loading gives one dtype throughout (float32), so the pipeline runs.
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe("a red square", num_inference_steps=1, output_type="np")
    loaded = load_decoder(DecoderConfig(name="stable-diffusion", pretrained=str(tmp_path), steps=2, guidance=2.0))
    assert loaded.dtype == torch.float32
    condition = decoder.encode_text(["a red square on a white background"])
    # The in-memory decoder was rounded to what was saved, so both generate the same image.
    a, b = decoder.decode(condition, seed=0)[0], loaded.decode(condition, seed=0)[0]
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_the_same_code_trains_the_audio_and_video_decoders():
    from anygpt.types import Audio, Video

    small = {"block_out_channels": (16, 32), "vae_block_out_channels": (16, 32), "norm_num_groups": 8,
             "text_hidden_size": 16, "text_intermediate_size": 32, "text_num_layers": 1, "text_num_heads": 2,
             "model_max_length": 16}
    settings = dt.DecoderTraining(vae=dt.VAETraining(steps=2, batch_size=2), unet=dt.UNetTraining(steps=2, batch_size=2),
                                  progress=False, log_every=0)
    rng = np.random.default_rng(0)
    audio = load_decoder(DecoderConfig(name="audioldm", arch={**small, "projection_dim": 16, "sample_size": 16}))
    tones = [(Audio((0.4 * np.sin(np.arange(3200) * f)).astype(np.float32), 16000), f"tone {f:.2f}")
             for f in rng.uniform(0.05, 0.3, size=4)]
    video = load_decoder(DecoderConfig(name="text-to-video", arch={**small, "sample_size": 8}, num_frames=2))
    clips = [(Video(rng.integers(0, 255, size=(2, 16, 16, 3), dtype=np.uint8), 8.0), f"clip {i}") for i in range(4)]
    for decoder, pairs in ((audio, tones), (video, clips)):
        results = dt.train_decoder(decoder, pairs, settings)
        assert all(np.isfinite(r.last_loss) for r in results.values())
        assert results["vae"].extra["scaling_factor"] > 0


def _small_video_decoder(num_frames: int):
    small = {"block_out_channels": (16, 32), "vae_block_out_channels": (16, 32), "norm_num_groups": 8,
             "text_hidden_size": 16, "text_intermediate_size": 32, "text_num_layers": 1, "text_num_heads": 2,
             "model_max_length": 16, "sample_size": 8}
    return load_decoder(DecoderConfig(name="text-to-video", arch=small, num_frames=num_frames))


def _moving_clips(count: int) -> list:
    """8-frame 16×16 clips of a square moving right or left, with their captions."""
    from anygpt.types import Video

    pairs = []
    for i in range(count):
        frames = np.zeros((8, 16, 16, 3), dtype=np.uint8)
        for t in range(8):
            x = t if i % 2 == 0 else 7 - t
            frames[t, 4:10, x:x + 6] = (220, 30, 30)
        pairs.append((Video(frames, 8.0), "a square moving right" if i % 2 == 0 else "a square moving left"))
    return pairs


def test_training_sample_options_size_the_clip():
    decoder = _small_video_decoder(num_frames=4)
    clip = _moving_clips(1)[0][0]
    assert decoder.training_sample(clip).shape[1] == 4  # the frames the decoder generates
    sample = decoder.training_sample(clip, {"num_frames": 2})
    assert sample.shape[1] == 2
    # Two of eight frames, evenly spaced: the first and the last.
    assert torch.equal(sample[:, 1], decoder.training_sample(clip, {"num_frames": 8})[:, 7])


def test_finetune_phase_trains_the_unet_on_longer_clips_with_the_text_encoder_frozen(tmp_path, monkeypatch):
    pairs = _moving_clips(4)
    first = dt.DecoderTraining(vae=dt.VAETraining(steps=2, batch_size=2),
                               unet=dt.UNetTraining(steps=2, batch_size=2, train_text_encoder=True),
                               sample_options={"num_frames": 2}, progress=False, log_every=0)
    decoder = _small_video_decoder(num_frames=4)
    dt.train_decoder(decoder, pairs, first, output_dir=tmp_path)
    text_encoder = {k: v.clone() for k, v in decoder.pipeline.text_encoder.state_dict().items()}
    unet = {k: v.clone() for k, v in decoder.pipeline.unet.state_dict().items()}

    frames_seen = []
    real_train_unet = dt.train_unet

    def recording(decoder, latents, settings, **kwargs):
        frames_seen.append(latents.mean.shape[2])  # (N, C, F, h, w)
        return real_train_unet(decoder, latents, settings, **kwargs)

    monkeypatch.setattr(dt, "train_unet", recording)
    tuned = dt.DecoderTraining(**{**first.__dict__, "finetune": dt.FinetuneTraining(
        unet=dt.UNetTraining(steps=3, batch_size=2, lr=1e-2, warmup_steps=1))})
    results = dt.train_decoder(decoder, pairs, tuned, output_dir=tmp_path)
    assert frames_seen == [4]  # vae and unet resumed; the finetune phase saw whole 4-frame samples
    assert results["finetune"].steps == 3 and results["finetune"].component == "finetune"
    assert all(torch.equal(v, text_encoder[k]) for k, v in decoder.pipeline.text_encoder.state_dict().items())
    assert any(not torch.equal(v, unet[k]) for k, v in decoder.pipeline.unet.state_dict().items())

    # Resuming again loads the fine-tuned UNet instead of training it a third time.
    fresh = _small_video_decoder(num_frames=4)
    dt.train_decoder(fresh, pairs, tuned, output_dir=tmp_path)
    assert frames_seen == [4]
    for a, b in zip(decoder.pipeline.unet.parameters(), fresh.pipeline.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    state = json.loads((tmp_path / dt.STATE_FILE).read_text())
    assert state["completed"] == ["vae", "unet", "finetune"]
    assert dt.DecoderTraining.from_dict(state["settings"]).finetune == tuned.finetune


def test_finetune_needs_the_media_not_a_training_set():
    decoder = _small_video_decoder(num_frames=2)
    data = dt.training_set(decoder, _moving_clips(2))
    settings = dt.DecoderTraining(finetune=dt.FinetuneTraining(), progress=False)
    with pytest.raises(ValueError, match="pass the \\(media value, caption\\) pairs"):
        dt.train_decoder(decoder, data, settings)

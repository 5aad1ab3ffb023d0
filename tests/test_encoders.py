"""The frozen ImageBind encoder, built tiny from an ``arch`` dict with seeded random weights."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from anygpt.config import EncoderConfig
from anygpt.encoders import (
    ENCODERS,
    IMAGEBIND_HUGE_ARCH,
    IMAGEBIND_HUGE_URL,
    ImageBindEncoder,
    build_encoder,
    imagebind_cache_path,
    import_imagebind_model,
)
from anygpt.errors import ConfigError, UnknownNameError, WeightsNotFoundError

# The arch recommended for the `tiny` preset: every trunk 32 wide, one block, 16-d output.
TINY_ARCH = {
    "out_embed_dim": 16,
    "vision_embed_dim": 32, "vision_num_blocks": 1, "vision_num_heads": 2,
    "audio_embed_dim": 32, "audio_num_blocks": 1, "audio_num_heads": 2, "audio_drop_path": 0.0,
    "text_embed_dim": 32, "text_num_blocks": 1, "text_num_heads": 2,
    "depth_embed_dim": 32, "depth_num_blocks": 1, "depth_num_heads": 2,
    "thermal_embed_dim": 32, "thermal_num_blocks": 1, "thermal_num_heads": 2,
    "imu_embed_dim": 32, "imu_num_blocks": 1, "imu_num_heads": 2, "imu_drop_path": 0.0,
}


def tiny_config(seed: int = 0, **kwargs) -> EncoderConfig:
    return EncoderConfig(arch=dict(TINY_ARCH), seed=seed, **kwargs)


@pytest.fixture(scope="module")
def encoder() -> ImageBindEncoder:
    return build_encoder(tiny_config())


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(2, 3, 224, 224, generator=g),
        "audio": torch.randn(2, 3, 1, 128, 204, generator=g),
        "video": torch.randn(2, 4, 3, 2, 224, 224, generator=g),
    }


def encode_all(enc: ImageBindEncoder, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [enc.encode("vision", inputs["image"]), enc.encode("audio", inputs["audio"]),
                enc.encode("vision", inputs["video"])]


def test_registry_and_output_dim(encoder):
    assert "imagebind" in ENCODERS
    assert ENCODERS.get("imagebind") is ImageBindEncoder
    assert encoder.output_dim == 16
    assert encoder.dtype == torch.float32 and encoder.device.type == "cpu"
    assert 1_000_000 < encoder.num_parameters < 2_000_000


def test_output_shapes_and_norms(encoder, inputs):
    image, audio, video = encode_all(encoder, inputs)
    for emb in (image, audio, video):
        assert emb.shape == (2, 16) and emb.dtype == torch.float32
    # Single clips are unit length; clips are normalised then averaged, as ImageBind does.
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    for emb in (audio, video):
        norms = emb.norm(dim=-1)
        assert bool((norms <= 1 + 1e-5).all()) and bool((norms > 0.5).all())
    one_clip = encoder.encode("audio", inputs["audio"][:, :1])
    torch.testing.assert_close(one_clip.norm(dim=-1), torch.ones(2))


def test_clips_are_averaged(encoder, inputs):
    audio = inputs["audio"]
    per_clip = torch.stack([encoder.encode("audio", audio[:, i]) for i in range(audio.shape[1])], dim=1)
    torch.testing.assert_close(encoder.encode("audio", audio), per_clip.mean(dim=1))


def test_still_video_clip_equals_image(encoder, inputs):
    # ImageBind turns an image into a 2-frame clip by repeating it.
    image = inputs["image"]
    video = image.unsqueeze(2).repeat(1, 1, 2, 1, 1).unsqueeze(1)  # (B, 1 clip, 3, 2, H, W)
    torch.testing.assert_close(encoder.encode("vision", video), encoder.encode("vision", image))


def test_forward_runs_only_requested_trunks(encoder, inputs):
    called: list[str] = []
    hooks = [trunk.register_forward_hook(lambda m, a, o, name=name: called.append(name))
             for name, trunk in encoder.model.modality_trunks.items()]
    try:
        out = encoder({"audio": inputs["audio"]})
    finally:
        for hook in hooks:
            hook.remove()
    assert list(out) == ["audio"] and called == ["audio"]


def test_text_tokens():
    enc = build_encoder(tiny_config())
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
    emb = enc.encode("text", tokens)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_seed_determinism(inputs):
    first = encode_all(build_encoder(tiny_config(seed=0)), inputs)
    again = encode_all(build_encoder(tiny_config(seed=0)), inputs)
    other = encode_all(build_encoder(tiny_config(seed=1)), inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.allclose(a, b) for a, b in zip(first, other, strict=True))


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_encoder(tiny_config(seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder.train() is encoder
    assert not encoder.training
    assert not any(m.training for m in encoder.modules())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_and_reload_bitwise(encoder, inputs, tmp_path, suffix):
    saved = encoder.save_weights(tmp_path / "sub" / f"encoder{suffix}")
    # A relative path is resolved against base_dir (a saved model's directory).
    config = EncoderConfig(pretrained=f"sub/encoder{suffix}", arch=dict(TINY_ARCH), seed=99)
    reloaded = ImageBindEncoder.from_config(config, base_dir=tmp_path)
    assert saved.is_file()
    assert not any(p.is_meta or p.requires_grad for p in reloaded.parameters())
    for a, b in zip(encode_all(encoder, inputs), encode_all(reloaded, inputs), strict=True):
        assert torch.equal(a, b)


def test_weights_that_do_not_fit_the_arch(encoder, tmp_path):
    path = encoder.save_weights(tmp_path / "tiny.safetensors")
    wider = dict(TINY_ARCH, out_embed_dim=8)
    with pytest.raises(WeightsNotFoundError, match="do not fit the encoder architecture"):
        build_encoder(EncoderConfig(pretrained=str(path), arch=wider))


def test_unreadable_weights(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="broken.pth"):
        build_encoder(EncoderConfig(pretrained=str(path), arch=dict(TINY_ARCH)))


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        build_encoder(EncoderConfig(pretrained="nowhere/encoder.safetensors", arch=dict(TINY_ARCH)),
                      base_dir=tmp_path)
    assert str(tmp_path / "nowhere" / "encoder.safetensors") in str(info.value)


def test_bad_arch_key_lists_valid_parameters():
    with pytest.raises(ConfigError) as info:
        build_encoder(EncoderConfig(arch={"vision_width": 32}))
    assert "vision_width" in str(info.value) and "vision_embed_dim" in str(info.value)


def test_bad_arch_value():
    with pytest.raises(ConfigError, match="encoder.arch"):
        build_encoder(EncoderConfig(arch=dict(TINY_ARCH, vision_num_heads=3)))


def test_unknown_encoder_name():
    with pytest.raises(UnknownNameError, match="imagebind"):
        build_encoder(EncoderConfig(name="clip", arch=dict(TINY_ARCH)))


def test_bad_inputs(encoder):
    with pytest.raises(UnknownNameError, match="vision"):
        encoder.encode("depth", torch.zeros(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        encoder.encode("vision", torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="128, 204"):
        encoder.encode("audio", torch.zeros(1, 3, 1, 128, 100))
    with pytest.raises(ValueError, match="expected"):
        encoder.encode("vision", torch.zeros(3, 224, 224))


# --------------------------------------------------------------------------------------------
# Preprocessing geometry comes from the arch
# --------------------------------------------------------------------------------------------
def test_preprocess_options_come_from_the_arch(encoder):
    assert encoder.preprocess_options("vision") == {"image_size": 224, "frames_per_clip": 2}
    assert encoder.preprocess_options("audio") == {"mel_bins": 128, "target_frames": 204}
    assert encoder.preprocess_options("text") == {}
    other = build_encoder(EncoderConfig(arch={**TINY_ARCH, "audio_num_mel_bins": 64,
                                              "audio_target_len": 100}))
    assert other.preprocess_options("audio") == {"mel_bins": 64, "target_frames": 100}
    with pytest.raises(UnknownNameError, match="audio, text, vision"):
        encoder.preprocess_options("depth")


def _tone_file(path: Path, seconds: float = 2.5) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def short_audio_model():
    """The tiny preset whose audio trunk is built for 100-frame clips (ImageBind: 204)."""
    from anygpt.config import AnyGPTConfig
    from anygpt.model import AnyGPTModel

    config = AnyGPTConfig.from_name("tiny")
    config.encoder.arch["audio_target_len"] = 100
    return AnyGPTModel.from_config(config)


def test_model_encodes_audio_files_at_the_encoders_target_length(short_audio_model, tmp_path):
    from anygpt.modalities import get_modality

    model = short_audio_model
    path = _tone_file(tmp_path / "tone.wav")
    embeddings = model.encode_items("audio", [path, path])
    assert embeddings.shape == (2, model.encoder.output_dim)
    torch.testing.assert_close(embeddings[0], embeddings[1])
    # The same file at ImageBind's default geometry is what this encoder refuses.
    default = get_modality("audio").preprocess(path)
    assert default.shape[-1] == 204
    with pytest.raises(ValueError, match="1, 128, 100"):
        model.encode_media("audio", default[None])


def test_model_encodes_images_and_videos_with_the_vision_options(short_audio_model, tmp_path):
    from anygpt.testing import write_sample_media

    files = write_sample_media(tmp_path)
    model = short_audio_model
    for modality in ("image", "video"):
        assert model.encode_items(modality, [files[modality]]).shape == (1, model.encoder.output_dim)
    with pytest.raises(ValueError, match="at least one"):
        model.encode_items("image", [])


def test_other_mel_bins_encode_end_to_end(tmp_path):
    from anygpt.modalities import get_modality

    enc = build_encoder(EncoderConfig(arch={**TINY_ARCH, "audio_num_mel_bins": 64, "audio_target_len": 100}))
    spec = get_modality("audio")
    clips = spec.preprocess(_tone_file(tmp_path / "tone.wav"), **enc.preprocess_options(spec.encoder_input))
    assert clips.shape == (3, 1, 64, 100)
    with torch.no_grad():
        assert enc.encode(spec.encoder_input, clips[None]).shape == (1, 16)


def test_huge_offline_without_cache_raises_without_network(monkeypatch, tmp_path):
    attempts = []

    def no_network(*args, **kwargs):  # recorded: the loader turns any download error into its own
        attempts.append(args)
        raise AssertionError("attempted a download")

    monkeypatch.setenv("ANYGPT_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsNotFoundError) as info:
        build_encoder(EncoderConfig(pretrained="imagebind_huge"))
    message = str(info.value)
    assert not attempts and "downloads are disabled" in message
    assert str(tmp_path / "imagebind" / "imagebind_huge.pth") in message
    assert IMAGEBIND_HUGE_URL in message


def test_huge_downloads_once_to_cache_when_online(monkeypatch, tmp_path):
    from anygpt import encoders

    calls: list[tuple[str, str]] = []

    def fake_download(url: str, dst: str, progress: bool = True) -> None:
        calls.append((url, dst))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setenv("ANYGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ANYGPT_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    expected = tmp_path / "imagebind" / "imagebind_huge.pth"
    assert imagebind_cache_path() == expected
    assert encoders._huge_checkpoint() == expected
    assert encoders._huge_checkpoint() == expected  # cached: no second download
    assert calls == [(IMAGEBIND_HUGE_URL, str(expected))]


def test_huge_failed_download(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setenv("ANYGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ANYGPT_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", broken)
    with pytest.raises(WeightsNotFoundError, match="connection refused"):
        build_encoder(EncoderConfig(pretrained="imagebind_huge"))


def test_huge_rejects_arch():
    with pytest.raises(ConfigError, match="must be empty"):
        build_encoder(EncoderConfig(pretrained="imagebind_huge", arch={"out_embed_dim": 8}))


def test_huge_arch_matches_imagebind_huge():
    from anygpt.encoders import _parameters_on_meta, _resolve_arch

    module = import_imagebind_model()
    with _parameters_on_meta():  # no memory for the 1.2 B parameters
        ours = module.ImageBindModel(**_resolve_arch(module.ImageBindModel, IMAGEBIND_HUGE_ARCH))
        theirs = module.imagebind_huge(pretrained=False)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert shapes["modality_heads.vision.2.weight"] == (1024, 1280)


def test_bare_import_does_not_run_package_init(encoder, inputs):
    encode_all(encoder, inputs)
    assert "imagebind.data" not in sys.modules
    assert "pytorchvideo" not in sys.modules


def test_bare_import_keeps_an_imported_imagebind(monkeypatch):
    import_imagebind_model()
    real = sys.modules["imagebind"]
    stand_in = types.ModuleType("imagebind")
    stand_in.__path__ = list(real.__path__)
    monkeypatch.setitem(sys.modules, "imagebind", stand_in)
    module = import_imagebind_model()
    assert sys.modules["imagebind"] is stand_in
    assert hasattr(module, "ImageBindModel")


def test_importing_the_module_does_not_import_imagebind():
    code = ("import sys, anygpt.encoders; "
            "bad = [m for m in sys.modules if m == 'imagebind' or m.startswith('imagebind.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

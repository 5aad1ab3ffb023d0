"""Contrastive training of a tiny ImageBind encoder (anygpt.alignment.encoder_training).

A few steps on a tiny arch must lower the InfoNCE loss and make media of a trivially separable
toy world (three image captions) retrieve their own caption; the trained encoder must be frozen,
leave the encoder it started from untouched, and save to a file that
``ImageBindEncoder.from_config`` reloads bit-exactly. No timing is asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anygpt.alignment import encoder_training as et
from anygpt.alignment.world import ImageItem, SoundItem, render_sound
from anygpt.config import EncoderConfig
from anygpt.encoders import ImageBindEncoder

#: A tiny ImageBind: 16-wide one-block trunks, 56-pixel vision patches (16 tokens), audio cut
#: to 32 log-mel frames (24 tokens).
ARCH = {
    "out_embed_dim": 16, "kernel_size": [2, 56, 56], "audio_target_len": 32,
    "vision_embed_dim": 16, "vision_num_blocks": 1, "vision_num_heads": 2,
    "audio_embed_dim": 16, "audio_num_blocks": 1, "audio_num_heads": 2, "audio_drop_path": 0.0,
    "text_embed_dim": 8, "text_num_blocks": 1, "text_num_heads": 1,
    "depth_embed_dim": 8, "depth_num_blocks": 1, "depth_num_heads": 1,
    "thermal_embed_dim": 8, "thermal_num_blocks": 1, "thermal_num_heads": 1,
    "imu_embed_dim": 8, "imu_num_blocks": 1, "imu_num_heads": 1, "imu_drop_path": 0.0,
}
#: The toy: three images that differ in every attribute.
TOY = [ImageItem("circle", "red", "white"), ImageItem("square", "blue", "black"),
       ImageItem("triangle", "green", "gray")]
SETTINGS = dict(steps=40, batch_size=6, lr=3e-3, warmup_steps=5, log_every=0, progress=False)


@pytest.fixture(scope="module")
def encoder() -> ImageBindEncoder:
    return ImageBindEncoder.from_config(EncoderConfig(arch=dict(ARCH), seed=0))


@pytest.fixture(scope="module")
def toy(encoder) -> dict[str, et.MediaSet]:
    return {"train": et.world_media_set(encoder, "image", 4, seed=0, items=TOY),
            "held_out": et.world_media_set(encoder, "image", 2, seed=1, items=TOY)}


@pytest.fixture(scope="module")
def trained(encoder, toy) -> et.TrainingResult:
    return et.train_encoder(encoder, {"image": toy["train"]}, et.EncoderTraining(**SETTINGS))


def test_tokenize_is_imagebinds_text_input():
    tokens = et.tokenize(["a red circle on a white background", "a low sine tone"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == 49406).all()
    ends = tokens.argmax(dim=1)  # ImageBind's text head pools here
    assert (tokens[torch.arange(2), ends] == 49407).all()
    assert all((row[int(end) + 1:] == 0).all() for row, end in zip(tokens, ends))


def test_embed_matches_the_frozen_encoder(encoder):
    g = torch.Generator().manual_seed(0)
    batches = {"vision": [torch.randn(2, 3, 224, 224, generator=g), torch.randn(2, 3, 3, 2, 224, 224, generator=g)],
               "audio": [torch.randn(2, 3, 1, 128, 32, generator=g)],
               "text": [et.tokenize(["a red circle", "a low sine tone"])]}
    with torch.no_grad():
        for key, values in batches.items():
            for batch in values:
                assert torch.equal(et.embed(encoder.model, key, batch), encoder.encode(key, batch))


def test_text_prefix_embedding_is_the_full_one(encoder):
    tokens = et.tokenize(["a red circle on a white background", "a low sine tone", "a blue square moving up"])
    with torch.no_grad():
        torch.testing.assert_close(et.embed_text_prefix(encoder.model, tokens), encoder.encode("text", tokens),
                                   rtol=1e-5, atol=1e-6)


def test_media_set_keeps_one_of_identical_clips(encoder):
    item = SoundItem("low", "sine")
    sound = render_sound(item, np.random.default_rng(0))
    compact = et.media_set(encoder, "audio", [sound], [item])
    full = et.media_set(encoder, "audio", [sound], [item], compact_clips=False)
    assert compact.inputs.shape[1] == 1 and full.inputs.shape[1] == 3
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode("audio", compact.inputs), encoder.encode("audio", full.inputs))


def test_contrastive_loss_is_clip_with_distinct_items_and_allows_shared_captions():
    g = torch.Generator().manual_seed(0)
    media = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    labels = torch.arange(4)
    logits = 10.0 * media @ text.T
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(et.contrastive_loss(media, text, labels, labels, 10.0), clip)
    # Two media of one item, one caption for it, plus a bank caption no medium has: finite.
    loss = et.contrastive_loss(media, text, torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 3]), 10.0)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="at least one text"):
        et.contrastive_loss(media, text[:2], torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1]), 10.0)


def test_training_lowers_the_contrastive_loss(trained):
    assert trained.steps == SETTINGS["steps"]
    assert trained.mean_loss(0.8, 1.0) < 0.7 * trained.mean_loss(0.0, 0.2)
    assert trained.logit_scale > 0


def test_training_is_seeded(encoder, toy, trained):
    settings = et.EncoderTraining(**{**SETTINGS, "steps": 5})
    first = et.train_encoder(encoder, {"image": toy["train"]}, settings)
    again = et.train_encoder(encoder, {"image": toy["train"]}, settings)
    assert first.losses == again.losses
    assert first.losses == trained.losses[:5]


def test_trained_encoder_is_frozen_and_the_original_untouched(encoder, trained):
    fresh = ImageBindEncoder.from_config(EncoderConfig(arch=dict(ARCH), seed=0))
    for (name, before), after in zip(fresh.model.state_dict().items(), encoder.model.state_dict().values()):
        assert torch.equal(before, after), name
    assert not any(p.requires_grad for p in encoder.parameters())
    model = trained.encoder
    assert isinstance(model, ImageBindEncoder) and model.arch == encoder.arch
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    changed = [k for k, v in model.model.state_dict().items() if not torch.equal(v, encoder.model.state_dict()[k])]
    assert any(k.startswith("modality_trunks.vision") for k in changed)
    assert any(k.startswith("modality_trunks.text") for k in changed)
    assert not any(k.startswith(("modality_trunks.audio", "modality_trunks.depth")) for k in changed)
    assert "modality_postprocessors.text.1.log_logit_scale" in changed  # the learnt temperature


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_saved_weights_reload_bit_exactly(trained, toy, tmp_path, suffix):
    path = trained.encoder.save_weights(tmp_path / f"encoder{suffix}")
    reloaded = ImageBindEncoder.from_config(EncoderConfig(pretrained=str(path), arch=dict(ARCH)))
    saved = trained.encoder.model.state_dict()
    assert list(reloaded.model.state_dict()) == list(saved)
    for name, value in reloaded.model.state_dict().items():
        assert value.dtype == saved[name].dtype and torch.equal(value, saved[name]), name
    media = toy["held_out"].inputs
    tokens = et.tokenize([item.caption() for item in TOY])
    with torch.no_grad():
        assert torch.equal(reloaded.encode("vision", media), trained.encoder.encode("vision", media))
        assert torch.equal(reloaded.encode("text", tokens), trained.encoder.encode("text", tokens))
    assert not any(p.requires_grad for p in reloaded.parameters()) and not reloaded.training


def test_retrieval_on_a_separable_toy_improves(encoder, toy, trained):
    before = et.retrieval_accuracy(encoder, toy["held_out"], TOY)
    after = et.retrieval_accuracy(trained.encoder, toy["held_out"], TOY)
    assert (after.num_media, after.num_captions) == (6, 3)
    assert after.accuracy == 1.0 and after.accuracy >= before.accuracy
    assert after.margin > before.margin and after.margin > 0
    assert set(after.attributes) == {"shape", "colour", "background"}
    assert all(v == 1.0 for v in after.attributes.values())


@pytest.mark.parametrize("text", [{"train_text": False}, {"text_frozen_steps": 3}])
def test_frozen_random_text_trains_the_media_side_only(encoder, toy, text):
    result = et.train_encoder(encoder, {"image": toy["train"]},
                              et.EncoderTraining(**{**SETTINGS, "steps": 3, **text}))
    after = result.encoder.model.state_dict()
    for name, value in encoder.model.state_dict().items():
        if name.startswith(("modality_preprocessors.text", "modality_trunks.text", "modality_heads.text")):
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["modality_heads.vision.2.weight"], encoder.model.state_dict()["modality_heads.vision.2.weight"])


def test_bad_settings_and_sets_are_errors(encoder, toy):
    with pytest.raises(ValueError, match="caption_templates"):
        et.EncoderTraining(caption_templates="held_out")
    with pytest.raises(ValueError, match="at least one MediaSet"):
        et.train_encoder(encoder, {}, et.EncoderTraining(**SETTINGS))
    with pytest.raises(ValueError, match="not candidates"):
        et.retrieval_accuracy(encoder, toy["held_out"], TOY[:2])

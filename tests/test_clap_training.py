"""alignment.clap_training: contrastive pretraining of an AudioLDM decoder's CLAP text encoder."""

import numpy as np
import pytest
import torch

from anygpt.config import DecoderConfig

ARCH = {"num_mel_bins": 16, "upsample_rates": (8, 10), "upsample_kernel_sizes": (16, 20),
        "upsample_initial_channel": 16, "sample_size": 5}


@pytest.fixture(scope="module")
def setup():
    from anygpt.alignment.decoder_training import training_set
    from anygpt.alignment.world import all_items, render_sound
    from anygpt.decoders import load_decoder

    decoder = load_decoder(DecoderConfig(name="audioldm", arch=dict(ARCH)))
    rng = np.random.default_rng(0)
    items = all_items("audio")
    pairs = [(render_sound(item, rng), item.caption()) for item in items for _ in range(3)]
    return decoder, training_set(decoder, pairs), [item.caption() for item in items]


def test_contrastive_training_separates_the_captions(setup):
    from anygpt.alignment import clap_training as ct

    decoder, data, captions = setup
    negative = decoder.negative_condition
    assert float(ct.caption_similarity(decoder, captions).min()) > 0.99  # a random CLAP: all alike
    settings = ct.TextEncoderTraining(steps=30, batch_size=27, lr=3e-3)
    result = ct.train_text_encoder(decoder, data, settings, progress=False, log_every=0)
    assert result.last_loss < result.first_loss
    assert result.max_similarity_after < result.max_similarity_before
    assert float(ct.caption_similarity(decoder, captions).min()) < 0.9
    text_encoder = decoder.pipeline.text_encoder
    assert not text_encoder.training and not any(p.requires_grad for p in text_encoder.parameters())
    assert not torch.equal(decoder.negative_condition, negative)  # the cached "" embedding was dropped


def test_labels_must_match_the_pairs(setup):
    from anygpt.alignment import clap_training as ct

    decoder, data, _ = setup
    with pytest.raises(ValueError, match="labels"):
        ct.train_text_encoder(decoder, data, ct.TextEncoderTraining(steps=1), labels=[0], progress=False)

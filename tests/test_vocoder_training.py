"""alignment.vocoder_training: training an AudioLDM decoder's HiFi-GAN vocoder from scratch.

Runs in seconds: a tiny decoder whose clips are 10 mel frames (0.1 s) long.
"""

import math

import numpy as np
import pytest
import torch

from anygpt.alignment import vocoder_training as vt
from anygpt.config import DecoderConfig

# A tiny AudioLDM: hop 8·10 = 80 samples (a 200 Hz frame rate), 10 frames = 800 samples a clip.
ARCH = {"num_mel_bins": 16, "upsample_rates": (8, 10), "upsample_kernel_sizes": (16, 20),
        "upsample_initial_channel": 16, "sample_size": 5}


@pytest.fixture(scope="module")
def decoder():
    from anygpt.decoders import load_decoder

    return load_decoder(DecoderConfig(name="audioldm", arch=dict(ARCH)))


@pytest.fixture(scope="module")
def data(decoder):
    return vt.vocoder_set(decoder, vt.world_tone_pairs(decoder, 18, seed=0))


def test_log_mel_is_the_decoders_training_sample(decoder):
    from anygpt.alignment.world import SoundItem, render_sound
    from anygpt.decoders.audio import log_mel_spectrogram

    clips = [render_sound(SoundItem(p, w), np.random.default_rng(i))
             for i, (p, w) in enumerate([("low", "sine"), ("high", "sawtooth")])]
    waves = torch.stack([vt.prepared_waveform(decoder, clip) for clip in clips])
    batched = vt.log_mel(waves, 16000, 80, 16)
    for wave, mel, clip in zip(waves, batched, clips):
        torch.testing.assert_close(mel, log_mel_spectrogram(wave, 16000, 80, 16), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mel[None], decoder.training_sample(clip), rtol=1e-5, atol=1e-4)


def test_tone_draws_the_worlds_sounds():
    from anygpt.alignment.world import PITCHES, SoundItem, render_sound

    for waveform in ("sine", "square", "sawtooth"):
        detune = np.random.default_rng(3).uniform(0.97, 1.03)  # render_sound's one draw
        expected = render_sound(SoundItem("medium", waveform), np.random.default_rng(3)).waveform
        np.testing.assert_allclose(vt.tone(waveform, PITCHES["medium"] * detune, 16000), expected, atol=1e-6)


def test_world_pairs_target_the_nominal_pitch_on_the_frame_grid(decoder, data):
    assert vt.frame_rate(decoder) == 200.0
    pairs = vt.world_tone_pairs(decoder, 9, seed=1)
    heard, target = pairs[0]  # the first item: a low sine
    # 220 Hz → the nearest multiple of 200 Hz; the heard tone keeps its random detuning.
    np.testing.assert_allclose(target.waveform, vt.tone("sine", 200.0, 16000), atol=1e-6)
    assert not np.allclose(heard.waveform, target.waveform)
    assert data.mels.shape == (18, 10, 16) and data.waves.shape == (18, 800)


def test_a_steady_mel_gives_a_hop_periodic_wave(decoder):
    # Why the targets sit on the frame-rate grid: shift-equivariance at the hop.
    vocoder = decoder.pipeline.vocoder
    with torch.no_grad():
        wave = vocoder(torch.randn(1, 16).expand(40, 16)[None].contiguous())[0]
    middle = wave[1200:2000]
    torch.testing.assert_close(middle[80:], middle[:-80], rtol=0, atol=1e-5 * float(middle.abs().max()))


def test_init_gives_an_audible_start():
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(model_in_dim=16, upsample_initial_channel=16,
                                                    upsample_rates=[8, 10], upsample_kernel_sizes=[16, 20]))
    mel = torch.randn(2, 10, 16)
    with torch.no_grad():
        assert vocoder(mel).std() < 1e-3  # transformers' own init: near silence
        vt.init_vocoder_weights(vocoder, seed=0)
        assert 0.02 < vocoder(mel).std() < 0.9


def _fixed_loss(vocoder, data, settings):
    sizes = (16000, 80, 16)
    with torch.no_grad():
        return float(vt.vocoder_loss(vocoder(data.mels), data.waves, sizes, settings)[0])


def test_training_reduces_the_loss_and_is_seeded(decoder, data):
    import copy

    settings = vt.VocoderTraining(steps=12, batch_size=6, stft_resolutions=((128, 32), (256, 64)))
    vocoder = copy.deepcopy(decoder.pipeline.vocoder)
    vt.init_vocoder_weights(vocoder, seed=5)
    vt.fit_normalization(vocoder, data.mels)
    before = _fixed_loss(vocoder, data, settings)
    result = vt.train_vocoder(vocoder, data, settings, seed=5, progress=False, log_every=0)
    after = _fixed_loss(vocoder, data, settings)
    assert after < 0.9 * before
    assert result.steps == 12 and set(result.extra) == {"stft", "mel"}
    assert not vocoder.training and not any(p.requires_grad for p in vocoder.parameters())
    assert vocoder.config.normalize_before

    again = copy.deepcopy(decoder.pipeline.vocoder)
    vt.train_vocoder(again, data, settings, seed=5, progress=False, log_every=0)
    for (name, a), b in zip(vocoder.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_losses():
    pred, target = torch.randn(2, 800), torch.randn(2, 800)
    settings = vt.VocoderTraining(stft_resolutions=((128, 32),), wave_weight=0.5)
    total, parts = vt.vocoder_loss(pred, target, (16000, 80, 16), settings)
    assert set(parts) == {"stft", "mel", "wave"}
    assert math.isclose(float(total), parts["stft"] + parts["mel"] + 0.5 * parts["wave"], rel_tol=1e-5)
    assert float(vt.vocoder_loss(target, target, (16000, 80, 16), settings)[0]) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="every loss weight"):
        vt.vocoder_loss(pred, target, (16000, 80, 16), vt.VocoderTraining(stft_weight=0, mel_weight=0))


def test_the_trained_pipeline_saves_and_loads(decoder, data, tmp_path):
    from diffusers import AudioLDMPipeline

    from anygpt.decoders import load_decoder

    vt.train_decoder_vocoder(decoder, data, vt.VocoderTraining(steps=3, batch_size=4,
                                                               stft_resolutions=((128, 32),)),
                             progress=False, log_every=0)
    decoder.save_pretrained(tmp_path)

    pipe = AudioLDMPipeline.from_pretrained(tmp_path)
    assert type(pipe.vocoder).__name__ == "SpeechT5HifiGan" and pipe.vocoder.config.normalize_before
    torch.testing.assert_close(pipe.vocoder.scale, decoder.pipeline.vocoder.scale)

    loaded = load_decoder(DecoderConfig(name="audioldm", pretrained=str(tmp_path)))
    condition = decoder.encode_text(["a low sine tone"])
    torch.testing.assert_close(loaded.encode_text(["a low sine tone"]), condition)
    ours = decoder.decode(condition, seed=0, steps=2, guidance=2.0)[0]
    theirs = loaded.decode(loaded.encode_text(["a low sine tone"]), seed=0, steps=2, guidance=2.0)[0]
    assert ours.sample_rate == theirs.sample_rate == 16000 and ours.waveform.shape == (800,)
    np.testing.assert_allclose(theirs.waveform, ours.waveform, atol=1e-6)


def test_mismatched_data_is_refused(decoder):
    wrong = vt.VocoderSet(torch.zeros(2, 10, 8), torch.zeros(2, 800))
    with pytest.raises(ValueError, match="mel bands"):
        vt.train_vocoder(decoder.pipeline.vocoder, wrong, vt.VocoderTraining(steps=1), progress=False)

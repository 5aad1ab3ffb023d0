"""Audio for the encoder is resampled only where its clips are: the log-mel clips equal those of
the whole waveform resampled, and a long file costs no more than a short one."""

import numpy as np
import pytest
import torch

from anygpt.media.audio import AUDIO_SAMPLE_RATE, _Resampled, audio_to_encoder_input
from anygpt.types import Audio


def _whole_file_reference(audio: Audio) -> torch.Tensor:
    """The previous transform: resample the whole waveform, then cut the clips."""
    import torchaudio

    from anygpt.media.audio import AUDIO_CLIP_SECONDS, AUDIO_CLIPS, AUDIO_MEL_BINS, AUDIO_TARGET_FRAMES, _log_mel
    from anygpt.media.preprocessing import _clip_bounds

    waveform = torch.from_numpy(audio.waveform.astype(np.float32))[None]
    waveform = torchaudio.functional.resample(waveform, audio.sample_rate, AUDIO_SAMPLE_RATE)
    duration = waveform.shape[1] / AUDIO_SAMPLE_RATE
    return torch.stack([
        _log_mel(waveform[:, int(a * AUDIO_SAMPLE_RATE):int(b * AUDIO_SAMPLE_RATE)], AUDIO_MEL_BINS,
                 AUDIO_TARGET_FRAMES)
        for a, b in _clip_bounds(duration, AUDIO_CLIP_SECONDS, AUDIO_CLIPS)])


def _tone(rate: int, seconds: float, seed: int = 0) -> Audio:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)
    return Audio(wave.astype(np.float32), rate)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
@pytest.mark.parametrize("seconds", [0.7, 2.0, 9.3])
def test_clips_equal_those_of_the_whole_waveform_resampled(rate, seconds):
    audio = _tone(rate, seconds)
    # The waveforms agree to ~5e-7; the log of a near-empty mel band (above 4 kHz for 8 kHz
    # audio) turns that into up to ~5e-4 of the normalised spectrogram, whose std is 1.
    torch.testing.assert_close(audio_to_encoder_input(audio), _whole_file_reference(audio), atol=2e-3, rtol=0)


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 32000])
def test_any_slice_equals_that_slice_of_the_whole(rate):
    import torchaudio

    waveform = torch.from_numpy(_tone(rate, 3.1).waveform)[None]
    whole = torchaudio.functional.resample(waveform, rate, AUDIO_SAMPLE_RATE)
    resampled = _Resampled(waveform, rate)
    assert resampled.length == whole.shape[1]
    for start, end in [(0, 100), (777, 32777), (whole.shape[1] - 5000, whole.shape[1]), (10, 10)]:
        torch.testing.assert_close(resampled.slice(start, end), whole[:, start:end], atol=1e-6, rtol=0)


def test_a_long_file_resamples_only_its_clips(monkeypatch):
    import torchaudio

    lengths = []
    original = torchaudio.functional.resample
    monkeypatch.setattr(torchaudio.functional, "resample",
                        lambda w, *a, **k: lengths.append(w.shape[-1]) or original(w, *a, **k))
    audio = _tone(44100, 300.0)
    audio_to_encoder_input(audio)
    assert len(lengths) == 3 and max(lengths) < 3 * 44100  # three 2 s clips and a little context

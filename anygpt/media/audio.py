"""Audio: load and validate WAV, FLAC, Ogg and MP3 files, ImageBind's audio transform, and
writing 16-bit WAV.

Only numpy is imported with this module; soundfile, torch and torchaudio are imported by the
functions that need them.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anygpt.errors import MediaError
from anygpt.media.files import PathLike, _check_file, _suffix, _write_file
from anygpt.media.preprocessing import _check_sizes, _clip_bounds
from anygpt.types import Audio

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_AUDIO_SECONDS", "MAX_AUDIO_CHANNELS", "load_audio", "audio_to_encoder_input",
           "write_audio"]

logger = logging.getLogger(__name__)

# The limits are module-level, and read at call time, so that an application can tighten or
# relax them in one place: ``anygpt.media.audio.MAX_AUDIO_SECONDS``.

#: Longest accepted audio file, in seconds. Checked from the header, before decoding.
MAX_AUDIO_SECONDS = 600.0
#: Most channels accepted in an audio file (a corrupt header can claim thousands).
MAX_AUDIO_CHANNELS = 32

#: libsndfile major formats accepted by :func:`load_audio` (the WAV family, FLAC, Ogg, MP3).
AUDIO_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "OGG", "MP3")

# ImageBind preprocessing constants (imagebind/data.py).
AUDIO_SAMPLE_RATE = 16_000
AUDIO_CLIPS = 3
AUDIO_CLIP_SECONDS = 2
#: Defaults of the preprocessing's ``mel_bins`` and ``target_frames`` (ImageBind's); the encoder
#: passes its own (``audio_num_mel_bins``, ``audio_target_len``).
AUDIO_MEL_BINS = 128
AUDIO_TARGET_FRAMES = 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138
_FBANK_FRAME_MS = 25
_FBANK_SHIFT_MS = 10


def load_audio(audio: PathLike | Audio) -> Audio:
    """Load and validate an audio file; return a float32 :class:`~anygpt.types.Audio`.

    Accepted: WAV (incl. WAVE_FORMAT_EXTENSIBLE, RF64, W64), FLAC, Ogg (Vorbis, Opus) and MP3,
    through libsndfile (``soundfile``), at any sample rate and channel count. The waveform is
    (T,) for mono and (C, T) otherwise, with the file's sample rate, not resampled.

    Args:
        audio: a file path, or an :class:`Audio` to validate (float32 conversion included;
            integer PCM is scaled to [-1, 1]). The duration limit applies to files only.

    Raises:
        MediaError: missing, unreadable, empty, unsupported, corrupt or truncated file; no
            samples; non-finite samples; longer than :data:`MAX_AUDIO_SECONDS` or more than
            :data:`MAX_AUDIO_CHANNELS` channels (both checked before decoding).
    """
    if isinstance(audio, Audio):
        return _validate_audio(audio, "<audio>")
    path = _check_file(audio, "audio")
    data, sample_rate = _read_sound_file(path)
    waveform = data[:, 0] if data.shape[1] == 1 else data.T
    return _validate_audio(Audio(np.ascontiguousarray(waveform), sample_rate), str(path))


def _read_sound_file(path: Path) -> tuple[np.ndarray, int]:
    """Decode ``path`` with libsndfile into a (T, C) float32 array and its sample rate."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as sound:
            _check_audio_header(path, sound.format, sound.samplerate, sound.channels, sound.frames)
            data = sound.read(dtype="float32", always_2d=True)
            fmt, rate, declared = sound.format, sound.samplerate, sound.frames
            log = sound.extra_info
    except MediaError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, OSError) as exc:
        raise MediaError(_audio_open_message(path, exc)) from exc
    _check_audio_complete(path, fmt, declared, len(data), log)
    return data, rate


def _audio_open_message(path: Path, exc: Exception) -> str:
    """Explain a libsndfile failure: unsupported format or damaged file."""
    detail = str(exc).replace(f"Error opening {str(path)!r}: ", "").rstrip(".")
    if "does not exist or is not a regular file" in detail:
        # libsndfile's MP3 reader says this when it finds no MPEG frame; the file does exist.
        detail = "no valid audio frames found"
    suffix = _suffix(path)
    if suffix not in ("WAV", "WAVE", "FLAC", "OGG", "OGA", "OPUS", "MP3"):
        return (
            f"{path}: unsupported audio format {suffix} ({detail}); convert it to WAV or FLAC"
            " (e.g. ffmpeg -i input output.wav)"
        )
    return (
        f"{path}: not a readable {suffix} file ({detail}); the file is corrupt, truncated or"
        " mislabelled: re-export it as WAV or FLAC"
    )


def _check_audio_header(path: Path, fmt: str, rate: int, channels: int, frames: int) -> None:
    """Validate format, rate, channels and duration from the header, before decoding."""
    if fmt not in AUDIO_FORMATS:
        raise MediaError(
            f"{path}: unsupported audio format {fmt} (need WAV, FLAC, OGG or MP3);"
            " convert it to WAV or FLAC"
        )
    if rate <= 0 or not 1 <= channels <= MAX_AUDIO_CHANNELS:
        raise MediaError(
            f"{path}: implausible header ({rate} Hz, {channels} channels; at most"
            f" {MAX_AUDIO_CHANNELS} channels are accepted); the file is corrupt or unusual:"
            " re-export it as mono or stereo WAV"
        )
    if frames <= 0:
        raise MediaError(f"{path}: the audio has no samples (zero length); use a longer recording")
    if frames / rate > MAX_AUDIO_SECONDS:
        raise MediaError(
            f"{path}: audio is {frames / rate:.0f} s long, over the limit of"
            f" {MAX_AUDIO_SECONDS:.0f} s; trim it (e.g. ffmpeg -i in -t {MAX_AUDIO_SECONDS:.0f}"
            " out.wav)"
        )


def _check_audio_complete(path: Path, fmt: str, declared: int, decoded: int, log: str) -> None:
    """Detect truncation, which libsndfile mostly tolerates silently.

    * any format: fewer samples decoded than the header declares (MP3, FLAC);
    * WAV: the ``data`` chunk declares more bytes than the file holds (libsndfile shortens the
      stream to what is there);
    * Ogg: the last page lacks the end-of-stream flag (the writer never finished). A cut inside
      the final page goes unnoticed: libsndfile drops the partial page as "junk", which some
      valid files also carry (appended tags), so it is not treated as an error.
    """
    short = None
    if decoded < declared:
        short = f"the header declares {declared} samples but only {decoded} decode"
    elif fmt in ("WAV", "WAVEX"):
        short = _wav_truncation(path)
    elif fmt == "OGG" and "lacks an end-of-stream" in log:
        short = "the last Ogg page has no end-of-stream mark"
    if short:
        raise MediaError(
            f"{path}: the audio file is truncated ({short}); re-export or re-download it"
        )


def _wav_truncation(path: Path) -> str | None:
    """Compare the RIFF ``data`` chunk's declared size with the bytes actually present."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(12)[8:12] != b"WAVE":
            return None
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return None
            chunk, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk == b"data":
                available = file_size - handle.tell()
                # 0 and 0xFFFFFFFF are placeholders written by streaming encoders.
                if size not in (0, 0xFFFFFFFF) and size > available:
                    return f"the data chunk declares {size} bytes but {available} are present"
                return None
            handle.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to even sizes


def _validate_audio(audio: Audio, name: str) -> Audio:
    """Check an :class:`Audio` value and return it with a float32 waveform."""
    waveform = np.asarray(audio.waveform)
    if waveform.ndim not in (1, 2):
        raise MediaError(f"{name}: waveform has shape {waveform.shape}; expected (T,) or (C, T)")
    if waveform.ndim == 2 and waveform.shape[0] > MAX_AUDIO_CHANNELS:
        if waveform.shape[1] <= MAX_AUDIO_CHANNELS:
            raise MediaError(
                f"{name}: waveform has shape {waveform.shape}, which looks like (T, C);"
                " pass it channels-first as (C, T) (waveform.T)"
            )
        raise MediaError(
            f"{name}: waveform has {waveform.shape[0]} channels, over the limit of"
            f" {MAX_AUDIO_CHANNELS}; mix it down to mono or stereo"
        )
    if np.issubdtype(waveform.dtype, np.integer):
        waveform = waveform / float(np.iinfo(waveform.dtype).max)
    elif not np.issubdtype(waveform.dtype, np.floating):
        raise MediaError(f"{name}: waveform dtype {waveform.dtype} is not numeric; use float32")
    waveform = waveform.astype(np.float32, copy=False)
    rate = audio.sample_rate
    if not isinstance(rate, (int, float, np.number)) or rate <= 0 or rate != int(rate):
        raise MediaError(f"{name}: sample rate {rate!r} is not a positive integer")
    if waveform.shape[-1] == 0 or waveform.size == 0:
        raise MediaError(f"{name}: the audio has no samples (zero length); use a longer recording")
    if not np.isfinite(waveform).all():
        raise MediaError(
            f"{name}: the audio contains NaN or infinite samples; whatever produced it is broken:"
            " re-export the file (or clean the array with np.nan_to_num)"
        )
    return Audio(waveform=waveform, sample_rate=int(rate))


# ---------------------------------------------------------------------------------------------
# ImageBind preprocessing
# ---------------------------------------------------------------------------------------------


def audio_to_encoder_input(
    audio: PathLike | Audio,
    clips: int = AUDIO_CLIPS,
    *,
    mel_bins: int = AUDIO_MEL_BINS,
    target_frames: int = AUDIO_TARGET_FRAMES,
    **other_geometry: Any,
) -> "torch.Tensor":
    """ImageBind's audio transform: a float32 (clips, 1, mel_bins, target_frames) tensor of
    log-mel clips ((3, 1, 128, 204) with ImageBind's values).

    As ``imagebind.data.load_and_transform_audio_data``: resample to 16 kHz
    (``torchaudio.functional.resample`` defaults), cut ``clips`` clips of 2 s whose starts are
    spaced evenly over the waveform (pytorchvideo's ``ConstantClipsPerVideoSampler``, whose
    starts are ``i * (duration - 2) / clips``), remove each clip's mean, Kaldi fbank (128 mel
    bins, 25 ms Hanning window, 10 ms shift, HTK-compatible, no dither, no energy), zero-pad or
    crop to 204 frames, normalise with mean -4.268 and std 9.138. Audio shorter than 2 s gives
    ``clips`` identical clips of the whole waveform, padded.

    Differences: multi-channel audio is mixed to mono (ImageBind's fbank reads channel 0 only);
    each clip's mean is removed from a copy (ImageBind subtracts it in place from the shared
    waveform, which shifts later overlapping clips); clips shorter than one 25 ms window are
    zero-padded to one window (ImageBind fails on them).

    Args:
        audio: a path or :class:`Audio` (loaded through :func:`load_audio`).
        clips: number of clips (ImageBind: 3).
        mel_bins: mel filterbank bins (ImageBind: 128; the encoder's ``audio_num_mel_bins``).
        target_frames: frames each clip is padded or cropped to (ImageBind: 204; the
            encoder's ``audio_target_len``).
        other_geometry: ignored, so that any encoder's options dict can be passed whole.
    """
    import torch
    import torchaudio

    _check_sizes(mel_bins=mel_bins, target_frames=target_frames)
    loaded = load_audio(audio)
    mono = loaded.waveform if loaded.waveform.ndim == 1 else loaded.waveform.mean(axis=0)
    waveform = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0)
    if loaded.sample_rate != AUDIO_SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, loaded.sample_rate, AUDIO_SAMPLE_RATE)
    # ImageBind computes the duration as a float and the clip bounds as Fractions: mirror it
    # so that sample boundaries match exactly.
    duration = waveform.shape[1] / AUDIO_SAMPLE_RATE
    specs = [
        _log_mel(
            waveform[:, int(start * AUDIO_SAMPLE_RATE) : int(end * AUDIO_SAMPLE_RATE)],
            mel_bins,
            target_frames,
        )
        for start, end in _clip_bounds(duration, AUDIO_CLIP_SECONDS, clips)
    ]
    return torch.stack(specs)


def _log_mel(clip: "torch.Tensor", mel_bins: int, target_frames: int) -> "torch.Tensor":
    """One (1, T) 16 kHz clip → normalised (1, mel_bins, target_frames) log-mel spectrogram."""
    import torch
    import torchaudio

    clip = clip - clip.mean()
    window = AUDIO_SAMPLE_RATE * _FBANK_FRAME_MS // 1000
    if clip.shape[1] < window:
        clip = torch.nn.functional.pad(clip, (0, window - clip.shape[1]))
    fbank = torchaudio.compliance.kaldi.fbank(
        clip,
        htk_compat=True,
        sample_frequency=AUDIO_SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=mel_bins,
        dither=0.0,
        frame_length=_FBANK_FRAME_MS,
        frame_shift=_FBANK_SHIFT_MS,
    ).transpose(0, 1)
    missing = target_frames - fbank.shape[1]
    if missing > 0:
        fbank = torch.nn.functional.pad(fbank, (0, missing))
    fbank = fbank[:, :target_frames].unsqueeze(0)
    return (fbank - AUDIO_MEAN) / AUDIO_STD


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_audio(audio: Audio, path: PathLike) -> Path:
    """Write audio as a 16-bit PCM WAV at the audio's own sample rate.

    Samples outside [-1, 1] are clipped (libsndfile would otherwise wrap them around).
    """
    import soundfile as sf

    if not isinstance(audio, Audio):
        raise MediaError(
            f"{path}: cannot write a {type(audio).__name__} as audio; pass an anygpt.types.Audio"
        )
    audio = _validate_audio(audio, str(path))
    data = audio.waveform if audio.waveform.ndim == 1 else audio.waveform.T
    if np.abs(data).max() > 1.0:
        logger.debug("%s: clipping samples outside [-1, 1]", path)
        data = np.clip(data, -1.0, 1.0)

    def save(target: Path) -> None:
        sf.write(str(target), data, audio.sample_rate, format="WAV", subtype="PCM_16")

    return _write_file(path, "audio", save)


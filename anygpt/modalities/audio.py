"""The audio modality."""

from anygpt.media.audio import audio_to_encoder_input, load_audio, write_audio
from anygpt.modalities import ModalitySpec, register_modality

SPEC = register_modality(ModalitySpec(
    name="audio",
    plural="audios",
    noun="an audio clip",
    signal_prefix="AUD",
    default_signal_tokens=8,
    encoder_input="audio",
    input_suffixes=(".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3"),
    output_suffix=".wav",
    default_decoder="audioldm",
    ui_component="Audio",
    rank=1,
    loader=load_audio,
    preprocessor=audio_to_encoder_input,
    writer=write_audio,
))

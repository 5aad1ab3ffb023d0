"""The audio modality."""

from anygpt.modalities import ModalitySpec, _register, lazy

SPEC = _register(ModalitySpec(
    name="audio",
    signal_prefix="AUD",
    encoder_input="audio",
    extensions=(".wav", ".flac", ".ogg", ".mp3"),
    default_decoder="audioldm",
    load=lazy("anygpt.media", "load_audio"),
    preprocess=lazy("anygpt.media", "audio_to_encoder_input"),
))

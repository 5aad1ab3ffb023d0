"""The video modality."""

from anygpt.modalities import ModalitySpec, _register, lazy

SPEC = _register(ModalitySpec(
    name="video",
    signal_prefix="VID",
    encoder_input="vision",
    extensions=(".mp4", ".webm", ".mov", ".mkv", ".avi"),
    default_decoder="text-to-video",
    load=lazy("anygpt.media", "load_video"),
    preprocess=lazy("anygpt.media", "video_to_encoder_input"),
))

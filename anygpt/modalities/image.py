"""The image modality."""

from anygpt.modalities import ModalitySpec, _register, lazy

SPEC = _register(ModalitySpec(
    name="image",
    signal_prefix="IMG",
    encoder_input="vision",
    extensions=(".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"),
    default_decoder="stable-diffusion",
    load=lazy("anygpt.media", "load_image"),
    preprocess=lazy("anygpt.media", "image_to_encoder_input"),
))

"""The image modality."""

from anygpt.media.image import image_to_encoder_input, load_image, write_image
from anygpt.modalities import ModalitySpec, register_modality

SPEC = register_modality(ModalitySpec(
    name="image",
    plural="images",
    noun="an image",
    signal_prefix="IMG",
    default_signal_tokens=4,
    encoder_input="vision",
    input_suffixes=(".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"),
    output_suffix=".png",
    default_decoder="stable-diffusion",
    ui_component="Image",
    rank=0,
    loader=load_image,
    preprocessor=image_to_encoder_input,
    writer=write_image,
))

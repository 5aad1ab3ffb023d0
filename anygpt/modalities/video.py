"""The video modality."""

from anygpt.media.video import load_video, video_to_encoder_input, write_video
from anygpt.modalities import ModalitySpec, register_modality

SPEC = register_modality(ModalitySpec(
    name="video",
    plural="videos",
    noun="a video",
    signal_prefix="VID",
    default_signal_tokens=24,
    encoder_input="vision",
    input_suffixes=(".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"),
    output_suffix=".mp4",
    default_decoder="text-to-video",
    ui_component="Video",
    rank=2,
    loader=load_video,
    preprocessor=video_to_encoder_input,
    writer=write_video,
))

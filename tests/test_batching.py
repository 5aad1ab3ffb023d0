"""Batched generation: one padded LLM batch, one decoder call per modality, and the same answers
as one call per prompt."""

import numpy as np
import pytest
import torch

from anygpt.config import SamplingSettings
from anygpt.conversation import Conversation
from anygpt.errors import ConfigError
from anygpt.generation import generate, generate_batch
from anygpt.types import GenerationOutput

PROMPTS = ["hello", "tell me a long story about cats and dogs", "draw", "x y z w"]
#: Batched and single calls differ only by the rounding of batched matrix products.
STATE_ATOL = 1e-4
PIXEL_ATOL = 2  # of 255


def _prompt(pipe, text):
    conversation = Conversation()
    conversation.add_user(text)
    prompt = pipe.model.lm.tokenize_prompt(conversation.turns, pipe.model.num_media_tokens(), reserve=64)
    return pipe.model.embed_prompt(prompt, []), prompt.input_ids


def _compare(single, batched):
    for a, b in zip(single, batched, strict=True):
        assert a.token_ids == b.token_ids
        assert a.stop_reason == b.stop_reason
        assert [(r.modality, r.start, r.forced) for r in a.runs] == [(r.modality, r.start, r.forced) for r in b.runs]
        for ra, rb in zip(a.runs, b.runs):
            torch.testing.assert_close(rb.hidden_states, ra.hidden_states, atol=STATE_ATOL, rtol=0)
        assert [p for p in a.pieces if isinstance(p, str)] == [p for p in b.pieces if isinstance(p, str)]


@pytest.fixture(scope="module")
def prompts(tiny_pipe):
    return [_prompt(tiny_pipe, text) for text in PROMPTS]


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("required", [(), ("image", "audio")])
def test_a_batch_decodes_as_each_prompt_alone(tiny_pipe, prompts, do_sample, required):
    lm = tiny_pipe.model.lm
    settings = SamplingSettings(max_new_tokens=24, do_sample=do_sample, seed=0)
    seeds = [11, 12, 13, 14]
    single = [generate(lm, e, ids, SamplingSettings(max_new_tokens=24, do_sample=do_sample, seed=s), required=required)
              for (e, ids), s in zip(prompts, seeds)]
    batched = generate_batch(lm, [e for e, _ in prompts], [ids for _, ids in prompts], settings,
                             required=required, seeds=seeds)
    _compare(single, batched)
    if required:
        assert all({r.modality for r in b.runs} >= set(required) for b in batched)


def test_a_stop_string_cut_inside_the_batch_masks_the_fed_tokens(tiny_pipe, prompts):
    """A stop string spanning several tokens cuts tokens that were already fed to the LLM; the
    batch masks them, so the appended run after the cut sees what a lone call sees."""
    lm = tiny_pipe.model.lm
    embeds, ids = [e for e, _ in prompts], [i for _, i in prompts]
    free = generate_batch(lm, embeds, ids, SamplingSettings(max_new_tokens=30, do_sample=True), seeds=[5, 6, 7, 8])
    text = lm.decode_text(free[1].token_ids)
    stop = text[len(text) // 3: len(text) // 3 + 3]
    settings = SamplingSettings(max_new_tokens=30, do_sample=True, stop_strings=(stop,))
    single = [generate(lm, e, i, SamplingSettings(max_new_tokens=30, do_sample=True, seed=s, stop_strings=(stop,)),
                       required=("image",)) for e, i, s in zip(embeds, ids, [5, 6, 7, 8])]
    batched = generate_batch(lm, embeds, ids, settings, required=("image",), seeds=[5, 6, 7, 8])
    assert batched[1].stop_reason == "stop_string"
    _compare(single, batched)


def test_generate_batch_checks_its_arguments(tiny_pipe, prompts):
    lm = tiny_pipe.model.lm
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate_batch(lm, [prompts[0][0]] * 2, [prompts[0][1]] * 2, SamplingSettings(), seeds=[1])


def _pixels(output):
    return [np.asarray(image, dtype=np.int16) for image in output.images]


def test_pipe_on_a_list_answers_each_prompt_as_a_single_call_would(tiny_pipe):
    kwargs = dict(outputs=("image",), max_new_tokens=16, seed=3)
    single = [tiny_pipe(p, **kwargs) for p in PROMPTS]
    batched = tiny_pipe(PROMPTS, **kwargs)
    assert isinstance(batched, list) and all(isinstance(o, GenerationOutput) for o in batched)
    for a, b in zip(single, batched, strict=True):
        assert a.raw_text == b.raw_text
        assert a.num_prompt_tokens == b.num_prompt_tokens
        assert len(a.images) == len(b.images) >= 1
        for pa, pb in zip(_pixels(a), _pixels(b)):
            assert np.abs(pa - pb).max() <= PIXEL_ATOL


def test_per_prompt_seeds_and_media(tiny_pipe, media_files):
    prompts = ["what is this?", [{"role": "user", "content": "and this?", "images": [media_files["image"]]}]]
    batched = tiny_pipe.batch(prompts, media=[{"image": [media_files["image"]]}, None],
                              seed=[4, 9], do_sample=True, max_new_tokens=12)
    alone = [tiny_pipe(prompts[0], images=[media_files["image"]], seed=4, do_sample=True, max_new_tokens=12),
             tiny_pipe(prompts[1], seed=9, do_sample=True, max_new_tokens=12)]
    assert [o.raw_text for o in batched] == [o.raw_text for o in alone]
    assert [o.num_prompt_tokens for o in batched] == [o.num_prompt_tokens for o in alone]


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": [1, 2, 3]}, "3 seeds for 2 prompts"),
    ({"images": ["x.png"]}, "cannot be split between the prompts"),
    ({"media": {"image": ["x.png"]}}, "list of 2 media mappings"),
    ({"seed": [1, -1]}, "seed"),
])
def test_bad_batch_arguments_are_one_clear_error(tiny_pipe, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny_pipe(["a", "b"], **kwargs)


def test_an_empty_batch_is_refused(tiny_pipe):
    with pytest.raises(ConfigError, match="at least one prompt"):
        tiny_pipe.batch([])


def test_chat_over_several_conversations(tiny_pipe):
    batched = [Conversation(), Conversation()]
    alone = [Conversation(), Conversation()]
    for turn in ("hi", "more"):
        outputs = tiny_pipe.chat(batched, [f"{turn} one", f"{turn} two"], seed=1, max_new_tokens=8)
        expected = [tiny_pipe.chat(c, f"{turn} {n}", seed=1, max_new_tokens=8) for c, n in zip(alone, ("one", "two"))]
        assert [o.raw_text for o in outputs] == [o.raw_text for o in expected]
    assert [c.turns for c in batched] == [c.turns for c in alone]


def test_a_failed_batched_chat_leaves_every_conversation_as_it_was(tiny_pipe, monkeypatch):
    conversations = [Conversation(), Conversation()]
    tiny_pipe.chat(conversations, ["first", "second"], seed=0, max_new_tokens=4)
    before = [c.turns for c in conversations]

    def explode(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(tiny_pipe, "_decode_runs", explode)
    with pytest.raises(RuntimeError, match="exploded"):
        tiny_pipe.chat(conversations, ["again", "again"], outputs=("image",), max_new_tokens=4)
    assert [c.turns for c in conversations] == before
    with pytest.raises(ConfigError, match="one message per conversation"):
        tiny_pipe.chat(conversations, "one string")


def test_each_modality_is_decoded_in_chunks_of_decode_batch_size(tiny_pipe, monkeypatch):
    decoder = tiny_pipe.decoder("image")
    calls = []
    original = decoder.decode

    def counting(condition, **kwargs):
        calls.append(len(condition))
        return original(condition, **kwargs)

    monkeypatch.setattr(decoder, "decode", counting)
    kwargs = dict(outputs=("image",), max_new_tokens=8, seed=2)
    whole = tiny_pipe(PROMPTS, **kwargs)
    assert calls == [4]
    calls.clear()
    monkeypatch.setattr(tiny_pipe, "decode_batch_size", 3)
    chunked = tiny_pipe(PROMPTS, **kwargs)
    assert calls == [3, 1]
    for a, b in zip(whole, chunked):
        for pa, pb in zip(_pixels(a), _pixels(b)):
            assert np.abs(pa - pb).max() <= PIXEL_ATOL


def test_a_decoder_seeds_each_row_as_a_batch_of_one(tiny_pipe):
    decoder = tiny_pipe.decoder("image")
    condition = torch.randn(3, *decoder.condition_shape, generator=torch.Generator().manual_seed(0))
    rows = decoder.decode(condition, seed=[7, 8, 9])
    alone = [decoder.decode(condition[i:i + 1], seed=s)[0] for i, s in enumerate([7, 8, 9])]
    for a, b in zip(rows, alone):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= PIXEL_ATOL
    assert np.asarray(rows[0]).tolist() != np.asarray(rows[1]).tolist()  # the seeds differ, so do the rows
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        decoder.decode(condition, seed=[1, 2])


def test_streamed_media_fill_their_own_places(tiny_pipe):
    """All media of a modality are decoded together; the stream announces every item first and
    the final output keeps the answer's order."""
    from anygpt.types import MediaSegment, MediaStarted

    events = list(tiny_pipe.stream(Conversation(), "draw and sing", outputs=("image", "audio"), seed=0,
                                   max_new_tokens=6))
    started = [e for e in events if isinstance(e, MediaStarted)]
    segments = [e for e in events if isinstance(e, MediaSegment)]
    output = events[-1]
    assert [(s.modality, s.index) for s in started] == [(s.modality, i) for i, s in
                                                       enumerate(x for x in output.segments if isinstance(x, MediaSegment))]
    assert sorted(s.modality for s in segments) == sorted(s.modality for s in started)
    assert events.index(started[-1]) < events.index(segments[0])


def test_the_memory_plan_bounds_the_decode_batch():
    from anygpt.memory import RESERVED, _working, plan_memory, preset_components

    plan = plan_memory(preset_components("nextgpt-7b"), "24GB")
    component = next(c for c in plan.components if c.name == "decoder/video")
    per_item = _working(component, plan.placement("decoder/video").vae_slicing)
    expected = 1 + (plan.budget - RESERVED - plan.peak) // per_item
    assert plan.max_decode_batch("decoder/video") == expected >= 1
    tight = plan_memory(preset_components("nextgpt-7b"), "12GB")
    assert tight.max_decode_batch("decoder/video") >= 1

"""Chat keeps the LLM's KV cache between turns: later turns prefill only their new tokens, the
answers are those of a full prefill, and the cache never outlives what it was computed for."""

import logging

import pytest
import torch

from anygpt.conversation import Conversation
from anygpt.generation import generate
from anygpt.turns import Turn

GREEDY = {"do_sample": False, "max_new_tokens": 10, "seed": 0}
MESSAGES = ["hello there", "tell me more", "draw it", "once more"]


def _chat(pipe, conversation, messages=MESSAGES, **settings):
    outputs = []
    for i, message in enumerate(messages):
        outputs.append(pipe.chat(conversation, message, outputs=("image",) if i == 2 else (),
                                 **{**GREEDY, **settings}))
    return outputs


def test_later_turns_reuse_the_cache_and_answer_as_a_full_prefill(tiny_pipe):
    cached = _chat(tiny_pipe, Conversation())
    fresh = _chat(tiny_pipe, Conversation(keep_cache=False))
    assert [o.raw_text for o in cached] == [o.raw_text for o in fresh]
    assert cached[0].num_cached_tokens == 0
    for output in cached[1:]:
        # Everything up to the previous answer is reused; at least the last position is rerun.
        assert 0 < output.num_cached_tokens < output.num_prompt_tokens
    assert all(o.num_cached_tokens == 0 for o in fresh)
    assert [o.num_prompt_tokens for o in cached] == [o.num_prompt_tokens for o in fresh]


def test_the_kept_cache_holds_the_prompt_and_the_kept_answer(tiny_pipe):
    conversation = Conversation()
    output = tiny_pipe.chat(conversation, "hello there", **GREEDY)
    assert conversation.cached_tokens == output.num_prompt_tokens + output.num_generated_tokens
    assert "cached tokens" in repr(conversation)
    conversation.clear_cache()
    assert conversation.cached_tokens == 0


def test_signal_states_with_a_reused_cache_equal_a_full_prefill(tiny_pipe):
    """The hidden states that condition the decoders do not depend on the cache being reused."""
    model = tiny_pipe.model
    conversation = Conversation()
    tiny_pipe.chat(conversation, "hello there", **GREEDY)
    conversation.add_user("draw it")
    prompt = model.lm.tokenize_prompt(conversation.turns, model.num_media_tokens(), reserve=10)
    embeds = model.embed_prompt(prompt, [])
    settings = tiny_pipe._settings(("image",), GREEDY)[0]
    reuse = conversation.take_cache()
    cached = generate(model.lm, embeds, prompt.input_ids, settings, required=("image",),
                      position_keys=prompt.position_keys(), reuse=reuse)
    full = generate(model.lm, embeds, prompt.input_ids, settings, required=("image",))
    assert cached.reused_tokens > 0 and full.reused_tokens == 0
    assert cached.token_ids == full.token_ids
    (a,), (b,) = cached.runs, full.runs
    torch.testing.assert_close(a.hidden_states, b.hidden_states, atol=1e-5, rtol=1e-4)


def test_undo_reuses_the_common_prefix_and_answers_as_fresh(tiny_pipe):
    conversation = Conversation()
    _chat(tiny_pipe, conversation, MESSAGES[:2])
    conversation.undo()
    again = tiny_pipe.chat(conversation, "something else", **GREEDY)
    fresh_conversation = Conversation(keep_cache=False)
    tiny_pipe.chat(fresh_conversation, MESSAGES[0], **GREEDY)
    fresh = tiny_pipe.chat(fresh_conversation, "something else", **GREEDY)
    assert again.raw_text == fresh.raw_text
    assert 0 < again.num_cached_tokens < again.num_prompt_tokens


def test_a_failed_turn_drops_the_cache_and_the_next_turn_is_prefilled_in_full(tiny_pipe, monkeypatch):
    conversation = Conversation()
    tiny_pipe.chat(conversation, "hello there", **GREEDY)
    assert conversation.cached_tokens > 0

    def explode(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    with monkeypatch.context() as patch:
        patch.setattr(tiny_pipe, "_decode_runs", explode)
        with pytest.raises(RuntimeError, match="exploded"):
            tiny_pipe.chat(conversation, "draw it", outputs=("image",), **GREEDY)
    assert conversation.cached_tokens == 0 and len(conversation.turns) == 2
    output = tiny_pipe.chat(conversation, "draw it", outputs=("image",), **GREEDY)
    assert output.num_cached_tokens == 0


def test_a_stream_stopped_early_leaves_no_cache_behind(tiny_pipe):
    conversation = Conversation()
    tiny_pipe.chat(conversation, "hello there", **GREEDY)
    stream = tiny_pipe.stream(conversation, "tell me more", **GREEDY)
    next(stream)
    stream.close()
    assert conversation.cached_tokens == 0 and len(conversation.turns) == 2


def test_another_model_or_dtype_never_reuses_the_cache(tiny_pipe):
    from anygpt import AnyGPTPipeline

    conversation = Conversation()
    tiny_pipe.chat(conversation, "hello there", **GREEDY)
    other = AnyGPTPipeline.from_pretrained("tiny")
    other.set_progress_bar_config(disable=True)
    assert other.chat(conversation, "tell me more", **GREEDY).num_cached_tokens == 0
    other.to(dtype=torch.float64)
    assert other.chat(conversation, "once more", **GREEDY).num_cached_tokens == 0
    assert other.chat(conversation, "and again", **GREEDY).num_cached_tokens > 0


def test_media_slots_are_keyed_by_their_media(tiny_pipe, media_files):
    model = tiny_pipe.model
    conversation = Conversation()
    conversation.add_user("what is this", {"image": [media_files["image"]]})
    conversation.add_user("and this", {"audio": [media_files["audio"]]})
    prompt = model.lm.tokenize_prompt(conversation.turns, model.num_media_tokens())
    keys = prompt.position_keys()
    slots = [k for k in keys if isinstance(k, tuple)]
    counts = model.num_media_tokens()
    image, audio = (turn.media[0].key for turn in conversation.turns)
    assert slots == ([(image, i) for i in range(counts["image"])] + [(audio, i) for i in range(counts["audio"])])
    plain = [k for k, masked in zip(keys, prompt.media_mask.tolist()) if not masked]
    assert plain == prompt.input_ids[~prompt.media_mask].tolist()


def test_a_chat_with_media_reuses_its_slots(tiny_pipe, media_files):
    conversation = Conversation()
    first = tiny_pipe.chat(conversation, "what is this", images=[media_files["image"]], **GREEDY)
    second = tiny_pipe.chat(conversation, "tell me more", **GREEDY)
    assert first.num_cached_tokens == 0
    # The image's slots are inside the reused prefix.
    assert second.num_cached_tokens > sum(tiny_pipe.model.num_media_tokens().values())


def test_trimming_renders_a_long_chat_a_logarithmic_number_of_times(tiny_pipe, monkeypatch, caplog):
    lm = tiny_pipe.model.lm
    turns = [Turn("system", "be brief")]
    for i in range(32):
        turns += [Turn("user", f"q{i}"), Turn("assistant", f"a{i}")]
    turns.append(Turn("user", "last question"))
    full = lm._tokenize(turns, {}).input_ids.numel()
    assert full < lm.max_context
    limit = full // 2
    reserve = lm.max_context - limit
    calls = []
    original = type(lm)._tokenize
    monkeypatch.setattr(type(lm), "_tokenize", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with caplog.at_level(logging.WARNING, logger="anygpt.llm"):
        prompt = lm.tokenize_prompt(turns, {}, reserve=reserve)
    assert prompt.input_ids.numel() <= limit and prompt.dropped_turns > 0
    assert len(calls) <= 8  # 33 candidate starts: about log2(33) + 2 renderings, not 33
    # The oldest start that fits: keeping one more exchange would not fit.
    kept = [turns[0]] + turns[1 + prompt.dropped_turns:]
    longer = [turns[0]] + turns[prompt.dropped_turns - 1:]
    assert original(lm, kept, {}).input_ids.numel() == prompt.input_ids.numel()
    assert original(lm, longer, {}).input_ids.numel() > limit
    assert f"dropped the {prompt.dropped_turns} oldest turn(s)" in caplog.text


def test_a_chat_that_fits_drops_nothing_and_says_nothing(tiny_pipe, caplog):
    lm = tiny_pipe.model.lm
    turns = [Turn("system", "be brief"), Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "bye")]
    with caplog.at_level(logging.WARNING, logger="anygpt.llm"):
        prompt = lm.tokenize_prompt(turns, {})
    assert prompt.dropped_turns == 0 and "dropped" not in caplog.text


def test_mini_reuses_nearly_the_whole_history(mini_pipe):
    """With a real chat template the previous answer re-tokenizes as it was generated, so the
    new prefill is only the end-of-turn markers and the new message."""
    conversation = Conversation()
    settings = {"do_sample": False, "max_new_tokens": 12, "seed": 0}
    first = mini_pipe.chat(conversation, "What is the capital of France?", **settings)
    second = mini_pipe.chat(conversation, "And of Italy?", **settings)
    new = second.num_prompt_tokens - second.num_cached_tokens
    assert second.num_cached_tokens >= first.num_prompt_tokens
    assert new <= len(mini_pipe.model.lm.tokenizer("And of Italy?").input_ids) + 12

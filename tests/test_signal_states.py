"""The hidden state fed to an output projector is the same at inference and in training.

For a signal token at sequence position p (its input id is [IMG_k]), both take the LLM's last-layer
output at p, the state computed while reading [IMG_k], as NExT-GPT's training does (see
docs/signal_states.md). Here a turn is generated through the pipeline with the LLM steered to a
chosen answer, the states reaching the output projector are captured, and the same prompt +
answer is run through the training objective (collate -> AlignmentObjective), whose states
reaching the same projector are captured too.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import anygpt.pipeline as pipeline_module
from anygpt.alignment.config import LossConfig
from anygpt.alignment.data import collate
from anygpt.alignment.objective import AlignmentObjective

TOL = dict(rtol=1e-5, atol=1e-5)  # float32; the cached and the full pass differ by ~1e-6


@contextmanager
def _steer(lm, plan):
    """Make the LLM write ``plan[k]`` as generated token k; elsewhere it may write neither EOS nor
    the first token of a signal run (so no run or stop happens by chance)."""
    head = lm.model.get_output_embeddings()
    banned = list(lm.eos_ids) + [ids[0] for ids in lm.signal_ids.values()]
    step = {"k": 0}

    def hook(module, inputs, output):
        if output.shape[1] != 1:  # an appended run's pass: its logits are not used
            return output
        k, step["k"] = step["k"], step["k"] + 1
        bias = torch.zeros(output.shape[-1], dtype=output.dtype)
        bias[banned] = -1e4
        if k in plan:
            bias[plan[k]] = 1e4
        return output + bias

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _projector_inputs(model):
    """Record the hidden states (S, H) each output projector is called with, by modality."""
    seen = {m: [] for m in model.output_projectors}
    handles = [proj.register_forward_pre_hook(lambda mod, args, m=m: seen[m].append(args[0][0].detach().clone()))
               for m, proj in model.output_projectors.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _text(lm, chars):
    return [lm.tokenizer.convert_tokens_to_ids(c) for c in chars]  # byte-level: one token per character


def _generate(pipe, monkeypatch, plan, *, outputs=(), images=(), max_new_tokens=10):
    """Answer one message with the LLM steered by ``plan``; returns the prompt, its media
    embeddings, the decoding result and the projector inputs by modality."""
    model, record = pipe.model, {}
    real_stream, real_embed = pipeline_module.generate_stream, model.embed_prompt

    def embed_prompt(prompt, media_embeddings):
        record["prompt"], record["media"] = prompt, [e.clone() for e in media_embeddings]
        return real_embed(prompt, media_embeddings)

    def generate_stream(*args, **kwargs):
        record["result"] = yield from real_stream(*args, **kwargs)
        return record["result"]

    monkeypatch.setattr(pipeline_module, "generate_stream", generate_stream)
    model.embed_prompt = embed_prompt  # an instance attribute over the method, deleted below
    try:
        with _steer(model.lm, plan), _projector_inputs(model) as seen:
            output = pipe("Draw something", outputs=outputs, images=list(images), max_new_tokens=max_new_tokens,
                          do_sample=False, steps=1)
    finally:
        del model.embed_prompt
        monkeypatch.undo()
    return record["prompt"], record["media"], record["result"], seen, output


def _training_batch(model, prompt, media, token_ids, modality):
    """The teacher-forced training batch of prompt + answer, as the alignment data collates it."""
    answer = torch.tensor(token_ids, dtype=torch.long)
    item = {
        "input_ids": torch.cat([prompt.input_ids, answer]),
        "labels": torch.cat([torch.full_like(prompt.input_ids, -100), answer]),
        "media_mask": torch.cat([prompt.media_mask, torch.zeros(len(answer), dtype=torch.bool)]),
        "media": [(ref.modality, emb) for ref, emb in zip(prompt.media, media)],
        "caption": "a caption", "output_modality": modality, "index": 0,
    }
    return collate([item], pad_id=0)


def _training_states(model, batch, *, memoized):
    """The run states the training objective gives the output projectors, by modality.

    ``memoized``: the output-projector-only path (frozen upstream, states computed once per
    example); otherwise the path that runs the whole model on every batch.
    """
    objective = AlignmentObjective(model, LossConfig(lm=0.0, condition_mse=1.0))
    frozen = [p for n, p in model.named_parameters() if not n.startswith("output_projectors.") and p.requires_grad]
    try:
        if memoized:
            for p in frozen:
                p.requires_grad_(False)
            objective.train()
            assert objective._only_output_projectors_train()
        else:
            objective.eval()
        with torch.no_grad(), _projector_inputs(model) as seen:
            objective(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media_mask"],
                      batch["media"], batch["captions"], batch["output_modalities"], batch["indices"])
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return seen


def _check_same_states(pipe, prompt, media, result, seen, modality):
    """The generation's projector input for the (only) ``modality`` run equals the training
    objective's, on both training paths; returns it."""
    (generated,) = seen[modality]
    (run,) = [r for r in result.runs if r.modality == modality]
    torch.testing.assert_close(generated, run.hidden_states, rtol=0, atol=0)
    batch = _training_batch(pipe.model, prompt, media, result.token_ids, modality)
    for memoized in (False, True):
        trained = _training_states(pipe.model, batch, memoized=memoized)[modality]
        assert len(trained) == 1, trained
        assert torch.allclose(generated, trained[0], **TOL), (memoized, (generated - trained[0]).abs().max())
    return generated


def test_run_after_text_gets_the_training_states(tiny_pipe, media_files, monkeypatch):
    lm = tiny_pipe.model.lm
    image_run = lm.signal_ids["image"]
    plan = dict(enumerate(_text(lm, "Sur")))
    plan.update({3: image_run[0], 7: _text(lm, "o")[0], 8: _text(lm, "k")[0], 9: _text(lm, ".")[0]})
    prompt, media, result, seen, output = _generate(tiny_pipe, monkeypatch, plan, images=[media_files["image"]])
    assert prompt.media_mask.any()  # the prompt holds an image: media slots in the training pass too
    assert result.token_ids == _text(lm, "Sur") + image_run + _text(lm, "ok.")
    (run,) = result.runs
    assert run.start == 3 and not run.forced
    _check_same_states(tiny_pipe, prompt, media, result, seen, "image")


def test_run_as_first_generated_token_gets_the_training_states(tiny_pipe, monkeypatch):
    lm = tiny_pipe.model.lm
    audio_run = lm.signal_ids["audio"]
    plan = {0: audio_run[0], 8: _text(lm, "!")[0]}
    prompt, media, result, seen, _ = _generate(tiny_pipe, monkeypatch, plan, max_new_tokens=9)
    assert result.token_ids == audio_run + _text(lm, "!")
    assert result.runs[0].start == 0
    _check_same_states(tiny_pipe, prompt, media, result, seen, "audio")


def test_appended_run_gets_the_training_states(tiny_pipe, monkeypatch):
    """outputs=("image",) and the LLM writes text then EOS: the pipeline appends the run."""
    lm = tiny_pipe.model.lm
    plan = dict(enumerate(_text(lm, "Hey")))
    plan[3] = next(iter(lm.eos_ids))
    prompt, media, result, seen, output = _generate(tiny_pipe, monkeypatch, plan, outputs=("image",))
    assert result.stop_reason == "eos"
    assert result.token_ids == _text(lm, "Hey") + lm.signal_ids["image"]
    assert result.runs[0].forced and output.segments[-1].forced
    _check_same_states(tiny_pipe, prompt, media, result, seen, "image")


def test_run_completed_past_the_token_limit_gets_the_training_states(tiny_pipe, monkeypatch):
    """The LLM begins a run at its last allowed token; the pipeline completes it."""
    lm = tiny_pipe.model.lm
    plan = {0: _text(lm, "A")[0], 1: _text(lm, "B")[0], 2: lm.signal_ids["video"][0]}
    prompt, media, result, seen, _ = _generate(tiny_pipe, monkeypatch, plan, outputs=("video",), max_new_tokens=3)
    assert result.stop_reason == "length"
    assert result.token_ids == _text(lm, "AB") + lm.signal_ids["video"]
    assert not result.runs[0].forced
    _check_same_states(tiny_pipe, prompt, media, result, seen, "video")


def test_run_appended_after_a_stop_string_gets_the_training_states(tiny_pipe, monkeypatch):
    """A stop string of several tokens: its first tokens were fed to the LLM before it was
    recognised and are cut from the answer, so the appended run must not see them."""
    lm = tiny_pipe.model.lm
    assert "###" in lm.stop_strings
    plan = dict(enumerate(_text(lm, "ab###")))
    prompt, media, result, seen, _ = _generate(tiny_pipe, monkeypatch, plan, outputs=("image",))
    assert result.stop_reason == "stop_string"
    assert result.token_ids == _text(lm, "ab") + lm.signal_ids["image"]
    _check_same_states(tiny_pipe, prompt, media, result, seen, "image")


@pytest.mark.parametrize("shift", [-1, 1])
def test_states_of_neighbouring_positions_would_not_match(tiny_pipe, monkeypatch, shift):
    """The check above is not trivially true: the state that predicted each signal token
    (position p-1, what a one-off slice would give) and the next position both differ."""
    lm, model = tiny_pipe.model.lm, tiny_pipe.model
    plan = dict(enumerate(_text(lm, "Sur")))
    plan.update({3: lm.signal_ids["image"][0], 7: _text(lm, "!")[0]})
    prompt, media, result, seen, _ = _generate(tiny_pipe, monkeypatch, plan, max_new_tokens=8)
    generated = _check_same_states(tiny_pipe, prompt, media, result, seen, "image")

    batch = _training_batch(model, prompt, media, result.token_ids, "image")
    with torch.no_grad():
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], media_mask=batch["media_mask"],
                       media=batch["media"]).hidden_states[0]
    start = prompt.input_ids.numel() + result.runs[0].start
    positions = torch.arange(start, start + len(lm.signal_ids["image"]))
    assert torch.allclose(generated, hidden[positions], **TOL)
    shifted = hidden[positions + shift]
    assert not torch.allclose(generated, shifted, rtol=1e-2, atol=1e-2)
    assert ((generated - shifted).abs().amax(-1) > 1e-2).all()  # every token's state, not just one


def test_signal_states_reads_the_positions_holding_the_run_tokens(tiny_pipe):
    """Training's selection, on its own: the rows of ``hidden_states`` at the positions whose
    input id is a run token (NExT-GPT: ``targets == gen_token_idx``, targets unshifted)."""
    model = tiny_pipe.model
    run = model.lm.signal_ids["image"]
    ids = torch.tensor([[5, 6, *run, 7], [8, *run, 9, 10]])
    hidden = torch.arange(ids.numel(), dtype=torch.float32).reshape(*ids.shape, 1).expand(-1, -1, 3)
    states = model.signal_states(hidden, ids, "image")
    assert states.shape == (2, len(run), 3)
    torch.testing.assert_close(states[0], hidden[0, 2:2 + len(run)])
    torch.testing.assert_close(states[1], hidden[1, 1:1 + len(run)])

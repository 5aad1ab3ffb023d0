"""The composed model's training-side API: dialogue tokenisation, teacher-forced pass, signal states."""

import torch

from anygpt.conversation import Conversation
from anygpt.turns import Turn


def test_dialogue_labels_cover_only_answers(tiny_pipe):
    lm = tiny_pipe.model.lm
    turns = [Turn("user", "Show a cat"), Turn("assistant", "Here [IMG0][IMG1][IMG2][IMG3]"),
             Turn("user", "Thanks"), Turn("assistant", "Welcome")]
    enc = lm.tokenize_dialogue(turns, tiny_pipe.model.num_media_tokens())
    labelled = enc.input_ids[enc.labels != -100].tolist()
    assert lm.decode(labelled) == " Here [IMG0][IMG1][IMG2][IMG3]\n### Welcome\n###"
    assert (enc.labels[enc.labels != -100] == enc.input_ids[enc.labels != -100]).all()


def _image_turn(pipe, image, question: str, answer: str):
    """A one-turn dialogue about ``image``: its tokenisation and its media as the model takes them."""
    conv = Conversation()
    conv.add_user(question, {"image": [image]})
    pipe._encode_pending(conv)
    conv.add_assistant(answer)
    enc = pipe.model.lm.tokenize_dialogue(conv.turns, pipe.model.num_media_tokens())
    return conv, enc, [(r.modality, conv.encoding(r.key)) for r in enc.media]


def test_forward_loss_and_signal_states_match_generation_path(tiny_pipe, media_files):
    model = tiny_pipe.model
    conv, enc, media = _image_turn(tiny_pipe, media_files["image"], "Look <image>",
                                   "ok [AUD0][AUD1][AUD2][AUD3][AUD4][AUD5][AUD6][AUD7] done")
    out = model(enc.input_ids[None], media_mask=enc.media_mask[None], media=media, labels=enc.labels[None])
    assert torch.isfinite(out.loss) and out.hidden_states.shape[:2] == (1, enc.input_ids.numel())

    states = model.signal_states(out.hidden_states, enc.input_ids[None], "audio")
    assert states.shape == (1, 8, model.lm.hidden_size)
    # The inference embedding path gives the same input embeddings.
    prompt_embeds = model.embed_prompt(enc, [conv.encoding(r.key) for r in enc.media])
    torch.testing.assert_close(prompt_embeds, model.embed_inputs(enc.input_ids[None], enc.media_mask[None], media))
    cond = model.project_signals("audio", states)
    assert cond.shape == (1, *tiny_pipe.decoder("audio").condition_shape)


def test_loss_gradients_reach_input_projector_and_signal_rows(tiny_pipe, media_files):
    model = tiny_pipe.model
    _, enc, media = _image_turn(tiny_pipe, media_files["image"], "<image>", "[IMG0][IMG1][IMG2][IMG3]")
    emb = model.lm.model.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        out = model(enc.input_ids[None], media_mask=enc.media_mask[None], media=media, labels=enc.labels[None])
        states = model.signal_states(out.hidden_states, enc.input_ids[None], "image")
        (out.loss + model.project_signals("image", states).pow(2).mean()).backward()
        assert model.input_projectors["image"].proj.weight.grad.abs().sum() > 0
        assert emb.grad[model.lm.signal_ids["image"]].abs().sum() > 0
    finally:
        emb.requires_grad_(False)
        emb.grad = None
        model.zero_grad(set_to_none=True)

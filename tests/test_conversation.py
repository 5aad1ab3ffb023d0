"""Conversation owns its state: turns, pending media and encodings change only through its
methods, and a failed or abandoned turn is rolled back."""

import pytest

from anygpt.conversation import Conversation
from anygpt.errors import ConfigError


def test_turns_are_a_read_only_view(media_files):
    conv = Conversation()
    conv.add_user("hi", {"image": [media_files["image"]]})
    assert isinstance(conv.turns, tuple)
    with pytest.raises(AttributeError):
        conv.turns.append("x")  # type: ignore[attr-defined]
    (ref,) = conv.turns[0].media
    assert ref.source == str(media_files["image"]) and ref.key != ref.source  # a content hash


def test_same_media_twice_is_loaded_once(media_files):
    conv = Conversation()
    conv.add_user("a", {"image": [media_files["image"]]})
    conv.add_user("b", {"image": [media_files["image"]]})
    assert len(conv.pending()) == 1
    assert conv.turns[0].media[0].key == conv.turns[1].media[0].key


def test_rollback_forgets_turns_and_their_unencoded_media(media_files):
    conv = Conversation()
    conv.add_user("keep", {"image": [media_files["image"]]})
    mark = conv.mark()
    conv.add_user("drop", {"audio": [media_files["audio"]]})
    conv.add_assistant("answer")
    conv.rollback(mark)
    assert [t.text for t in conv.turns] == ["keep"]
    assert [p.modality for p in conv.pending()] == ["image"]


def test_encodings_are_recorded_through_the_conversation(media_files):
    import torch

    conv = Conversation()
    conv.add_user("hi", {"image": [media_files["image"]]})
    (item,) = conv.pending()
    conv.record_encoding(item.key, torch.ones(3))
    assert conv.pending() == [] and conv.num_encoded == 1
    assert torch.equal(conv.encoding(item.key), torch.ones(3))
    with pytest.raises(KeyError, match="not been encoded"):
        conv.encoding("unknown")


def test_a_failed_chat_turn_leaves_the_conversation_as_it_was(tiny_pipe, media_files, monkeypatch):
    conv = Conversation()
    tiny_pipe.chat(conv, "first", seed=0, max_new_tokens=4)
    before = conv.turns

    def explode(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(tiny_pipe, "_decode_runs", explode)
    with pytest.raises(RuntimeError, match="exploded"):
        tiny_pipe.chat(conv, "draw this", images=[media_files["image"]], outputs=("image",), seed=0)
    assert conv.turns == before and conv.pending() == []
    with pytest.raises(ConfigError, match="temperature"):
        tiny_pipe.chat(conv, "bad settings", temperature=-1.0)
    assert conv.turns == before

    monkeypatch.undo()
    out = tiny_pipe.chat(conv, "second", seed=0, max_new_tokens=4)
    assert [t.text for t in conv.turns if t.role == "user"] == ["first", "second"]
    assert out.raw_text == conv.turns[-1].text


def test_an_abandoned_stream_is_rolled_back(tiny_pipe):
    conv = Conversation()
    events = tiny_pipe.stream(conv, "tell me a story", seed=0, max_new_tokens=8)
    next(events)  # the first text delta: the user turn is in the conversation now
    assert [t.text for t in conv.turns] == ["tell me a story"]
    events.close()
    assert conv.turns == ()


def test_a_finished_stream_records_the_answer(tiny_pipe):
    conv = Conversation()
    events = list(tiny_pipe.stream(conv, "hello", seed=0, max_new_tokens=4))
    assert [t.role for t in conv.turns] == ["user", "assistant"]
    assert conv.turns[-1].text == events[-1].raw_text


def test_media_without_a_message_is_an_error(tiny_pipe, media_files):
    with pytest.raises(ConfigError, match="without a message"):
        tiny_pipe.chat(Conversation(), images=[media_files["image"]])

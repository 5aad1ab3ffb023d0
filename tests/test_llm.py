"""LLM wrapper: extra tokens, prompt formats, media slots, loading from disk."""

import pytest
import torch

from anygpt.config import LLMConfig
from anygpt.errors import WeightsNotFoundError
from anygpt.llm import LanguageModel, build_byte_level_tokenizer
from anygpt.turns import MediaRef, Turn

SIGNALS = {"image": [f"[IMG{i}]" for i in range(4)], "video": [f"[VID{i}]" for i in range(24)],
           "audio": [f"[AUD{i}]" for i in range(8)]}
ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def lm():
    return LanguageModel.from_config(LLMConfig(arch=ARCH, tokenizer="byte-level"), SIGNALS)


def test_token_order_matches_nextgpt(lm):
    """<Img>, </Img>, then each run in config order: NExT-GPT's 32000..32037 layout, offset by
    the base vocabulary."""
    base = 257
    assert lm.media_begin_id == base and lm.media_end_id == base + 1
    assert lm.signal_ids["image"] == list(range(base + 2, base + 6))
    assert lm.signal_ids["video"][0] == base + 6 and lm.signal_ids["audio"][-1] == base + 37
    assert lm.model.get_input_embeddings().num_embeddings == base + 38


def test_new_rows_are_distinct_and_in_distribution(lm):
    emb = lm.model.get_input_embeddings().weight
    new = emb[lm.added_token_ids()]
    assert torch.unique(new, dim=0).shape[0] == new.shape[0]
    assert abs(new.std().item() - emb[:257].std().item()) < 0.5 * emb[:257].std().item()


def test_byte_level_tokenizer_round_trips_any_text():
    tok = build_byte_level_tokenizer()
    text = "Grüße, 世界! 🎨 ### [IMG0]"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_nextgpt_format_and_media_slots(lm):
    turns = [Turn("user", "Compare <audio> with this", [MediaRef("image", "i"), MediaRef("audio", "a")]),
             Turn("assistant", "Sure"), Turn("user", "Thanks")]
    assert lm.prompt_format == "nextgpt"
    text = lm.render(turns)
    assert text == ("### Human: <|anygpt-media-0|> Compare <|anygpt-media-1|> with this\n### Assistant:"
                    " Sure\n###### Human: Thanks\n### Assistant:")
    prompt = lm.tokenize_prompt(turns, {"image": 2, "audio": 3})
    assert [m.key for m in prompt.media] == ["i", "a"]
    assert int(prompt.media_mask.sum()) == 5
    ids = prompt.input_ids.tolist()
    # each item: <Img> slot… </Img>
    first = ids.index(lm.media_end_id)
    assert ids[first - 3] == lm.media_begin_id and prompt.media_mask[first - 2:first].all()


def test_chat_template_is_used_when_present(lm):
    tok = lm.tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    try:
        lm2 = LanguageModel(lm.model, tok, LLMConfig(arch=ARCH, tokenizer="byte-level", system_prompt="Be kind."), SIGNALS)
        assert lm2.prompt_format == "chat_template"
        assert lm2.render([Turn("user", "hi")]) == "<system>Be kind.<user>hi<assistant>"
        assert lm2.stop_strings == []
    finally:
        tok.chat_template = None


def test_saved_llm_reloads_from_a_directory(lm, tmp_path):
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = LanguageModel.from_config(LLMConfig(pretrained=str(tmp_path)), SIGNALS)
    assert again.signal_ids == lm.signal_ids
    saved, reloaded = lm.model.state_dict(), again.model.state_dict()
    assert reloaded.keys() == saved.keys()  # zip alone would pass on a missing tensor
    for name in saved:
        assert torch.equal(saved[name], reloaded[name]), name


def test_missing_llm_raises_weights_not_found(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(WeightsNotFoundError, match=f"llm.pretrained: no model folder at {absent}"):
        LanguageModel.from_config(LLMConfig(pretrained=str(absent)), SIGNALS)


def test_random_llm_uses_the_tokenizers_special_ids(lm):
    assert lm.eos_ids == {lm.tokenizer.eos_token_id}

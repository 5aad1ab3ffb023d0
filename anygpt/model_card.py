"""The model card (``README.md``) of a model directory: Hugging Face metadata, the components
and where each comes from, and, for a trained stage, its data and evaluation."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["model_card", "MODEL_CARD_FILENAME"]

MODEL_CARD_FILENAME = "README.md"


def _source(value: str | None, arch: Any) -> str:
    if value:
        return f"`{value}`"
    return "built from `arch` with seeded random weights" if arch else "none"


def _components(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(part, kind, source)`` rows, from a config dict (``AnyGPTConfig.to_dict()``)."""
    encoder, llm = config["encoder"], config["llm"]
    rows = [("encoder", encoder["name"], _source(encoder.get("pretrained"), encoder.get("arch")))]
    llm_source = _source(llm.get("pretrained"), llm.get("arch"))
    if llm.get("gguf_file"):
        llm_source += f" (GGUF `{llm['gguf_file']}`)"
    rows.append(("LLM", "causal LM", llm_source))
    for name, modality in config["modalities"].items():
        decoder = modality.get("decoder")
        if decoder:
            rows.append((f"decoder/{name}", decoder["name"], _source(decoder.get("pretrained"), decoder.get("arch"))))
    inputs = [m for m, spec in config["modalities"].items() if spec.get("input_projector") is not None]
    outputs = [m for m, spec in config["modalities"].items() if spec.get("decoder")]
    rows.append(("projectors", "input: " + (", ".join(inputs) or "none"), "trained, `projectors.safetensors`"))
    rows.append(("projectors", "output: " + (", ".join(outputs) or "none"), "trained, `projectors.safetensors`"))
    return rows


def model_card(config: Mapping[str, Any], *, training: Mapping[str, Any] | None = None,
               metrics: Mapping[str, float] | None = None, repo_id: str | None = None) -> str:
    """The card's Markdown, with a YAML header Hugging Face reads (``pipeline_tag: any-to-any``).

    Args:
        config: the directory's config, as ``AnyGPTConfig.to_dict()`` gives it.
        training: what trained it (e.g. ``{"stage": ..., "data": [...], "steps": ...}``), if known.
        metrics: its last evaluation (name → value), if any.
        repo_id: the hub repository (``owner/name``) the folder is pushed to, if any: the
            snippet then loads it by that id.
    """
    name = config.get("name") or "anygpt-model"
    lines = ["---", "pipeline_tag: any-to-any", "library_name: anygpt",
             "tags: [anygpt, any-to-any, multimodal]", "---", "", f"# {name}", ""]
    if config.get("description"):
        lines += [config["description"].strip(), ""]
    load = (f'pipe = AnyGPTPipeline.from_pretrained("{repo_id}")  # or the path of a copy of this folder'
            if repo_id else 'pipe = AnyGPTPipeline.from_pretrained("path/to/this/folder")')
    lines += ["An AnyGPT model directory. Load it with:", "", "```python", "from anygpt import AnyGPTPipeline",
              "", load, "```", "",
              "## Components", "", "| part | kind | source |", "|---|---|---|"]
    lines += [f"| {part} | {kind} | {source} |" for part, kind, source in _components(config)]
    lines += ["", "Paths are relative to this folder; hub ids are downloaded on first use.", "",
              "## Licences", "",
              "Each component keeps the licence of its source: see the model card of each hub id above, "
              "and `LICENSES.md` where this folder has one.", ""]
    if training:
        lines += ["## Training", ""]
        lines += [f"- {key}: {_value(value)}" for key, value in training.items()]
        lines.append("")
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items()]
        lines.append("")
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) or "none"
    return f"`{value}`" if isinstance(value, str) else str(value)

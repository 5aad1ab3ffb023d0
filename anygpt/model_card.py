"""The model card (``README.md``) of a model directory: Hugging Face metadata, the components
and where each comes from, and, for a trained stage, its data and evaluation.

A card is partly generated and partly carried: re-saving a model regenerates its title, loading
snippet, Components and Licences (they follow the config), and keeps every other section of the
card it was loaded with (Training and Evaluation written by training, a user's own sections)
and the user's keys in its YAML header.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

__all__ = ["model_card", "previous_card", "MODEL_CARD_FILENAME", "GENERATED_SECTIONS"]

MODEL_CARD_FILENAME = "README.md"

#: The ``##`` sections :func:`model_card` writes from the config, replaced on every save.
GENERATED_SECTIONS = ("Components", "Licences")

_HEADER = {"pipeline_tag": "any-to-any", "library_name": "anygpt"}
_TAGS = ["anygpt", "any-to-any", "multimodal"]


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
               metrics: Mapping[str, float] | None = None, repo_id: str | None = None,
               previous: str | None = None) -> str:
    """The card's Markdown, with a YAML header Hugging Face reads (``pipeline_tag: any-to-any``).

    Args:
        config: the directory's config, as ``AnyGPTConfig.to_dict()`` gives it.
        training: what trained it (e.g. ``{"stage": ..., "data": [...], "steps": ...}``), if known:
            written as the Training section, in place of the previous card's.
        metrics: its last evaluation (name → value), if any: the Evaluation section, likewise.
        repo_id: the hub repository (``owner/name``) the folder is pushed to, if any: the
            snippet then loads it by that id.
        previous: the card of the directory the model was loaded from (:func:`previous_card`):
            its sections other than :data:`GENERATED_SECTIONS`, and its own YAML header keys,
            are kept, in their order.

    Raises:
        ConfigError: ``previous`` has a YAML header that does not parse.
    """
    header, carried = _parse(previous) if previous else ({}, {})
    lines = ["---", *_header_lines(header), "---", ""]
    lines += _generated(config, repo_id)
    sections = dict(carried)
    if training:
        sections["Training"] = [f"- {key}: {_value(value)}" for key, value in training.items()]
    if metrics:
        sections["Evaluation"] = ["| metric | value |", "|---|---:|",
                                  *(f"| {key} | {value:.4g} |" for key, value in metrics.items())]
    for title, body in sections.items():
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines)


def previous_card(folder: str | Path | None) -> str | None:
    """The model card in ``folder`` if it is one this module wrote (``library_name: anygpt``
    in its header), else None: a folder that merely holds a config (a repository with its own
    README) has no card to carry.

    Raises:
        ConfigError: the card's YAML header does not parse.
    """
    if folder is None:
        return None
    path = Path(folder) / MODEL_CARD_FILENAME
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    front, _ = _split_front_matter(text)
    if front is None or "library_name: anygpt" not in front:
        logger.debug("%s is not an AnyGPT model card; a new card is written", path)
        return None
    _parse(text, str(path))  # a broken header is reported with its file, before anything is written
    return text


def _generated(config: Mapping[str, Any], repo_id: str | None) -> list[str]:
    """The part of the card that follows the config: title, snippet, Components, Licences."""
    name = config.get("name") or "anygpt-model"
    lines = [f"# {name}", ""]
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
    return lines


def _header_lines(previous: Mapping[str, Any]) -> list[str]:
    """Our YAML keys first (fixed), then the previous card's other keys; its extra tags are kept."""
    import yaml

    own = previous.get("tags") or []
    own = [own] if isinstance(own, str) else list(own)
    tags = _TAGS + [t for t in own if t not in _TAGS]
    lines = [f"{key}: {value}" for key, value in _HEADER.items()]
    lines.append(f"tags: [{', '.join(tags)}]")
    rest = {k: v for k, v in previous.items() if k not in _HEADER and k != "tags"}
    if rest:
        lines += yaml.safe_dump(rest, sort_keys=False, allow_unicode=True).rstrip("\n").split("\n")
    return lines


def _split_front_matter(text: str) -> tuple[str | None, str]:
    """``(YAML header or None, the Markdown after it)``."""
    if not text.startswith("---\n"):
        return None, text
    end = text.find("\n---\n", 3)
    if end < 0:
        return None, text
    return text[4:end], text[end + 5:]


def _parse(card: str, where: str = "the previous model card") -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A card's YAML header, and its ``##`` sections other than the generated ones (title →
    body lines, without surrounding blank lines). What comes before the first ``##`` (the
    title and snippet) is generated, so it is not returned."""
    import yaml

    front, body = _split_front_matter(card)
    try:
        header = yaml.safe_load(front) if front else {}
    except yaml.YAMLError as exc:
        from anygpt.errors import ConfigError

        raise ConfigError(f"the YAML header of {where} does not parse ({exc}); fix it, or delete the header "
                          f"(between the '---' lines) to have a new one written") from None
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in body.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            title = line[3:].strip()
            current = None if title in GENERATED_SECTIONS else sections.setdefault(title, [])
            continue
        if current is not None:
            current.append(line)
    return (header if isinstance(header, dict) else {}), {t: _trimmed(b) for t, b in sections.items()}


def _trimmed(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) or "none"
    return f"`{value}`" if isinstance(value, str) else str(value)

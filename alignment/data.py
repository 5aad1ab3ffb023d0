"""Training data for the three alignment stages: manifests, datasets and collation.

A manifest is a JSONL file; each line is one row (see :func:`read_manifest`). Rows are validated
up front (fields, types, files, media decoding) so that a bad row is reported with its file and
line before training starts, never dropped silently or discovered mid-epoch.

:class:`AlignmentDataset` turns samples into tokenised training dialogues for a model:

* stage 1 (encoding side): ``user: <media> Describe this.`` → ``assistant: caption``;
* stage 2 (decoding side): ``user: Generate an image of: caption`` →
  ``assistant: caption [IMG0]…[IMG3]``;
* stage 3 (instruction tuning): the manifest's conversation as written; a ``caption`` on the
  last assistant message that generates media gives its signal run a conditioning target.

The encoder is frozen, so each media file is encoded once and its embedding kept on the CPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from anygpt.errors import AnyGPTError, ConfigError, MediaError
from anygpt.turns import MediaRef, SignalMark, Turn
from anygpt.modalities import MODALITIES, get_modality

if TYPE_CHECKING:
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["ManifestError", "Sample", "read_manifest", "AlignmentDataset", "collate",
           "STAGE1_PROMPTS", "STAGE2_PROMPTS"]

ROLES = ("user", "assistant", "system")
#: Optional row keys that carry no training data (kept for the user's bookkeeping).
IGNORED_KEYS = ("id", "meta")

#: Stage-1 user prompts; ``{modality}`` is the modality name, ``<{modality}>`` places the item.
STAGE1_PROMPTS: tuple[str, ...] = ("<{modality}> Describe this.",)
#: Stage-2 user requests; ``{a_modality}`` is e.g. "an image", ``{caption}`` the caption.
STAGE2_PROMPTS: tuple[str, ...] = (
    "Generate {a_modality} of: {caption}",
    "Create {a_modality} showing {caption}.",
    "Please produce {a_modality} of {caption}.",
    "Can you make {a_modality} of {caption}?",
)


class ManifestError(AnyGPTError, ValueError):
    """A manifest has bad rows (or none usable).

    Attributes:
        problems: ``"path:line: problem"`` entries, one per bad row.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        self.problems = list(problems)
        super().__init__("\n  ".join([message, *self.problems]))


@dataclass
class Sample:
    """One validated manifest row.

    Attributes:
        line: 1-based line in the manifest.
        media: modality → absolute file paths (caption rows).
        caption: the caption (caption rows).
        turns: the conversation (conversation rows): ``{"role", "content", "media": {modality: [Path]}}``,
            plus ``"caption"`` on assistant messages that describe the media they generate.
    """

    line: int
    media: dict[str, list[Path]] = field(default_factory=dict)
    caption: str | None = None
    turns: list[dict] | None = None


# =============================================================================================
# Manifests
# =============================================================================================


class _RowError(Exception):
    """A problem with one row (internal; collected into log lines or a ManifestError)."""


def read_manifest(path: str | Path, *, on_error: str = "skip") -> list[Sample]:
    """Read and validate a JSONL manifest.

    Each non-blank line is a JSON object, either a caption row
    ``{"caption": str, "image": path | [paths], "audio": ..., "video": ...}`` (at least one media
    key) or a conversation row ``{"conversation": [{"role": "user"|"assistant"|"system",
    "content": str, "image": [paths], ...}, ...]}``. An assistant message that generates media
    (holds a signal run) may carry ``"caption"``, the description of that media: in stage 3 the
    output projector of the conversation's last captioned run is then trained against the
    decoder's conditioning of that caption. Relative paths resolve against the
    manifest's folder. ``id`` and ``meta`` keys are allowed and ignored. Every media file is
    decoded once to catch corrupt files.

    Args:
        path: the manifest file.
        on_error: ``"skip"`` logs a warning per bad row (``path:line: problem``) and a summary,
            then returns the good rows; ``"fail"`` raises listing every bad row.

    Raises:
        ManifestError: the file cannot be read, no row is usable, or (``on_error="fail"``) any
            row is bad.
    """
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    path = Path(path).expanduser().resolve()
    validator = _RowValidator(path.parent)
    samples, problems = [], []
    for number, text in _lines(path):
        try:
            samples.append(validator.parse(number, text))
        except _RowError as exc:
            problems.append(f"{path}:{number}: {exc}")
    _report(path, problems, len(samples), on_error)
    if not samples:
        raise ManifestError(f"{path}: no usable rows; each line must be a JSON object with a "
                            f"caption and media, or a conversation", problems)
    return samples


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of ``path`` with their 1-based numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc}); it must be UTF-8 JSONL") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def _report(path: Path, problems: list[str], good: int, on_error: str) -> None:
    """Log or raise the bad rows of a manifest."""
    if not problems:
        return
    if on_error == "fail":
        raise ManifestError(f"{path}: {len(problems)} bad row(s); fix them or pass on_error='skip'",
                            problems)
    for problem in problems:
        logger.warning("%s", problem)
    logger.warning("%s: skipped %d bad row(s) of %d; pass on_error='fail' to stop on them",
                   path, len(problems), len(problems) + good)


class _RowValidator:
    """Parses and validates manifest rows; remembers which media files already decoded."""

    def __init__(self, base: Path):
        self.base = base
        self.checked: dict[Path, str | None] = {}  # path → problem (None: decodes)

    def parse(self, number: int, text: str) -> Sample:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _RowError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise _RowError(f"expected a JSON object, got {type(row).__name__}")
        if "conversation" in row:
            return Sample(line=number, turns=self._conversation(row))
        caption, media = self._caption_row(row)
        return Sample(line=number, media=media, caption=caption)

    def _caption_row(self, row: dict) -> tuple[str, dict[str, list[Path]]]:
        self._check_keys(row, {"caption"}, "")
        if "caption" not in row:
            raise _RowError('missing "caption" (or "conversation")')
        caption = _non_empty_text(row["caption"], '"caption"')
        media = self._media(row, "")
        if not media:
            raise _RowError(f"no media; add at least one of {', '.join(MODALITIES.names())}")
        return caption, media

    def _conversation(self, row: dict) -> list[dict]:
        self._check_keys(row, {"conversation"}, "")
        messages = row["conversation"]
        if not isinstance(messages, list) or not messages:
            raise _RowError('"conversation" must be a non-empty list of messages')
        turns = [self._message(i, m) for i, m in enumerate(messages)]
        if not any(t["role"] == "assistant" for t in turns):
            raise _RowError("the conversation has no assistant message to learn from")
        return turns

    def _message(self, index: int, message: Any) -> dict:
        where = f"conversation[{index}]"
        if not isinstance(message, dict):
            raise _RowError(f"{where} must be an object with role and content")
        self._check_keys(message, {"role", "content", "caption"}, where)
        role = message.get("role")
        if role not in ROLES:
            raise _RowError(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}")
        content = message.get("content", "")
        if not isinstance(content, str):
            raise _RowError(f"{where}.content must be a string, not {type(content).__name__}")
        media = self._media(message, where)
        if media and role != "user":
            raise _RowError(f"{where}: only user messages take media; write generated media as "
                            f"signal tokens in the assistant's content")
        if not content.strip() and not media:
            raise _RowError(f"{where} is empty; give it content or media")
        turn = {"role": role, "content": content, "media": media}
        if "caption" in message:
            if role != "assistant":
                raise _RowError(f"{where}: only assistant messages take a caption (the description of "
                                f"the media their signal tokens generate)")
            turn["caption"] = _non_empty_text(message["caption"], f"{where}.caption")
        return turn

    @staticmethod
    def _check_keys(obj: dict, fields: set[str], where: str) -> None:
        valid = fields | set(MODALITIES.names()) | set(IGNORED_KEYS)
        unknown = sorted(set(obj) - valid)
        if unknown:
            prefix = f"{where}: " if where else ""
            raise _RowError(f"{prefix}unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                            f"{', '.join(sorted(valid))} (modalities: {', '.join(MODALITIES.names())})")

    def _media(self, obj: dict, where: str) -> dict[str, list[Path]]:
        media = {}
        for modality in MODALITIES.names():
            if modality in obj:
                label = f"{where}.{modality}" if where else modality
                media[modality] = [self._file(modality, value, label) for value in _path_list(obj[modality], label)]
        return media

    def _file(self, modality: str, value: str, where: str) -> Path:
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else self.base / path).resolve()
        if path not in self.checked:
            self.checked[path] = _decode_problem(modality, path)
        if self.checked[path] is not None:
            raise _RowError(f"{where}: {self.checked[path]}")
        return path


def _path_list(value: Any, where: str) -> list[str]:
    """A media value as a list of path strings (one path or a non-empty list of paths)."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise _RowError(f"{where} must be a file path or a non-empty list of file paths, not {value!r}")
    return values


def _non_empty_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{where} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"{where} is empty; give every row a caption")
    return value.strip()


def _decode_problem(modality: str, path: Path) -> str | None:
    """Why ``path`` is not a usable ``modality`` file, or None if it decodes."""
    if not path.is_file():
        return f"{path}: no such file (relative paths resolve against the manifest's folder)"
    try:
        get_modality(modality).load(path)
    except MediaError as exc:
        return str(exc)
    except Exception as exc:  # a decoder library failing in an unforeseen way is still a bad row
        return f"{path}: cannot decode the {modality} ({type(exc).__name__}: {exc})"
    return None


# =============================================================================================
# Dataset
# =============================================================================================


@dataclass
class _Item:
    """One training dialogue before tokenisation."""

    turns: list[Turn]
    caption: str | None = None
    output_modality: str | None = None


class AlignmentDataset(torch.utils.data.Dataset):
    """Tokenised training dialogues of one alignment stage.

    Args:
        samples: rows from :func:`read_manifest`.
        stage: 1 (encoding side: media → caption), 2 (decoding side: caption → signal run) or
            3 (instruction tuning on conversations).
        model: the model whose tokenizer, media slots, signal tokens and encoder are used.
        modalities: stage 1: the input modalities to use (default: every one the model reads);
            stage 2: the output modalities every caption is trained for (default: each sample's
            own media modalities that the model can generate); stage 3: unused.
        prompts: user prompt templates, picked by item index (stage 1: ``{modality}``; stage 2:
            ``{modality}``, ``{a_modality}``, ``{caption}``). Default :data:`STAGE1_PROMPTS` /
            :data:`STAGE2_PROMPTS`.
        encode_batch_size: encode every media file in ``__init__`` in batches of this size;
            None encodes each file on first use. Either way each file is encoded once.

    Items (``__getitem__``) are dicts: ``input_ids``, ``labels``, ``media_mask`` (L,);
    ``media``: ``[(modality, embedding (D,))]`` in slot order; ``caption``,
    ``output_modality`` (stage 2; None otherwise) and ``index``.
    """

    def __init__(self, samples: Sequence[Sample], stage: int, model: "AnyGPTModel", *,
                 modalities: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                 encode_batch_size: int | None = 16):
        if stage not in (1, 2, 3):
            raise ConfigError(f"stage must be 1, 2 or 3, not {stage!r}")
        self.stage, self.model = stage, model
        self.embeddings: dict[Path, torch.Tensor] = {}
        builders = {1: self._stage1_items, 2: self._stage2_items, 3: self._stage3_items}
        self.items: list[_Item] = builders[stage](list(samples), modalities, prompts)
        if not self.items:
            raise ConfigError(f"no stage-{stage} training items in {len(samples)} sample(s); check that "
                              f"the manifest has the rows this stage needs and the model has the modalities")
        if encode_batch_size is not None:
            self.encode_all(encode_batch_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        prompt = self.model.lm.tokenize_dialogue(item.turns, self.model.num_media_tokens())
        media = [(ref.modality, self.embedding(ref.modality, Path(ref.source))) for ref in prompt.media]
        return {"input_ids": prompt.input_ids, "labels": prompt.labels, "media_mask": prompt.media_mask,
                "media": media, "caption": item.caption, "output_modality": item.output_modality,
                "index": index}

    # Encoder embeddings ----------------------------------------------------------------------
    def media_files(self) -> dict[Path, str]:
        """Every media file the items use → its modality."""
        return {Path(ref.source): ref.modality for item in self.items for turn in item.turns for ref in turn.media}

    def embedding(self, modality: str, path: Path) -> torch.Tensor:
        """The frozen encoder's embedding (D,) of one file, computed on first use (CPU)."""
        if path not in self.embeddings:
            self._encode(modality, [path])
        return self.embeddings[path]

    def encode_all(self, batch_size: int = 16) -> None:
        """Encode every not yet encoded media file, one modality at a time, in batches."""
        pending: dict[str, list[Path]] = {}
        for path, modality in self.media_files().items():
            if path not in self.embeddings:
                pending.setdefault(modality, []).append(path)
        for modality, paths in pending.items():
            for start in range(0, len(paths), batch_size):
                self._encode(modality, paths[start:start + batch_size])
        if pending:
            logger.info("encoded %d media file(s) with the frozen encoder",
                        sum(len(p) for p in pending.values()))

    def _encode(self, modality: str, paths: list[Path]) -> None:
        out = self.model.encode_items(modality, paths).detach().float().cpu()
        self.embeddings.update(zip(paths, out))

    # Items per stage -------------------------------------------------------------------------
    def _stage1_items(self, samples: list[Sample], modalities: Sequence[str] | None,
                      prompts: Sequence[str] | None) -> list[_Item]:
        usable = self._check_modalities(modalities, list(self.model.input_projectors), "input")
        prompts = tuple(prompts or STAGE1_PROMPTS)
        items = []
        for sample in _with_captions(samples, stage=1):
            for modality, paths in sample.media.items():
                if modality not in usable:
                    continue
                for path in paths:
                    text = prompts[len(items) % len(prompts)].format(modality=modality)
                    user = Turn("user", text, [_file_ref(modality, path)])
                    # `parts`: the caption is text whatever it holds, even a written signal run.
                    answer = Turn("assistant", sample.caption, parts=(sample.caption,))
                    items.append(_Item([user, answer], caption=sample.caption))
        return items

    def _stage2_items(self, samples: list[Sample], modalities: Sequence[str] | None,
                      prompts: Sequence[str] | None) -> list[_Item]:
        outputs = list(self.model.output_projectors)
        chosen = self._check_modalities(modalities, outputs, "output") if modalities else None
        prompts = tuple(prompts or STAGE2_PROMPTS)
        items = []
        for sample in _with_captions(samples, stage=2):
            for modality in chosen or [m for m in sample.media if m in outputs]:
                template = prompts[len(items) % len(prompts)]
                request = template.format(modality=modality, caption=sample.caption,
                                          a_modality=get_modality(modality).noun)
                text = f"{sample.caption} {''.join(self.model.lm.signal_tokens[modality])}"
                # Only the run after the caption is a signal run: the caption stays text.
                answer = Turn("assistant", text, parts=(f"{sample.caption} ", SignalMark(modality)))
                items.append(_Item([Turn("user", request), answer],
                                   caption=sample.caption, output_modality=modality))
        return items

    def _stage3_items(self, samples: list[Sample], modalities: Sequence[str] | None,
                      prompts: Sequence[str] | None) -> list[_Item]:
        readable = set(self.model.input_projectors)
        items = []
        for sample in samples:
            if sample.turns is None:
                raise ConfigError(f"line {sample.line}: stage 3 needs conversation rows, got a caption row; "
                                  f"use a dialogue manifest for stage 3")
            turns = []
            for message in sample.turns:
                refs = [_file_ref(m, p) for m, paths in message["media"].items() for p in paths]
                bad = sorted({r.modality for r in refs} - readable)
                if bad:
                    raise ConfigError(f"line {sample.line}: the model has no input projector for "
                                      f"{', '.join(bad)}; valid: {', '.join(sorted(readable))}")
                turns.append(Turn(message["role"], message["content"], refs))
            items.append(_Item(turns, *self._generated_caption(sample)))
        return items

    def _generated_caption(self, sample: Sample) -> tuple[str | None, str | None]:
        """The caption and modality of the conversation's last captioned assistant message with a
        signal run (the run the objective scores), or ``(None, None)``."""
        for message in reversed(sample.turns):
            caption = message.get("caption")
            if caption is None:
                continue
            made = [m for m, tokens in self.model.lm.signal_tokens.items()
                    if m in self.model.output_projectors and "".join(tokens) in message["content"]]
            if len(made) != 1:
                raise ConfigError(f"line {sample.line}: a captioned assistant message must hold the signal "
                                  f"run of exactly one output modality, found {made or 'none'}")
            return caption, made[0]
        return None, None

    @staticmethod
    def _check_modalities(requested: Sequence[str] | None, available: list[str], kind: str) -> list[str]:
        if requested is None:
            return available
        bad = [m for m in requested if m not in available]
        if bad:
            raise ConfigError(f"the model has no {kind} modality {', '.join(map(repr, bad))}; "
                              f"valid: {', '.join(available)}")
        return list(requested)


def _file_ref(modality: str, path: Path) -> MediaRef:
    """A training item's media: the embedding cache here is keyed by the resolved file path."""
    return MediaRef(modality, key=str(path), source=str(path))


def _with_captions(samples: list[Sample], stage: int) -> list[Sample]:
    """The caption rows; conversation rows are a configuration mistake in stages 1-2."""
    wrong = [s.line for s in samples if s.caption is None]
    if wrong:
        raise ConfigError(f"stage {stage} needs caption rows; line(s) {', '.join(map(str, wrong[:5]))} "
                          f"hold conversations (use a caption manifest, or stage 3)")
    return samples


# =============================================================================================
# Collation
# =============================================================================================


def collate(items: list[dict], pad_id: int) -> dict[str, Any]:
    """Batch dataset items, right-padded.

    Returns:
        ``input_ids`` (B, L) padded with ``pad_id``; ``labels`` (B, L) padded with -100;
        ``media_mask`` (B, L) padded with False; ``attention_mask`` (B, L) long; ``media``: every
        item's media in item order (the slot order :meth:`AnyGPTModel.forward` expects);
        ``captions`` and ``output_modalities``: lists; ``indices``: (B,) long.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    length = max(item["input_ids"].numel() for item in items)

    def pad(key: str, value: Any, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((len(items), length), value, dtype=dtype)
        for row, item in enumerate(items):
            out[row, : item[key].numel()] = item[key]
        return out

    attention = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        attention[row, : item["input_ids"].numel()] = 1
    return {
        "input_ids": pad("input_ids", pad_id, torch.long),
        "attention_mask": attention,
        "labels": pad("labels", -100, torch.long),
        "media_mask": pad("media_mask", False, torch.bool),
        "media": [m for item in items for m in item["media"]],
        "captions": [item["caption"] for item in items],
        "output_modalities": [item["output_modality"] for item in items],
        "indices": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }

"""NExT-GPT's released checkpoint format: which tensors it holds, at which shapes, under which
token ids, and how they map to an AnyGPT model.

NExT-GPT's training code saves one flat ``pytorch_model.pt`` of its trainable tensors: the input
projector ``llama_proj``, the three output projectors ``gen_text_hidden_fcs{,_video,_audio}.0``,
the LLM's resized ``embed_tokens`` and ``lm_head`` and the LoRA factors of ``q/k/v/o_proj`` in
every layer (PEFT names, under ``llama_model.``). Its tokenizer is Vicuna's plus 38 tokens added in
a fixed order (:data:`NEXTGPT_TOKENS`: ``<Img>`` = 32000 … ``[AUD7]`` = 32037), saved next to the
checkpoint; its ``added_tokens.json`` gives those ids (:func:`checkpoint_token_ids`).

This module only reads and checks tensors; :func:`anygpt.checkpoint.load_checkpoint` applies them
to a model and ``anygpt convert nextgpt`` writes a model directory from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from anygpt.errors import WeightsNotFoundError

if TYPE_CHECKING:
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["ADDED_TOKENS_JSON", "NEXTGPT_LORA_ALPHA", "NEXTGPT_LORA_R", "NEXTGPT_TOKENS", "NextGPTLayout",
           "NextGPTWeights", "TokenRows", "build_layout", "check_state", "checkpoint_token_ids", "convert_state",
           "find_added_tokens", "layout_for_model", "lora_scale", "nextgpt_token_ids", "normalise_keys",
           "read_added_tokens", "token_rows"]

#: NExT-GPT's output projector of each modality (``text_emb_to_*_layers: [-1]``: one layer, index 0).
OUTPUT_PREFIXES = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0.",
                   "audio": "gen_text_hidden_fcs_audio.0."}
INPUT_PREFIX = "llama_proj."
LLM_PREFIX = "llama_model.base_model.model."
EMBED_KEY = LLM_PREFIX + "model.embed_tokens.weight"
LM_HEAD_KEY = LLM_PREFIX + "lm_head.weight"
#: Checkpoints trained with a frozen LLM (no PEFT wrapper) name the resized matrices without
#: ``base_model.model.`` (NExT-GPT's own loader renames them the same way).
_ALIASES = {"llama_model.model.embed_tokens.weight": EMBED_KEY, "llama_model.lm_head.weight": LM_HEAD_KEY}
#: PEFT's ``target_modules`` in NExT-GPT's LoraConfig.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# peft 0.3 names ``….lora_A.weight``; later versions add the adapter name (``.lora_A.default.weight``).
_LORA_DEFAULT = re.compile(r"\.lora_([AB])\.default\.weight$")

# Each output modality's signal run: token prefix and length (NExT-GPT adds image, video, audio).
_RUNS = {"image": ("IMG", 4), "video": ("VID", 24), "audio": ("AUD", 8)}
#: The tokens NExT-GPT adds to the base tokenizer, in the order it adds them; their ids follow
#: the base vocabulary (Vicuna's 32000 tokens): ``<Img>`` = 32000 … ``[AUD7]`` = 32037.
NEXTGPT_TOKENS: tuple[str, ...] = ("<Img>", "</Img>", *(f"[{prefix}{i}]" for prefix, count in _RUNS.values()
                                                        for i in range(count)))
#: LoRA rank and alpha of NExT-GPT's training config (``code/config/stage_3.yaml``): scale 1.
NEXTGPT_LORA_R = 32
NEXTGPT_LORA_ALPHA = 32.0
ADAPTER_CONFIG = "adapter_config.json"
#: The file of NExT-GPT's saved tokenizer that maps each added token to its id.
ADDED_TOKENS_JSON = "added_tokens.json"


def nextgpt_token_ids(base_vocab: int = 32000) -> dict[str, int]:
    """NExT-GPT's id of each token it added, for a base tokenizer of ``base_vocab`` tokens."""
    return {token: base_vocab + i for i, token in enumerate(NEXTGPT_TOKENS)}


def normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the frozen-LLM and newer-PEFT spellings renamed to the released ones."""
    out = {}
    for key, value in state.items():
        key = _LORA_DEFAULT.sub(r".lora_\1.weight", _ALIASES.get(key, key))
        out[key] = value
    return out


# The expected tensors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NextGPTLayout:
    """The tensors a NExT-GPT checkpoint must hold to load into one AnyGPT architecture.

    Attributes:
        shapes: NExT-GPT key → expected shape, for every tensor but the LoRA factors.
        lora: LLM module path (``model.layers.0.self_attn.q_proj``) → its weight's (out, in);
            the checkpoint holds ``lora_A`` (r, in) and ``lora_B`` (out, r) for each.
        inputs: the input modalities, which all take ``llama_proj``.
        outputs: output modality → its NExT-GPT key prefix.
        unused: key prefixes NExT-GPT saves that this architecture does not use (output
            projectors of modalities it lacks).
    """

    shapes: dict[str, tuple[int, ...]]
    lora: dict[str, tuple[int, int]]
    inputs: tuple[str, ...]
    outputs: dict[str, str]
    unused: tuple[str, ...]

    @staticmethod
    def lora_keys(path: str) -> tuple[str, str]:
        """The checkpoint keys of one module's ``lora_A`` and ``lora_B``."""
        return f"{LLM_PREFIX}{path}.lora_A.weight", f"{LLM_PREFIX}{path}.lora_B.weight"

    def expected_keys(self) -> list[str]:
        return [*self.shapes, *(k for p in self.lora for k in self.lora_keys(p))]


def build_layout(llm: nn.Module, input_projectors: Mapping[str, nn.Module],
                 output_projectors: Mapping[str, nn.Module], checkpoint_vocab: int) -> NextGPTLayout:
    """The NExT-GPT tensors an architecture needs, read from its (possibly meta-device) modules.

    Args:
        llm: the Hugging Face causal LM.
        input_projectors, output_projectors: by modality, as in :class:`~anygpt.model.AnyGPTModel`.
        checkpoint_vocab: rows of the checkpoint's ``embed_tokens``/``lm_head`` (base vocabulary
            plus NExT-GPT's 38 tokens).

    Raises:
        WeightsNotFoundError: an input projector is not NExT-GPT's (one linear layer, one token),
            or an output modality has no NExT-GPT projector.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name, proj in input_projectors.items():
        _check_input_projector(name, proj)
        for suffix in ("weight", "bias"):
            shapes[INPUT_PREFIX + suffix] = tuple(getattr(proj.proj, suffix).shape)
    for name, proj in output_projectors.items():
        if name not in OUTPUT_PREFIXES:
            raise WeightsNotFoundError(f"NExT-GPT checkpoint: it has output projectors for "
                                       f"{', '.join(OUTPUT_PREFIXES)} only, not {name}; remove "
                                       f"modalities.{name}'s output (decoder) from the config")
        shapes.update({OUTPUT_PREFIXES[name] + k: tuple(v.shape) for k, v in proj.state_dict().items()})
    hidden = llm.get_input_embeddings().embedding_dim
    shapes[EMBED_KEY] = shapes[LM_HEAD_KEY] = (checkpoint_vocab, hidden)
    lora = {path: (m.out_features, m.in_features) for path, m in llm.named_modules()
            if path.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(m, nn.Linear)}
    outputs = {name: OUTPUT_PREFIXES[name] for name in output_projectors}
    unused = tuple(p for n, p in OUTPUT_PREFIXES.items() if n not in output_projectors)
    if not input_projectors:
        unused += (INPUT_PREFIX,)
    return NextGPTLayout(shapes, lora, tuple(input_projectors), outputs, unused)


def _check_input_projector(name: str, proj: nn.Module) -> None:
    from anygpt.projectors import LinearInputProjector

    if not (isinstance(proj, LinearInputProjector) and proj.num_tokens == 1):
        raise WeightsNotFoundError(
            f"NExT-GPT checkpoint: its input projector `llama_proj` is one Linear layer giving one "
            f"token, but modalities.{name}.input_projector is not; set it to "
            f"{{kind: linear, num_tokens: 1}} to load this checkpoint")


def layout_for_model(model: "AnyGPTModel", rows: TokenRows) -> NextGPTLayout:
    """:func:`build_layout` for a built model whose token rows are ``rows``."""
    return build_layout(model.lm.model, model.input_projectors, model.output_projectors, rows.checkpoint_vocab)


# Token ids ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRows:
    """Where each row of the model's embedding matrices comes from in the checkpoint's.

    Attributes:
        index: (model rows,) the checkpoint row of each model row; base-vocabulary rows keep
            their id, NExT-GPT's tokens move to the model's id for the same string.
        checkpoint_vocab: rows the checkpoint's matrices must have.
        unused: NExT-GPT's tokens the model lacks (their rows are dropped).
    """

    index: torch.Tensor
    checkpoint_vocab: int
    unused: tuple[str, ...]


def token_rows(vocab: Mapping[str, int], num_rows: int, added: Sequence[str],
               ids: Mapping[str, int] | None = None) -> TokenRows:
    """Map the model's embedding rows to NExT-GPT's, by token string.

    NExT-GPT's ids are those of its saved tokenizer (``ids``, from its ``added_tokens.json``),
    else the ones fixed by the order it added its tokens (:data:`NEXTGPT_TOKENS`), whatever
    order the AnyGPT config lists its modalities in.

    Args:
        vocab: the model's tokenizer vocabulary (token → id).
        num_rows: rows of the model's embedding matrix.
        added: the tokens the config added (media wrappers and signal runs).
        ids: NExT-GPT's id of each of its tokens (other entries, such as a pad token it added,
            only widen its matrices); default :func:`nextgpt_token_ids` after the base vocabulary.

    Raises:
        WeightsNotFoundError: an added token has no NExT-GPT row (named in the message), or the
            base vocabulary is laid out differently from NExT-GPT's.
    """
    _check_added_tokens(added)
    ours = {t: vocab[t] for t in NEXTGPT_TOKENS if t in vocab}
    base = num_rows - len(ours)
    misplaced = sorted((i, t) for t, i in ours.items() if i < base)
    if misplaced:
        i, token = misplaced[0]
        raise WeightsNotFoundError(
            f"NExT-GPT checkpoint: the tokenizer has {token!r} at id {i}, inside its base vocabulary of "
            f"{base} rows; NExT-GPT's tokens follow the base vocabulary; use the base LLM's own tokenizer")
    theirs = nextgpt_token_ids(base) if ids is None else dict(ids)
    inside = sorted((theirs[t], t) for t in NEXTGPT_TOKENS if theirs[t] < base)
    if inside:
        i, token = inside[0]
        raise WeightsNotFoundError(
            f"NExT-GPT checkpoint: its tokenizer has {token!r} at id {i}, inside this LLM's base vocabulary "
            f"of {base} rows, so it was trained on another base LLM; give the LLM it was trained on "
            f"(NExT-GPT: Vicuna-7B v0, 32000 tokens)")
    index = torch.arange(num_rows)
    for token, i in ours.items():
        index[i] = theirs[token]
    unused = tuple(t for t in NEXTGPT_TOKENS if t not in ours)
    return TokenRows(index, max(theirs.values()) + 1, unused)


def _check_added_tokens(added: Sequence[str]) -> None:
    """Every token the config added is NExT-GPT's, and each signal run is NExT-GPT's whole run."""
    for token in added:
        if token not in NEXTGPT_TOKENS:
            raise WeightsNotFoundError(f"NExT-GPT checkpoint: the config's token {token!r} has no row in it; "
                                       f"{_token_hint(token)}")
    for modality, (prefix, count) in _RUNS.items():
        run = [f"[{prefix}{i}]" for i in range(count)]
        absent = [t for t in run if t not in added]
        if absent and len(absent) < count:
            raise WeightsNotFoundError(f"NExT-GPT checkpoint: the config's {modality} signal run lacks "
                                       f"{absent[0]!r}; {_token_hint(run[0])}")


def _token_hint(token: str) -> str:
    match = re.fullmatch(r"\[([A-Z]+)\d+\]", token)
    for modality, (prefix, count) in _RUNS.items():
        if match and match.group(1) == prefix:
            return (f"NExT-GPT's {modality} run is [{prefix}0]…[{prefix}{count - 1}]: set "
                    f"modalities.{modality}.num_signal_tokens: {count}")
    return ("NExT-GPT added <Img>, </Img>, [IMG0]…[IMG3], [VID0]…[VID23] and [AUD0]…[AUD7]; set "
            "llm.media_begin: <Img> and llm.media_end: </Img> and keep NExT-GPT's modalities")


def find_added_tokens(folder: Path | None, given: str | os.PathLike | None = None) -> Path | None:
    """The ``added_tokens.json`` of NExT-GPT's saved tokenizer: ``given``, else the one next to
    the checkpoint (in ``folder``), else the one in ``folder``'s parent; None when there is none.

    Raises:
        WeightsNotFoundError: ``given`` is not a file.
    """
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"--added-tokens {path}: no such file; give the {ADDED_TOKENS_JSON} "
                                       f"NExT-GPT saved with its tokenizer, or leave the option out")
        return path
    if folder is None:
        return None
    folder = Path(folder)
    return next((p for p in (folder / ADDED_TOKENS_JSON, folder.parent / ADDED_TOKENS_JSON) if p.is_file()), None)


def read_added_tokens(path: Path, checkpoint_rows: int | None = None) -> dict[str, int]:
    """NExT-GPT's token → id map from its tokenizer's ``added_tokens.json``, checked.

    Args:
        path: the file.
        checkpoint_rows: rows of the checkpoint's ``embed_tokens``; every id must be below it
            (None: not checked).

    Raises:
        WeightsNotFoundError: in one line naming ``path``: the file is not a token → id JSON
            object, lacks one of :data:`NEXTGPT_TOKENS`, gives two tokens one id, or gives an id
            outside the checkpoint's rows.
    """
    fix = (f"give the {ADDED_TOKENS_JSON} saved with this checkpoint (--added-tokens FILE), or remove this "
           f"one to use NExT-GPT's published ids")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WeightsNotFoundError(f"{path}: not a readable JSON file ({exc}); {fix}") from exc
    if not (isinstance(data, dict) and all(type(v) is int for v in data.values())):
        raise WeightsNotFoundError(f"{path}: not a JSON object of token → integer id, as a tokenizer's "
                                   f"save_pretrained writes it; {fix}")
    missing = [t for t in NEXTGPT_TOKENS if t not in data]
    if missing:
        raise WeightsNotFoundError(f"{path}: lacks {len(missing)} of NExT-GPT's tokens ({_listing(missing)}); {fix}")
    seen: dict[int, str] = {}
    for token, i in data.items():
        if i in seen:
            raise WeightsNotFoundError(f"{path}: {seen[i]!r} and {token!r} share id {i}; {fix}")
        seen[i] = token
    if checkpoint_rows is not None:
        outside = sorted((i, t) for t, i in data.items() if not 0 <= i < checkpoint_rows)
        if outside:
            i, token = outside[0]
            raise WeightsNotFoundError(f"{path}: {token!r} has id {i}, outside the checkpoint's {checkpoint_rows} "
                                       f"embedding rows (0…{checkpoint_rows - 1}); {fix}")
    return data


def checkpoint_token_ids(state: Mapping[str, torch.Tensor], folder: Path | None,
                         given: str | os.PathLike | None = None, *, log: bool = True) -> dict[str, int] | None:
    """NExT-GPT's token ids for a (normalised) checkpoint: read from its ``added_tokens.json``
    (see :func:`find_added_tokens`), or None for the published ones (:func:`nextgpt_token_ids`).
    The source is logged at INFO unless ``log`` is false.

    Raises:
        WeightsNotFoundError: the file is not valid for this checkpoint (see :func:`read_added_tokens`).
    """
    path = find_added_tokens(folder, given)
    if path is None:
        if log:
            logger.info("NExT-GPT token ids: its published ones (<Img> first after the base vocabulary … "
                        "[AUD7]); no %s next to the checkpoint or in its parent folder", ADDED_TOKENS_JSON)
        return None
    embed = state.get(EMBED_KEY)
    ids = read_added_tokens(path, int(embed.shape[0]) if embed is not None and embed.dim() == 2 else None)
    if log:
        logger.info("NExT-GPT token ids: read from %s", path)
    return ids


# Checking ------------------------------------------------------------------------------------


def check_state(state: Mapping[str, torch.Tensor], layout: NextGPTLayout, *, source: object,
                allow_unexpected: bool = False, log: bool = True) -> int:
    """Check a (normalised) checkpoint against ``layout``: every key there, every shape right.

    Reads shapes only, never values. Keys under ``layout.unused`` are ignored; other keys the
    layout does not expect are an error unless ``allow_unexpected`` (then a warning, unless
    ``log`` is false: a check made again later logs it then).

    Returns:
        the LoRA rank r.

    Raises:
        WeightsNotFoundError: listing the missing keys, the shape mismatches (key, expected and
            got shape) and the unexpected keys, all at once.
    """
    expected = layout.expected_keys()
    missing = [k for k in expected if k not in state]
    known = set(expected)
    unexpected = sorted(k for k in state if k not in known and not k.startswith(layout.unused))
    rank = _lora_rank(state, layout)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
    wrong = [f"{k}: expected {exp}, got {tuple(state[k].shape)}" for k, exp in _expected_shapes(layout, rank).items()
             if k in state and tuple(state[k].shape) != exp]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape (for this config): {_listing(wrong)}")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)} (if they are not "
                        f"needed, pass --allow-unexpected to `anygpt convert nextgpt`, or allow_unexpected=True)")
    if problems:
        raise WeightsNotFoundError(f"{source}: not a NExT-GPT checkpoint of this architecture: "
                                   + "; ".join(problems) + _shape_hint(wrong))
    if log:
        _log_ignored(state, layout, unexpected, source)
    return rank


def _log_ignored(state: Mapping[str, torch.Tensor], layout: NextGPTLayout, unexpected: Sequence[str],
                 source: object) -> None:
    if unexpected:
        logger.warning("%s: ignoring %d unexpected tensor(s): %s", source, len(unexpected), _listing(unexpected))
    unused = sorted({p for k in state for p in layout.unused if k.startswith(p)})
    if unused:
        logger.info("%s: this config does not use %s*", source, "*, ".join(unused))


def _lora_rank(state: Mapping[str, torch.Tensor], layout: NextGPTLayout) -> int:
    """The rank of the first LoRA A present (0 when there is none: they are reported missing)."""
    for path in layout.lora:
        key = layout.lora_keys(path)[0]
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return 0


def _expected_shapes(layout: NextGPTLayout, rank: int) -> dict[str, tuple[int, ...]]:
    shapes = dict(layout.shapes)
    for path, (out_features, in_features) in layout.lora.items():
        a, b = layout.lora_keys(path)
        shapes[a], shapes[b] = (rank, in_features), (out_features, rank)
    return shapes


def _listing(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


def _shape_hint(wrong: Sequence[str]) -> str:
    if any(w.startswith((EMBED_KEY, LM_HEAD_KEY)) for w in wrong):
        return (". The embedding rows are the base LLM's vocabulary plus NExT-GPT's 38 tokens: give the "
                "LLM the checkpoint was trained on (NExT-GPT: Vicuna-7B v0, 32000 tokens)")
    if wrong:
        return ". Use the preset the checkpoint was trained for (nextgpt-7b) and its base LLM"
    return ""


# LoRA scale ------------------------------------------------------------------------------------


def lora_scale(rank: int, *, alpha: float | None = None, r: int | None = None,
               folder: Path | None = None, log: bool = True) -> float:
    """PEFT's LoRA scale ``alpha / r`` for a checkpoint whose factors have rank ``rank``.

    ``alpha`` and ``r`` come from the arguments, else from a PEFT ``adapter_config.json`` in
    ``folder``, else NExT-GPT's training config (alpha 32; r is the factors' rank). The choice is
    logged (unless ``log`` is false).

    Raises:
        WeightsNotFoundError: ``r`` (given or from the adapter config) is not the factors' rank.
    """
    adapter = _adapter_config(folder)
    if alpha is not None:
        alpha_from = "given"
    elif "lora_alpha" in adapter:
        alpha, alpha_from = float(adapter["lora_alpha"]), f"{ADAPTER_CONFIG}"
    else:
        alpha, alpha_from = NEXTGPT_LORA_ALPHA, "NExT-GPT's training config"
    if r is None and "r" in adapter:
        r = int(adapter["r"])
    if r is not None and r != rank:
        raise WeightsNotFoundError(f"NExT-GPT checkpoint: LoRA r is {r} but its lora_A tensors have rank "
                                   f"{rank}; drop --lora-r (the rank is read from the tensors) or fix it")
    if log and alpha_from != "given" and "lora_alpha" not in adapter and rank != NEXTGPT_LORA_R:
        logger.warning("LoRA rank %d is not NExT-GPT's %d, yet alpha defaulted to NExT-GPT's %g; pass "
                       "--lora-alpha if the checkpoint was trained with another", rank, NEXTGPT_LORA_R, alpha)
    denominator = rank ** 0.5 if adapter.get("use_rslora") else rank
    scale = alpha / denominator
    if log:
        logger.info("LoRA scale %g = alpha %g (%s) / %s %d", scale, alpha, alpha_from,
                    "sqrt r" if adapter.get("use_rslora") else "r", rank)
    return scale


def _adapter_config(folder: Path | None) -> dict:
    path = None if folder is None else Path(folder) / ADAPTER_CONFIG
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"{path}: not a readable PEFT adapter config ({exc}); fix or remove it") from exc


# Converting ------------------------------------------------------------------------------------


@dataclass
class NextGPTWeights:
    """A checked checkpoint in AnyGPT's names.

    Attributes:
        projectors: ``input_projectors.<m>.*`` / ``output_projectors.<m>.*`` tensors.
        embed_tokens, lm_head: the model's whole matrices, rows in the model's token ids.
        lora: LoRA factors by module path, ``(A, B, scale)``.
    """

    projectors: dict[str, torch.Tensor]
    embed_tokens: torch.Tensor
    lm_head: torch.Tensor
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def convert_state(state: Mapping[str, torch.Tensor], layout: NextGPTLayout, rows: TokenRows,
                  scale: float) -> NextGPTWeights:
    """Rename a checkpoint checked by :func:`check_state` and move its token rows to the model's ids.

    NExT-GPT's one ``llama_proj`` is copied to every input modality.
    """
    projectors = {f"input_projectors.{name}.proj.{suffix}": state[INPUT_PREFIX + suffix]
                  for name in layout.inputs for suffix in ("weight", "bias")}
    for name, prefix in layout.outputs.items():
        projectors.update({f"output_projectors.{name}.{k[len(prefix):]}": v
                           for k, v in state.items() if k.startswith(prefix)})
    if rows.unused:
        logger.info("NExT-GPT tokens the config does not use (their rows are dropped): %s", _listing(rows.unused))
    lora = {}
    for path in layout.lora:
        a, b = layout.lora_keys(path)
        lora[path] = (state[a], state[b], scale)
    return NextGPTWeights(projectors, state[EMBED_KEY][rows.index], state[LM_HEAD_KEY][rows.index], lora)

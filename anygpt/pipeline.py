"""The public Python API: :class:`AnyGPTPipeline`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import defaultdict
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from anygpt.config import CONFIG_FILENAME, DECODE_OPTIONS, AnyGPTConfig, SamplingSettings, list_presets, preset_file
from anygpt.conversation import Conversation, MediaInputs
from anygpt.llm import PromptInputs
from anygpt.errors import ConfigError, UnknownNameError
from anygpt.generation import LLMResult, SignalRun, generate_batch, generate_stream
from anygpt.modalities import MODALITIES, get_modality
from anygpt.model import AnyGPTModel, decoder_config
from anygpt.options import check_options
from anygpt.paths import looks_like_path
from anygpt.types import DecodeProgress, GenerationOutput, MediaSegment, MediaStarted, TextDelta, TextSegment

logger = logging.getLogger(__name__)

__all__ = ["AnyGPTPipeline", "add_messages", "content_parts", "ProgressCallback"]

#: ``on_progress`` of the generation calls: called after each denoising step of a decoder.
ProgressCallback = Callable[[DecodeProgress], None]


class AnyGPTPipeline:
    """Any-to-any generation: text and media in, text and media out.

    Load with :meth:`from_pretrained` (a preset name, a model directory or a config file),
    call it with a prompt and media files, or hold a multi-turn :class:`Conversation` with
    :meth:`chat`. Decoders are loaded on first use and cached.

    Example:
        >>> pipe = AnyGPTPipeline.from_pretrained("tiny")
        >>> out = pipe("Draw a red square", outputs=("image",), seed=0)
        >>> out.images[0].size
    """

    def __init__(self, model: AnyGPTModel, base_dir: Path | None = None):
        self.model = model
        self.config: AnyGPTConfig = model.config
        self.base_dir = base_dir
        self._decoders: dict[str, Any] = {}
        self.progress = True
        self.memory_plan = None  # the anygpt.memory plan applied by from_pretrained(memory=...)
        #: The most media items a decoder generates in one call; None: as many as the memory plan
        #: allows (without a plan: all of a modality's items of the answers at hand).
        self.decode_batch_size: int | None = None
        self._decoder_speed: dict[str, Any] = {}  # the decoders' optimize() options, set by optimize()

    # Construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, memory: str | int | None = None, *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False) -> "AnyGPTPipeline":
        """Load a preset (``tiny``, ``mini``, ``nextgpt-7b``), a directory written by
        :meth:`save_pretrained`, a YAML config file, or the hub id (``owner/name``) of a model
        directory on the Hugging Face hub (pushed with ``save_pretrained(push_to_hub=True)``).

        A hub id is downloaded with ``huggingface_hub.snapshot_download`` into the hub's cache
        (or found there: ``HF_HUB_OFFLINE=1`` reads the cache only), then loaded as a local
        directory. A local path of the same name wins.

        Args:
            memory: a GPU memory budget (``"24GB"``, ``"12GB"``): the components are placed by
                the cheapest :func:`~anygpt.memory.plan_memory` plan that fits it (decoders
                offloaded to the CPU between uses, the LLM split by layers…), on ``device``
                (default ``cuda``). Needs a CUDA device.
            revision: of a hub id: a branch, tag or commit (default: the main branch).
            token: of a hub id: a hub token, for private or gated repositories (default: the one
                ``hf auth login`` stored, or ``HF_TOKEN``).
            cache_dir: of a hub id: the hub cache (default: ``HF_HUB_CACHE``).
            local_files_only: of a hub id: read the cache only, as ``HF_HUB_OFFLINE=1`` does.

        Raises:
            UnknownNameError: ``name_or_path`` is neither a preset, an existing path nor a hub id.
            WeightsNotFoundError: a component's weights cannot be found, or the hub id cannot be
                had (not on the hub, needs a token, or offline and not cached); the message lists
                the presets.
            ConfigError: ``memory`` without a CUDA device, or a budget no plan fits; a folder or
                hub repository without ``anygpt_config.yaml``.
        """
        from anygpt.checkpoint import load_weights

        config, base_dir = resolve_config(name_or_path, revision=revision, token=token, cache_dir=cache_dir,
                                          local_files_only=local_files_only)
        model = AnyGPTModel.from_config(config, base_dir=base_dir)
        load_weights(model, base_dir)
        if config.llm.quantization is not None:
            from anygpt.llm import quantize_llm

            # After the LoRA factors are merged and the signal rows loaded: what is quantized is
            # the final weights.
            quantize_llm(model.lm.model, config.llm.quantization)
        pipe = cls(model, base_dir=base_dir)
        if memory is not None:
            pipe._apply_memory_plan(memory, device, dtype)
        elif device is not None or dtype is not None:
            pipe.to(device, dtype)
        return pipe

    def _apply_memory_plan(self, memory: str | int, device: str | torch.device | None,
                           dtype: torch.dtype | None) -> None:
        from anygpt import memory as memory_plans

        device = torch.device(device or "cuda")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError(f"memory={memory!r} plans GPU memory, but the device is {device} and CUDA is "
                              f"{'available' if torch.cuda.is_available() else 'not available'}; drop the "
                              f"memory budget (--gpu-memory) or run on a CUDA device")
        self.to(None, dtype or torch.float16)
        plan = memory_plans.plan_memory(memory_plans.pipeline_components(self), memory)
        if not plan.fits:
            raise ConfigError(f"no memory plan fits {memory!r}:\n{plan.format()}")
        memory_plans.apply_plan(self, plan, device)
        self.memory_plan = plan

    def save_pretrained(self, directory: str | os.PathLike, *, push_to_hub: bool = False,
                        repo_id: str | None = None, private: bool | None = None, token: str | bool | None = None,
                        commit_message: str | None = None, create_pr: bool = False) -> Path:
        """Write a self-contained model directory that :meth:`from_pretrained` reloads exactly,
        with its model card (``README.md``); with ``push_to_hub``, upload it to the Hugging Face
        hub too, as diffusers' and transformers' ``save_pretrained(push_to_hub=True)`` do.

        Args:
            directory: where to write it (an existing model directory there is replaced).
            push_to_hub: then upload the folder to the hub repository ``repo_id`` (created if it
                does not exist), from where ``from_pretrained(repo_id)`` loads it.
            repo_id: ``owner/name`` (default: the directory's name, in the namespace of the
                token's user).
            private: whether a repository created here is private (None: the hub's default).
            token: a hub token (default: the one ``hf auth login`` stored, or ``HF_TOKEN``).
            commit_message: the commit's message (default ``Upload AnyGPT model``).
            create_pr: open a pull request rather than committing to the main branch.

        Returns:
            ``directory``.

        Raises:
            ConfigError: ``directory`` holds something else than a model directory; with
                ``push_to_hub``, the config names local files outside the folder (the upload
                would leave them behind). Nothing is uploaded then.
            CheckpointError: the upload failed (no token, no permission, the hub unreachable);
                the folder is saved all the same.
        """
        from anygpt.checkpoint import upload_model_directory

        directory = Path(directory)
        if not push_to_hub:
            return self._save(directory)
        repo_id = repo_id or directory.resolve().name
        folder = self._save(directory, repo_id)
        upload_model_directory(folder, repo_id, private=private, token=token, commit_message=commit_message,
                               create_pr=create_pr)
        return folder

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, create_pr: bool = False) -> str:
        """Save the model into a temporary folder and upload it to the hub repository
        ``repo_id`` (as :meth:`save_pretrained` with ``push_to_hub=True``, keeping no local copy).

        Returns:
            the URL of the commit (or pull request).

        Raises:
            ConfigError, CheckpointError: as :meth:`save_pretrained`.
        """
        import tempfile

        from anygpt.checkpoint import upload_model_directory

        with tempfile.TemporaryDirectory(prefix="anygpt-push-") as tmp:
            folder = self._save(Path(tmp) / repo_id.rsplit("/", 1)[-1], repo_id)
            return upload_model_directory(folder, repo_id, private=private, token=token,
                                          commit_message=commit_message, create_pr=create_pr)

    def _save(self, directory: Path, repo_id: str | None = None) -> Path:
        """Write the model directory; its card names ``repo_id`` when it is to be pushed there."""
        from anygpt.checkpoint import save_model_directory

        # Only decoders built from `arch` exist nowhere else; pretrained ones stay references
        # (and are not loaded just to be saved).
        decoders = {m: self.decoder(m) for m in self.config.output_modalities
                    if self.config.modalities[m].decoder.pretrained is None}
        return save_model_directory(self.model, directory, decoders=decoders, base_dir=self.base_dir,
                                    card={"repo_id": repo_id} if repo_id else None)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "AnyGPTPipeline":
        """Move the model (and loaded decoders) to ``device``; ``dtype`` applies to the LLM,
        encoder and projectors. Decoders use their config's dtype on CUDA, float32 on CPU."""
        self.model.to(device=device, dtype=dtype)
        for decoder in self._decoders.values():
            decoder.to(self.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    def optimize(self, *, compile: bool = True, channels_last: bool = False, backend: str = "inductor",
                 mode: str | None = "auto") -> "AnyGPTPipeline":
        """Opt-in speed options for a GPU, applied to the LLM and to every decoder (those loaded
        later too).

        Args:
            compile: decode with a static KV cache and a compiled one-token step
                (:meth:`~anygpt.llm.LanguageModel.compile`), and compile each decoder's UNet
                (:meth:`~anygpt.decoders.Decoder.optimize`). The first answer pays the compile time.
            channels_last: the decoders' UNet and VAE weights in channels-last memory order.
            backend: the ``torch.compile`` backend.
            mode: the inductor mode of the LLM step (``auto``: CUDA graphs on CUDA). The UNets
                compile in inductor's default mode: one UNet call is long enough that CUDA graphs
                add little but compile time.
        """
        if compile:
            self.model.lm.compile(backend=backend, mode=mode)
        self._decoder_speed = {"compile": compile, "channels_last": channels_last, "backend": backend}
        for decoder in self._decoders.values():
            decoder.optimize(**self._decoder_speed)
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Show or hide progress bars (decoder denoising steps)."""
        self.progress = not disable

    # Decoders ---------------------------------------------------------------------------------
    def decoder(self, modality: str):
        """The modality's decoder, loaded on first use and cached."""
        if modality not in self._decoders:
            if modality not in self.config.output_modalities:
                raise UnknownNameError("output modality", modality, self.config.output_modalities)
            from anygpt import decoders
            decoder = decoders.load_decoder(decoder_config(self.config, modality, self.base_dir), device=self.device)
            if self._decoder_speed:
                decoder.optimize(**self._decoder_speed)
            self._decoders[modality] = decoder
        return self._decoders[modality]

    def load_decoders(self) -> None:
        """Load every output modality's decoder now rather than on first use."""
        for modality in self.config.output_modalities:
            self.decoder(modality)

    # Generation -----------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[dict] | Sequence[str | Sequence[dict]], *,
                 outputs: Sequence[str] = (), media: MediaInputs | Sequence[MediaInputs | None] | None = None,
                 on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                 **kwargs: Any) -> GenerationOutput | list[GenerationOutput]:
        """Answer one message (or a list of chat messages), or a batch of them.

        Args:
            prompt: the user's text, or messages ``[{"role": ..., "content": ..., "images": [...]}]``.
                ``<image>``/``<audio>``/``<video>`` in the text place the media; otherwise media
                go before the text. A list of such prompts (texts, or message lists) is answered
                as one batch: see :meth:`batch`.
            outputs: modalities the answer must contain (their signal run is completed or appended).
            media: media by modality name (``{"image": [path, ...]}``), attached to the (last)
                user message; file paths or loaded values (PIL images, ``Audio``, ``Video``).
            on_progress: called after each denoising step of a decoder with a
                :class:`~anygpt.types.DecodeProgress` (``label`` such as ``image 1/2``, ``step``,
                ``steps``, ``elapsed_s``, ``eta_s``; ``describe()`` gives one line), e.g. to show
                progress in a UI.
            cancel: a ``threading.Event`` another thread may set to stop: it is checked before
                each LLM token and after each denoising step, and the call then raises
                :class:`~anygpt.errors.Cancelled` (a conversation is left as it was).
            **kwargs: media by each modality's plural name (``images=``, ``audios=``,
                ``videos=``), and settings: the LLM's (:data:`~anygpt.config.SAMPLING_OPTIONS`: ``max_new_tokens``,
                ``temperature``, ``top_p``, ``top_k``, ``do_sample``, ``repetition_penalty``,
                ``stop_strings``, ``seed``) and the decoders' (:data:`~anygpt.config.DECODE_OPTIONS`: ``steps``,
                ``guidance``, ``height``, ``width``, ``num_frames``, ``fps``, ``audio_length_s``).
        """
        if _is_batch(prompt):
            return self.batch(prompt, outputs=outputs, media=media, on_progress=on_progress, cancel=cancel, **kwargs)
        media, settings = _split_media(media, kwargs)
        conversation = Conversation()
        _add_prompt(conversation, prompt, media)
        return self._run(conversation, outputs, settings, on_progress, cancel)

    def batch(self, prompts: Sequence[str | Sequence[dict]], *, outputs: Sequence[str] = (),
              media: Sequence[MediaInputs | None] | None = None, on_progress: ProgressCallback | None = None,
              cancel: threading.Event | None = None, **kwargs: Any) -> list[GenerationOutput]:
        """Answer several prompts at once: the LLM decodes them as one padded batch, and each
        decoder runs once per modality for all their media (in chunks of
        :attr:`decode_batch_size`, or what the memory plan allows).

        Each answer equals ``self(prompt, seed=s, ...)`` for its seed ``s`` up to the rounding of
        batched matrix products: greedy text matches, and so do media for the same seeds.

        Args:
            prompts: texts or message lists, as ``prompt`` of :meth:`__call__`.
            media: one media mapping (or None) per prompt.
            on_progress, cancel: as for :meth:`__call__`.
            **kwargs: settings as for :meth:`__call__`, shared by every prompt, except ``seed``,
                which may be a list with one seed per prompt (an integer seeds each prompt
                alike). Media go in ``media`` or the messages, not in ``images=`` etc.
        """
        media_list = _batch_media(media, kwargs, len(prompts))
        seeds, sampling, decode_opts = self._batch_settings(outputs, kwargs, len(prompts))
        conversations = []
        for prompt, items in zip(prompts, media_list):
            conversation = Conversation(keep_cache=False)
            _add_prompt(conversation, prompt, items)
            conversations.append(conversation)
        return self._run_batch(conversations, outputs, sampling, decode_opts, seeds, on_progress, cancel)

    def chat(self, conversation: Conversation | Sequence[Conversation],
             message: str | Sequence[str | None] | None = None, *, outputs: Sequence[str] = (),
             media: MediaInputs | Sequence[MediaInputs | None] | None = None,
             on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
             **kwargs: Any) -> GenerationOutput | list[GenerationOutput]:
        """Add ``message`` (if given) to ``conversation``, answer it, and record the answer.

        Media of earlier turns are not encoded again. If answering fails, the conversation is
        left as it was before the call. Arguments as for :meth:`__call__`.

        Given a list of conversations (and one message, or None, and one media mapping per
        conversation), they are answered as one batch, as by :meth:`batch`; if any fails, all
        are left as they were. A batched turn prefills each history in full (the kept KV
        caches are neither used nor replaced by it).
        """
        if not isinstance(conversation, Conversation):
            return self._chat_batch(list(conversation), message, outputs, media, kwargs, on_progress, cancel)
        media, settings = _split_media(media, kwargs)
        with conversation.atomic():
            _add_message(conversation, message, media)
            output = self._run(conversation, outputs, settings, on_progress, cancel)
            conversation.add_assistant(output.raw_text)
        return output

    def stream(self, conversation: Conversation, message: str | None = None, *, outputs: Sequence[str] = (),
               media: MediaInputs | None = None, on_progress: ProgressCallback | None = None,
               cancel: threading.Event | None = None,
               **kwargs: Any) -> Iterator[TextDelta | MediaStarted | MediaSegment | GenerationOutput]:
        """Answer ``message`` (if given, else the conversation's last user turn) step by step.

        Yields :class:`TextDelta` as text is generated, :class:`MediaStarted` and then a
        :class:`MediaSegment` for each media item, and finally the :class:`GenerationOutput`
        (which is also recorded in the conversation). If answering fails or the caller stops
        iterating early, the conversation is left as it was before the call.

        Decoder steps are not events: ``on_progress`` (called from inside the decoder, between
        two events) reports them. A consumer that cannot wait for the next event to stop (a
        decoder call lasts seconds) sets ``cancel`` from another thread: iteration then raises
        :class:`~anygpt.errors.Cancelled` at the next token or denoising step. Other arguments
        as for :meth:`__call__`.
        """
        media, settings = _split_media(media, kwargs)
        with conversation.atomic():
            _add_message(conversation, message, media)
            output = None
            for event in self._stream(conversation, outputs, settings, on_progress, cancel):
                output = event
                yield event
            conversation.add_assistant(output.raw_text)

    def _chat_batch(self, conversations: list[Conversation], messages: Sequence[str | None] | str | None,
                    outputs: Sequence[str], media: Any, kwargs: dict, on_progress: ProgressCallback | None = None,
                    cancel: threading.Event | None = None) -> list[GenerationOutput]:
        if isinstance(messages, str):
            raise ConfigError("chat over several conversations takes one message per conversation (a list), "
                              "got one string")
        messages = [None] * len(conversations) if messages is None else list(messages)
        if len(messages) != len(conversations):
            raise ConfigError(f"chat: {len(conversations)} conversations but {len(messages)} messages")
        media_list = _batch_media(media, kwargs, len(conversations))
        seeds, sampling, decode_opts = self._batch_settings(outputs, kwargs, len(conversations))
        with contextlib.ExitStack() as stack:
            for conversation, message, items in zip(conversations, messages, media_list):
                stack.enter_context(conversation.atomic())
                _add_message(conversation, message, items)
            results = self._run_batch(conversations, outputs, sampling, decode_opts, seeds, on_progress, cancel)
            for conversation, output in zip(conversations, results):
                conversation.add_assistant(output.raw_text)
        return results

    def _run(self, conversation: Conversation, outputs: Sequence[str], settings: dict,
             on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> GenerationOutput:
        event = None
        for event in self._stream(conversation, outputs, settings, on_progress, cancel):
            pass
        return event

    def _stream(self, conversation: Conversation, outputs: Sequence[str], settings: dict,
                on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None):
        start = time.perf_counter()
        sampling, decode_opts = self._settings(outputs, settings)
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        self._encode_pending(conversation)
        timings["encode"] = time.perf_counter() - t0

        prompt, embeds = self._prompt(conversation, sampling)
        keys = prompt.position_keys() if conversation.keep_cache else None
        result: LLMResult = yield from _wrap_text(
            generate_stream(self.model.lm, embeds, prompt.input_ids, sampling, required=tuple(outputs),
                            position_keys=keys, reuse=conversation.take_cache(), cancel=cancel))
        conversation.keep(result.cache)
        timings["prefill"], timings["decode"] = result.prefill_s, result.decode_s

        for index, run in enumerate(result.runs):
            yield MediaStarted(run.modality, index)
        media: list[MediaSegment | None] = [None] * len(result.runs)
        for index, segment in self._decode_runs(result.runs, _media_seeds(sampling.seed, result.runs),
                                                decode_opts, timings, on_progress, cancel):
            media[index] = segment
            yield segment
        timings["total"] = time.perf_counter() - start
        yield self._output(prompt, result, media, timings)

    def _run_batch(self, conversations: list[Conversation], outputs: Sequence[str], sampling: SamplingSettings,
                   decode_opts: dict, seeds: list[int | None], on_progress: ProgressCallback | None = None,
                   cancel: threading.Event | None = None) -> list[GenerationOutput]:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self._encode_pending(*conversations)
        timings["encode"] = time.perf_counter() - t0
        prompts = [self._prompt(conversation, sampling) for conversation in conversations]
        results = generate_batch(self.model.lm, [embeds for _, embeds in prompts],
                                 [prompt.input_ids for prompt, _ in prompts], sampling, required=tuple(outputs),
                                 seeds=seeds, cancel=cancel)
        timings["prefill"], timings["decode"] = results[0].prefill_s, results[0].decode_s
        runs = [run for result in results for run in result.runs]
        run_seeds = [s for result, seed in zip(results, seeds) for s in _media_seeds(seed, result.runs)]
        media: list[MediaSegment | None] = [None] * len(runs)
        for index, segment in self._decode_runs(runs, run_seeds, decode_opts, timings, on_progress, cancel):
            media[index] = segment
        timings["total"] = time.perf_counter() - start
        outputs_, first = [], 0
        for (prompt, _), result in zip(prompts, results):
            outputs_.append(self._output(prompt, result, media[first:first + len(result.runs)], dict(timings)))
            first += len(result.runs)
        return outputs_

    def _batch_settings(self, outputs: Sequence[str], kwargs: dict,
                        count: int) -> tuple[list[int | None], SamplingSettings, dict]:
        """Per-prompt seeds, and the shared sampling settings and decode options, all checked."""
        if count == 0:
            raise ConfigError("a batch needs at least one prompt, got an empty list")
        settings = dict(kwargs)
        seed = settings.pop("seed", None)
        if isinstance(seed, (list, tuple)):
            if len(seed) != count:
                raise ConfigError(f"settings.seed: {len(seed)} seeds for {count} prompts; give one per prompt "
                                  f"or a single integer")
            sampling, decode_opts = self._settings(outputs, settings)
            for value in seed:
                replace(sampling, seed=value).validate("settings")
            return list(seed), sampling, decode_opts
        sampling, decode_opts = self._settings(outputs, {**settings, "seed": seed})
        return [sampling.seed] * count, sampling, decode_opts

    def _prompt(self, conversation: Conversation, sampling: SamplingSettings) -> tuple[PromptInputs, torch.Tensor]:
        """The conversation's prompt (trimmed to leave room for the answer) and its (1, L, hidden)
        input embeddings."""
        prompt = self.model.lm.tokenize_prompt(conversation.turns, self.model.num_media_tokens(),
                                               reserve=sampling.max_new_tokens)
        embeds = self.model.embed_prompt(prompt, [conversation.encoding(r.key) for r in prompt.media])
        return prompt, embeds

    def _output(self, prompt: PromptInputs, result: LLMResult, media: Sequence[MediaSegment],
                timings: dict[str, float]) -> GenerationOutput:
        media_iter = iter(media)
        segments = [TextSegment(piece) if isinstance(piece, str) else next(media_iter) for piece in result.pieces]
        return GenerationOutput(segments=segments, raw_text=self.model.lm.decode(result.token_ids),
                                timings=timings, num_generated_tokens=len(result.token_ids),
                                num_prompt_tokens=prompt.input_ids.numel(), num_cached_tokens=result.reused_tokens,
                                stop_reason=result.stop_reason)

    def _settings(self, outputs: Sequence[str], settings: dict) -> tuple[SamplingSettings, dict]:
        for modality in outputs:
            if modality not in self.config.output_modalities:
                raise UnknownNameError("output modality", modality, self.config.output_modalities)
        sampling_names = {f.name for f in fields(SamplingSettings)}
        decode_options = {opt.name: opt for opt in DECODE_OPTIONS}
        unknown = set(settings) - sampling_names - set(decode_options)
        if unknown:
            valid = sorted(sampling_names | set(decode_options) | {get_modality(m).plural for m in MODALITIES})
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
        # Every value is checked here, before anything is encoded or generated: a bad decoder
        # setting must not surface only after the text has been written.
        values = asdict(self.config.generation)
        values.update({n: v for n, v in settings.items() if n in sampling_names and v is not None})
        sampling = SamplingSettings(**values)
        sampling.validate("settings")
        decode_opts = check_options(DECODE_OPTIONS, settings, "settings")
        return sampling, decode_opts

    def _encode_pending(self, *conversations: Conversation) -> None:
        """Encode the conversations' new media, one batch per modality."""
        by_modality: dict[str, list] = defaultdict(list)
        for conversation in conversations:
            for item in conversation.pending():
                by_modality[item.modality].append((conversation, item))
        for modality, entries in by_modality.items():
            if modality not in self.model.input_projectors:
                raise UnknownNameError("input modality", modality, list(self.model.input_projectors))
            embeddings = self.model.encode_items(modality, [item.value for _, item in entries])  # (N, D)
            for (conversation, item), embedding in zip(entries, embeddings):
                conversation.record_encoding(item.key, embedding)

    def _decode_runs(self, runs: Sequence[SignalRun], seeds: Sequence[int | None], options: dict,
                     timings: dict, on_progress: ProgressCallback | None = None,
                     cancel: threading.Event | None = None) -> Iterator[tuple[int, MediaSegment]]:
        """Decode signal runs, each decoder once per chunk of its modality's runs; yields
        ``(index in runs, segment)``, in order within each modality."""
        by_modality: dict[str, list[int]] = defaultdict(list)
        for index, run in enumerate(runs):
            by_modality[run.modality].append(index)
        for modality, indices in by_modality.items():
            t0 = time.perf_counter()
            decoder = self.decoder(modality)
            load = time.perf_counter() - t0
            if load > 1e-3:
                timings[f"load/{modality}"] = timings.get(f"load/{modality}", 0.0) + load
            size = self._decode_chunk(modality) or len(indices)
            for first in range(0, len(indices), size):
                chunk = indices[first:first + size]
                t0 = time.perf_counter()
                with torch.no_grad():
                    states = torch.stack([runs[i].hidden_states for i in chunk])  # (N, S, hidden)
                    condition = self.model.project_signals(modality, states)
                values = decoder.decode(condition, seed=[seeds[i] for i in chunk], progress=self.progress,
                                        progress_label=_chunk_label(modality, first, len(chunk), len(indices)),
                                        on_progress=on_progress, cancel=cancel, **options)
                key = f"decoder/{modality}"
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
                for i, value in zip(chunk, values):
                    yield i, MediaSegment(modality, value, forced=runs[i].forced)

    def _decode_chunk(self, modality: str) -> int | None:
        if self.decode_batch_size is not None:
            return self.decode_batch_size
        if self.memory_plan is not None:
            return self.memory_plan.max_decode_batch(f"decoder/{modality}")
        return None


def _wrap_text(gen):
    """Re-yield a text generator's strings as :class:`TextDelta` and return its result."""
    try:
        while True:
            yield TextDelta(next(gen))
    except StopIteration as stop:
        return stop.value


def _chunk_label(modality: str, first: int, size: int, total: int) -> str:
    """``image 1/2``, or ``image 1-3/4`` for a chunk of several items."""
    span = f"{first + 1}" if size == 1 else f"{first + 1}-{first + size}"
    return f"{modality} {span}/{total}"


def _media_seeds(seed: int | None, runs: Sequence[SignalRun]) -> list[int | None]:
    """Media item ``i`` of an answer is decoded with ``seed + i``."""
    return [None if seed is None else seed + index for index in range(len(runs))]


def _is_batch(prompt: Any) -> bool:
    """A list of prompts (texts or message lists), not one prompt's message list."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, str) or (isinstance(p, (list, tuple))) for p in prompt))


def _batch_media(media: Any, kwargs: dict[str, Any], count: int) -> list[dict[str, list]]:
    """One media mapping per prompt of a batch."""
    plurals = sorted(get_modality(m).plural for m in MODALITIES if get_modality(m).plural in kwargs)
    if plurals:
        raise ConfigError(f"{', '.join(plurals)}= cannot be split between the prompts of a batch; give "
                          f"media=[{{'image': [...]}}, ...] with one mapping per prompt, or put them in the messages")
    if media is None:
        return [{} for _ in range(count)]
    if isinstance(media, Mapping) or len(media) != count:
        raise ConfigError(f"media: a batch of {count} prompts takes a list of {count} media mappings (or None), "
                          f"one per prompt")
    return [_split_media(items, {})[0] for items in media]


def _add_prompt(conversation: Conversation, prompt: str | Sequence[dict], media: Mapping[str, list]) -> None:
    if isinstance(prompt, str):
        conversation.add_user(prompt, media)
    else:
        add_messages(conversation, prompt, media)


def _split_media(media: MediaInputs | None, kwargs: dict[str, Any]) -> tuple[dict[str, list], dict[str, Any]]:
    """Media by modality name (from ``media`` and the plural keywords) and the remaining settings."""
    merged = {modality: list(items) for modality, items in (media or {}).items()}
    settings = dict(kwargs)
    for name in MODALITIES:
        plural = get_modality(name).plural
        if plural in settings:
            merged.setdefault(name, []).extend(settings.pop(plural) or ())
    return {m: items for m, items in merged.items() if items}, settings


def _add_message(conversation: Conversation, message: str | None, media: Mapping[str, list]) -> None:
    if message is not None:
        conversation.add_user(message, media)
    elif media:
        raise ConfigError("media were given without a message; pass the message text too")


def add_messages(conversation: Conversation, messages: Sequence[dict], media: Mapping[str, list]) -> None:
    """Fill a conversation from chat messages; loose media attach to the last user message.

    A message's own media are under each modality's plural name (``"images": [...]``), or in its
    ``content`` given as typed parts (:func:`content_parts`).
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ConfigError("messages: at least one message with role 'user' is required")
    plurals = {get_modality(m).plural: m for m in MODALITIES}
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content", "")
        unknown = sorted(set(message) - {"role", "content"} - set(plurals))
        if unknown:
            raise ConfigError(f"messages[{i}]: unknown key(s) {', '.join(unknown)}; valid: role, content, "
                              f"{', '.join(plurals)}")
        own = {plurals[key]: list(items) for key, items in message.items() if key in plurals}
        if isinstance(content, (list, tuple)):
            content, parts_media = content_parts(content, f"messages[{i}].content")
            for modality, items in parts_media.items():
                own.setdefault(modality, []).extend(items)
        if i == last_user:
            for modality, items in media.items():
                own.setdefault(modality, []).extend(items)
        if role == "user":
            conversation.add_user(content, own)
        elif own:
            raise ConfigError(f"messages[{i}]: only user messages carry media")
        elif role == "assistant":
            conversation.add_assistant(content)
        elif role == "system":
            conversation.set_system(content)
        else:
            raise ConfigError(f"messages[{i}].role: must be user, assistant or system, got {role!r}")


def content_parts(parts: Sequence[Any], where: str) -> tuple[str, dict[str, list]]:
    """Typed content parts, as transformers' any-to-any pipeline takes them, as text with a
    ``<image>``-style tag where each item was, and the items by modality.

    A part is ``{"type": "text", "text": ...}`` or ``{"type": "<modality>", <source>}`` with the
    source under ``path``, ``url`` (a local file; nothing is downloaded) or the modality's own
    name (a loaded value: a PIL image, ``Audio``, ``Video``).
    """
    pieces: list[str] = []
    media: dict[str, list] = {}
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
            continue
        if kind not in MODALITIES:
            raise ConfigError(f"{where}[{j}]: unknown part type {kind!r}; valid: text, {', '.join(MODALITIES)}")
        sources = [key for key in ("path", "url", kind) if part.get(key) is not None]
        if len(sources) != 1:
            raise ConfigError(f"{where}[{j}]: a {kind} part needs exactly one of path, url or {kind}, "
                              f"got {', '.join(sources) or 'none'}")
        value = part[sources[0]]
        if sources[0] == "url":
            if str(value).startswith(("http://", "https://")):
                raise ConfigError(f"{where}[{j}]: remote URLs are not fetched; download the file and give its path")
            value = str(value).removeprefix("file://")
        media.setdefault(kind, []).append(value)
        pieces.append(f"<{kind}>")
    return "\n".join(p for p in pieces if p), media


#: A hub repository id: ``owner/name`` (the hub's own rule for the characters).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(name: str) -> bool:
    """True for ``owner/name``, the form of a hub repository id (which may still not exist)."""
    return (_HUB_ID.fullmatch(name) is not None and not looks_like_path(name) and ".." not in name
            and not name.endswith((".yaml", ".yml")))


def resolve_config(name_or_path: str | os.PathLike, *, revision: str | None = None,
                   token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool = False) -> tuple[AnyGPTConfig, Path | None]:
    """A config and the directory its relative paths resolve against, from (in this order) a
    model directory, a YAML config file, a hub id (``owner/name``: see
    :func:`~anygpt.checkpoint.download_model_directory`, whose arguments the keywords are) or a
    preset name.

    Raises:
        UnknownNameError: none of these (the message lists the presets).
        WeightsNotFoundError, ConfigError: a hub id that cannot be had, or is no model directory.
    """
    path = Path(name_or_path)
    if not path.exists() and is_hub_id(str(name_or_path)):
        from anygpt.checkpoint import download_model_directory

        path = download_model_directory(str(name_or_path), valid_names=list_presets(), revision=revision,
                                        token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if path.is_dir():
        if not (path / CONFIG_FILENAME).is_file():
            raise ConfigError(f"{path}: not a model directory (no {CONFIG_FILENAME}); "
                              f"write one with AnyGPTPipeline.save_pretrained")
        return AnyGPTConfig.from_file(path / CONFIG_FILENAME), path.resolve()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return AnyGPTConfig.from_file(path), path.resolve().parent
    # A preset's relative paths, like any config file's, resolve against its own folder.
    path = preset_file(str(name_or_path))
    return AnyGPTConfig.from_file(path), path.parent

"""Saving and loading model directories, and reading NExT-GPT's released checkpoint.

A model directory holds ``anygpt_config.yaml`` plus the weights that cannot be fetched again:

* ``projectors.safetensors`` — input and output projectors;
* ``llm_added_tokens.safetensors`` — embedding (and LM-head) rows of the added tokens, when the
  LLM itself is referenced by hub id or path;
* ``llm/`` — the whole LLM and tokenizer instead, when its weights exist nowhere else: randomly
  initialised (the ``tiny`` preset), changed by training (LoRA merged) or by a NExT-GPT
  checkpoint;
* ``encoder.safetensors``, ``decoders/<modality>/`` — whole components, written only when they
  were randomly initialised and so exist nowhere else.

:func:`save_model_directory` is the one writer of all of these. On the Hugging Face hub a model
directory is a model repository: :func:`upload_model_directory` pushes one, and
:func:`download_model_directory` brings one (or finds it in the hub's local cache).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anygpt import nextgpt
from anygpt.config import CONFIG_FILENAME, AnyGPTConfig, EncoderConfig, LLMConfig
from anygpt.encoders import IMAGEBIND_HUGE, IMAGEBIND_HUGE_ARCH
from anygpt.errors import CheckpointError, ConfigError, WeightsNotFoundError
from anygpt.llm import BYTE_LEVEL, LanguageModel, _load_tokenizer, _resolve_source, hf_config_for_arch
from anygpt.model_card import MODEL_CARD_FILENAME, model_card, previous_card
from anygpt.paths import resolve_path
from anygpt.weightfiles import check_dims, check_state, read_json_config, read_safetensors, read_torch_file

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from anygpt.decoders import Decoder
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["save_model_directory", "download_model_directory", "upload_model_directory", "outside_references",
           "load_weights", "load_checkpoint", "load_nextgpt_state", "read_nextgpt_file",
           "check_nextgpt_checkpoint", "check_nextgpt_state", "expected_nextgpt_layout", "encoder_width", "check_replaceable", "merge_lora",
           "stack_lora", "LoraFactors", "PROJECTORS_FILE", "ADDED_TOKENS_FILE", "LLM_LORA_FILE"]

PROJECTORS_FILE = "projectors.safetensors"
ADDED_TOKENS_FILE = "llm_added_tokens.safetensors"
#: LoRA factors of an LLM the directory references: ``<module>.lora_A``, ``.lora_B``, ``.scale``.
LLM_LORA_FILE = "llm_lora.safetensors"
ENCODER_FILE = "encoder.safetensors"
LLM_DIR = "llm"
DECODERS_DIR = "decoders"


def projector_state(model: "AnyGPTModel") -> dict[str, torch.Tensor]:
    """The projectors' tensors, keyed ``input_projectors.<m>.*`` / ``output_projectors.<m>.*``."""
    state = {f"input_projectors.{k}": v for k, v in model.input_projectors.state_dict().items()}
    state.update({f"output_projectors.{k}": v for k, v in model.output_projectors.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def added_token_state(model: "AnyGPTModel") -> dict[str, torch.Tensor]:
    """The rows of the tokens AnyGPT added, from the input embeddings and (if untied) the LM head."""
    ids = torch.tensor(model.lm.added_token_ids())
    llm = model.lm.model
    state = {"input_embeddings": llm.get_input_embeddings().weight[ids]}
    out = llm.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != llm.get_input_embeddings().weight.data_ptr():
        state["output_embeddings"] = out.weight[ids]
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# Saving -----------------------------------------------------------------------------------------


#: LoRA factors by module path (``model.layers.0.self_attn.q_proj``): ``(A (r, in), B (out, r), scale)``;
#: the module's weight is ``W + scale · B @ A``.
LoraFactors = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]


def save_model_directory(model: "AnyGPTModel", directory: str | os.PathLike, *, decoders: Mapping[str, "Decoder"],
                         base_dir: Path | None, save_llm: bool = False, llm_lora: LoraFactors | None = None,
                         card: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a model directory that ``AnyGPTPipeline.from_pretrained`` reloads exactly.

    The directory is written into a temporary sibling folder, then renamed into place, so it is
    never seen half-written; an existing model directory at ``directory`` is replaced.

    Args:
        model: the model to save.
        directory: where to write it.
        decoders: output modality → its loaded decoder; needed for the decoders built from
            ``arch`` (their random weights are saved), the others are referenced.
        base_dir: the folder the model's config came from (its relative paths resolve there);
            None for presets.
        save_llm: write the whole LLM under ``llm/`` even when the config references it (its
            weights changed). It is also written when it was randomly initialised or changed by
            a NExT-GPT checkpoint.
        llm_lora: LoRA factors already merged into the model's LLM (default: its
            ``lm.merged_lora``, every LoRA merged so far). Where the LLM is referenced (not
            written whole), they are written instead (megabytes, not the whole LLM) and merged
            again when the directory is loaded.
        card: what the model card adds to the components: ``training`` (a mapping of what
            trained it), ``metrics`` (its last evaluation) and ``repo_id`` (the hub repository it
            is pushed to), all optional. The card of ``base_dir``, where the model was loaded
            from, is carried over: its Training, Evaluation and user sections are kept unless
            ``training`` or ``metrics`` replace them (:func:`anygpt.model_card.model_card`).

    Returns:
        ``directory``.

    Raises:
        ConfigError: ``directory`` exists and is neither empty nor a model directory, or a decoder
            that must be saved is missing from ``decoders``.
    """
    directory = Path(directory)
    check_replaceable(directory)
    # Read before anything is written: re-saving in place replaces the folder it lies in.
    previous = previous_card(base_dir)
    staging = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        writer = _DirectoryWriter(model, staging, base_dir, destination=directory)
        data = model.config.to_dict()
        data["checkpoint"] = None  # its weights are in the files written below
        writer.encoder(data["encoder"])
        lora = model.lm.merged_lora if llm_lora is None else llm_lora
        writer.llm(data["llm"], whole=save_llm or _llm_exists_nowhere_else(model), lora=lora)
        for name in model.config.output_modalities:
            writer.decoder(name, data["modalities"][name]["decoder"], decoders)
        writer.save_tensors(PROJECTORS_FILE, projector_state(model))
        for example in data["examples"]:
            example["media"] = {m: [writer.reference(p) for p in paths] for m, paths in example["media"].items()}
        config = AnyGPTConfig.from_dict(data)
        config.to_yaml(staging / CONFIG_FILENAME)
        card = dict(card or {})
        (staging / MODEL_CARD_FILENAME).write_text(
            model_card(config.to_dict(), training=card.get("training"), metrics=card.get("metrics"),
                       repo_id=card.get("repo_id"), previous=previous), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, directory)
    logger.info("saved AnyGPT model to %s", directory)
    return directory


def _llm_exists_nowhere_else(model: "AnyGPTModel") -> bool:
    """True when the LLM's weights are not what its config references: randomly initialised,
    or changed by a NExT-GPT checkpoint (resized embeddings, merged LoRA)."""
    llm = model.config.llm
    random = llm.pretrained is None and llm.arch is not None
    checkpoint = model.config.checkpoint
    return random or (checkpoint is not None and not checkpoint.endswith(".safetensors"))


class _DirectoryWriter:
    """Writes a model's parts into a staging folder and updates the config's dict to match."""

    def __init__(self, model: "AnyGPTModel", staging: Path, base_dir: Path | None, destination: Path):
        self.model, self.staging, self.base_dir = model, staging, base_dir
        self.destination = destination.resolve()

    def save_tensors(self, name: str, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file(state, str(self.staging / name))

    def encoder(self, cfg: dict[str, Any]) -> None:
        if cfg["pretrained"] is None:
            self.model.encoder.save_weights(self.staging / ENCODER_FILE)
            cfg["pretrained"] = ENCODER_FILE
        elif cfg["pretrained"] != IMAGEBIND_HUGE:
            cfg["pretrained"] = self.reference(cfg["pretrained"])

    def llm(self, cfg: dict[str, Any], whole: bool, lora: LoraFactors | None) -> None:
        if whole:
            _write_llm_folder(self.model.lm, self.staging / LLM_DIR)
            cfg.update(pretrained=LLM_DIR, arch=None, tokenizer=None, gguf_file=None, local_package=None)
            return
        for key in ("pretrained", "tokenizer"):
            if cfg[key] is not None and cfg[key] != BYTE_LEVEL:
                cfg[key] = self.reference(cfg[key])
        self.save_tensors(ADDED_TOKENS_FILE, added_token_state(self.model))
        if lora:
            self.save_tensors(LLM_LORA_FILE, _lora_state(lora))

    def decoder(self, modality: str, cfg: dict[str, Any], decoders: Mapping[str, "Decoder"]) -> None:
        if cfg["pretrained"] is not None:
            cfg["pretrained"] = self.reference(cfg["pretrained"])
            return
        if modality not in decoders:
            raise ConfigError(f"the {modality} decoder was built from `arch` (random weights), so it must be "
                              f"saved: pass it in `decoders` (got {sorted(decoders)})")
        folder = f"{DECODERS_DIR}/{modality}"
        decoders[modality].save_pretrained(self.staging / folder)
        cfg.update(pretrained=folder, arch=None)

    def reference(self, value: str) -> str:
        """How the new directory names a referenced component.

        A hub id stays as it is. A part of a model directory (this one, which replacing would
        delete, or another, such as an earlier training stage's) is brought into the new one
        at the same relative path, hard-linked where the file system allows, so that the
        directory can be moved or shared on its own. Any other local path (a user's folder or a
        download cache) is referenced by its absolute path.
        """
        if not Path(resolve_path(value, self.base_dir)).exists():
            return value
        path = _absolute(value, self.base_dir)
        home = self.destination if path.is_relative_to(self.destination) else _model_directory_of(path)
        if home is None:
            return str(path)
        relative = path.relative_to(home)
        target = self.staging / relative
        if not target.exists():  # two references (the LLM and its tokenizer) may name one folder
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, copy_function=_link_or_copy)
            else:
                _link_or_copy(path, target)
        return relative.as_posix()


def _absolute(value: str, base_dir: Path | None) -> Path:
    """The absolute path ``value`` names, with symbolic links kept as they are.

    A file of a hub download is a link from ``snapshots/<commit>/`` to the cache's ``blobs/``:
    followed, it would no longer lie in its model directory, and a folder saved from a
    downloaded model would name the cache by absolute path instead of holding the file.
    """
    path = Path(resolve_path(value, None))  # {cache} and ~ expanded; a relative value stays relative
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return Path(os.path.abspath(path))


def _model_directory_of(path: Path) -> Path | None:
    """The model directory (a folder holding a config file) that ``path`` lies in, if any."""
    for folder in path.parents:
        if (folder / CONFIG_FILENAME).is_file():
            return folder
    return None


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link (no extra space), or a copy across file systems.

    A symbolic link (a file of a hub download) is followed: the new file is its target's.
    """
    source = os.path.realpath(source)  # os.link itself links the symbolic link on Linux
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_llm_folder(lm: LanguageModel, folder: Path) -> Path:
    """Write the LLM's weights, configs and tokenizer as a folder ``from_pretrained`` loads.

    The weights are written with safetensors directly: ``save_pretrained`` refuses models that
    were loaded from GGUF (the ``mini`` preset), although their tensors are plain after loading.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = lm.model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the input embeddings
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for part in (model.config, getattr(model, "generation_config", None), lm.tokenizer):
        if part is not None:
            part.save_pretrained(folder)
    return folder


def check_replaceable(directory: Path) -> None:
    """Refuse to replace a folder that holds anything but a model directory.

    Raises:
        ConfigError: ``directory`` exists and is neither empty nor a model directory.
    """
    if directory.exists() and not (directory.is_dir() and (
            (directory / CONFIG_FILENAME).is_file() or not any(directory.iterdir()))):
        raise ConfigError(f"{directory} exists and is not an AnyGPT model directory (no {CONFIG_FILENAME}); "
                          "saving replaces the whole folder, so choose a new or empty one")


def _move_into_place(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``, replacing an existing one only once the new one is complete."""
    old = None
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    staging.rename(directory)
    if old is not None:
        shutil.rmtree(old)


# The Hugging Face hub -----------------------------------------------------------------------------

#: The commit message of an upload that names none (as diffusers' ``Upload {class}``).
DEFAULT_COMMIT_MESSAGE = "Upload AnyGPT model"
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def outside_references(directory: Path) -> list[str]:
    """The local paths the model directory's config names outside the directory itself.

    Such a directory loads here but nowhere else: uploaded or copied, those files stay behind.
    Hub ids and the directory's own relative paths are fine.
    """
    config = AnyGPTConfig.from_file(directory / CONFIG_FILENAME)
    values = [config.encoder.pretrained, config.llm.pretrained, config.llm.tokenizer, config.checkpoint]
    values += [m.decoder.pretrained for m in config.modalities.values() if m.decoder is not None]
    values += [p for example in config.examples for paths in example.media.values() for p in paths]
    home = directory.resolve()
    outside = []
    for value in (v for v in values if v):
        resolved = resolve_path(value, directory)
        if resolved == value and not os.path.isabs(value):
            continue  # a hub id (or a name such as imagebind_huge or byte-level)
        if not Path(os.path.abspath(resolved)).is_relative_to(home):
            outside.append(value)
    return outside


def upload_model_directory(directory: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                           token: str | bool | None = None, commit_message: str | None = None,
                           create_pr: bool = False) -> str:
    """Upload a model directory to the hub repository ``repo_id``, created if it does not exist.

    The calls are ``huggingface_hub``'s ``HfApi.create_repo(exist_ok=True)`` and
    ``HfApi.upload_folder``, as diffusers' and transformers' ``push_to_hub`` make them.

    Args:
        directory: a model directory (:func:`save_model_directory`).
        repo_id: ``owner/name``, or ``name`` in the namespace of the token's user.
        private: whether a repository created here is private (None: the hub's default); an
            existing repository keeps its visibility.
        token: a hub token; None uses the one ``hf auth login`` stored or ``HF_TOKEN``.
        commit_message: the commit's message (default :data:`DEFAULT_COMMIT_MESSAGE`).
        create_pr: open a pull request rather than committing to the main branch.

    Returns:
        the URL of the commit (or pull request).

    Raises:
        ConfigError: ``directory`` is not a model directory, or its config names local files
            outside it, which the upload would leave behind.
        CheckpointError: the hub refused the upload or could not be reached.
    """
    directory = Path(directory)
    if not (directory / CONFIG_FILENAME).is_file():
        raise ConfigError(f"{directory}: not a model directory (no {CONFIG_FILENAME}); write one with "
                          f"AnyGPTPipeline.save_pretrained before uploading it")
    outside = outside_references(directory)
    if outside:
        raise ConfigError(f"{directory}: its {CONFIG_FILENAME} names local files outside the folder "
                          f"({', '.join(map(repr, outside))}), which an upload would leave behind, so it would not "
                          f"load anywhere else; save the components into a model directory first, or point "
                          f"the config at their hub ids")
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="anygpt")
    try:
        resolved = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        if resolved != repo_id:  # `name` became `user/name`: the card's snippet names the full id
            card = directory / MODEL_CARD_FILENAME
            if card.is_file():
                card.write_text(card.read_text().replace(f'from_pretrained("{repo_id}")',
                                                         f'from_pretrained("{resolved}")'))
        info = api.upload_folder(repo_id=resolved, folder_path=directory, token=token,
                                 commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, create_pr=create_pr)
    except Exception as exc:  # hub errors vary (no token, no permission, offline, network); all mean "not uploaded"
        raise CheckpointError(
            f"could not upload {directory} to the Hugging Face hub repository {repo_id!r}: "
            f"{type(exc).__name__}: {_first_line(exc)}; log in (`hf auth login`) or pass token=, check that "
            f"the token may write to {repo_id!r}, and that the hub is reachable (HF_HUB_OFFLINE unset). "
            f"The folder itself is saved and complete") from exc
    logger.info("uploaded %s to the hub repository %s", directory, resolved)
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)


def download_model_directory(repo_id: str, *, valid_names: "list[str] | tuple[str, ...]" = (),
                             revision: str | None = None, token: str | bool | None = None,
                             cache_dir: str | os.PathLike | None = None,
                             local_files_only: bool = False) -> Path:
    """The folder of the model repository ``repo_id``, downloaded with ``huggingface_hub``'s
    ``snapshot_download`` or found in its local cache.

    Its ``anygpt_config.yaml`` is fetched first, so that a repository that is no AnyGPT model
    is refused before anything large is downloaded; the rest comes from the same commit.
    ``HF_HUB_OFFLINE=1`` (or ``local_files_only``) reads the cache only.

    Args:
        repo_id: ``owner/name``.
        valid_names: the preset names, listed when nothing can be found (the name may be a typo).
        revision: a branch, tag or commit (default: the main branch).
        token: a hub token, for private or gated repositories.
        cache_dir: the hub cache (default: ``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``).
        local_files_only: never reach the hub.

    Raises:
        WeightsNotFoundError: the repository or revision is not on the hub, it needs a token, or
            the hub cannot be reached and the cache does not hold it.
        ConfigError: the repository holds no ``anygpt_config.yaml``.
    """
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    kwargs: dict[str, Any] = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                                  library_name="anygpt")
    presets = f"the presets are {', '.join(sorted(valid_names))}; " if valid_names else ""
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        config_file = Path(hf_hub_download(repo_id, CONFIG_FILENAME, revision=revision, **kwargs))
        commit = config_file.parent.name
        folder = Path(snapshot_download(repo_id, revision=commit if _COMMIT_HASH.fullmatch(commit) else revision,
                                        **kwargs))
    except LocalEntryNotFoundError as exc:
        if _cached_snapshot(repo_id, revision, cache_dir) is not None:
            raise ConfigError(f"the cached copy of hub repository {where} holds no {CONFIG_FILENAME}, so it is not "
                              f"an AnyGPT model directory (or the copy is incomplete: download it again with "
                              f"network access); give the id of one pushed with save_pretrained(push_to_hub=True), "
                              f"or the path of a model directory") from exc
        offline = local_files_only or constants.HF_HUB_OFFLINE
        reason, fix = (("the hub is not reached (HF_HUB_OFFLINE=1 or local_files_only)",
                        "download it once with network access (unset HF_HUB_OFFLINE)") if offline else
                       ("the hub could not be reached", "check the network connection (and HF_ENDPOINT)"))
        cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        raise WeightsNotFoundError(
            f"{where} is not a preset, nor a local folder, nor in the Hugging Face cache {cache}, and {reason}; "
            f"{presets}check the name, give the path of a model directory, or {fix}") from exc
    except RevisionNotFoundError as exc:
        raise WeightsNotFoundError(f"hub repository {repo_id!r} has no revision {revision!r}; give an existing "
                                   f"branch, tag or commit, or leave revision unset for the main branch") from exc
    except RepositoryNotFoundError as exc:  # GatedRepoError too: the hub answers 401/403 alike
        gated = isinstance(exc, GatedRepoError)
        raise WeightsNotFoundError(
            f"{where} is not a preset, nor a local folder, and the Hugging Face hub "
            f"{'holds it gated' if gated else 'has no such repository (or it is private)'}; {presets}check the "
            f"name, give the path of a model directory, or, for a private or gated repository, log in "
            f"(`hf auth login`) or pass token=") from exc
    except EntryNotFoundError as exc:
        raise ConfigError(f"hub repository {where} holds no {CONFIG_FILENAME}, so it is not an AnyGPT model "
                          f"directory; give the id of one (pushed with save_pretrained(push_to_hub=True)), or "
                          f"build a config that names this repository as a component") from exc
    except Exception as exc:  # other hub errors (network, server): all mean "not here"
        raise WeightsNotFoundError(f"could not download {where} from the Hugging Face hub "
                                   f"({type(exc).__name__}: {_first_line(exc)}); check the network and the name, "
                                   f"or give the path of a model directory") from exc
    return folder


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision``, if the hub cache holds one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:  # not cached
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


# Loading ----------------------------------------------------------------------------------------


def load_weights(model: "AnyGPTModel", directory: Path | None) -> None:
    """Load the projector and added-token files of a model directory (if any), then the
    config's ``checkpoint`` (if any)."""
    if directory is None:
        pass
    elif (directory / PROJECTORS_FILE).is_file():
        path = directory / PROJECTORS_FILE
        _load_projectors(model, read_safetensors(path, what="projector weights", fix=_DIRECTORY_FIX), path)
    if directory is not None and (directory / ADDED_TOKENS_FILE).is_file():
        path = directory / ADDED_TOKENS_FILE
        _load_added_rows(model, read_safetensors(path, what="added-token rows", fix=_DIRECTORY_FIX), path)
    if directory is not None and (directory / LLM_LORA_FILE).is_file():
        path = directory / LLM_LORA_FILE
        factors = _lora_factors(read_safetensors(path, what="LoRA factors", fix=_DIRECTORY_FIX), path)
        merge_lora(model.lm.model, factors, source=path)
        model.lm.merged_lora = stack_lora(model.lm.merged_lora, factors)
    if model.config.checkpoint:
        load_checkpoint(model, model.config.checkpoint, directory)


#: How to fix a bad file of a model directory.
_DIRECTORY_FIX = ("save the model directory again (AnyGPTPipeline.save_pretrained) or copy it again from where "
                  "it was made, and check that its anygpt_config.yaml is the one it was saved with")


def _load_projectors(model: "AnyGPTModel", state: dict[str, torch.Tensor], source: object) -> None:
    check_state(projector_state(model), state, source=source, what="projector weights", fix=_DIRECTORY_FIX)
    for prefix, module in (("input_projectors.", model.input_projectors),
                           ("output_projectors.", model.output_projectors)):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _load_added_rows(model: "AnyGPTModel", state: dict[str, torch.Tensor], source: object) -> None:
    ids = torch.tensor(model.lm.added_token_ids())
    llm = model.lm.model
    expected = {k: v.shape for k, v in added_token_state(model).items()}
    check_state(expected, state, source=source, what="added-token rows", fix=_DIRECTORY_FIX,
                allow_unexpected="output_embeddings" not in expected)
    if "output_embeddings" not in expected:
        state = {k: v for k, v in state.items() if k != "output_embeddings"}
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[ids] = state["input_embeddings"].to(emb.device, emb.dtype)
        if "output_embeddings" in state:
            out = llm.get_output_embeddings().weight
            out[ids] = state["output_embeddings"].to(out.device, out.dtype)


def load_checkpoint(model: "AnyGPTModel", reference: str, base_dir: Path | None = None, *,
                    lora_alpha: float | None = None, lora_r: int | None = None,
                    allow_unexpected: bool = False, added_tokens: str | os.PathLike | None = None) -> None:
    """Load trained weights named by ``config.checkpoint``.

    Args:
        reference: a local file, or ``hub_id:filename``. ``.safetensors`` files are AnyGPT's
            projector format; ``.pt``/``.pth``/``.bin`` files are NExT-GPT's flat state dict,
            checked against the model (every key, every shape) before anything is loaded.
        lora_alpha, lora_r: NExT-GPT's LoRA hyper-parameters (default: a PEFT
            ``adapter_config.json`` next to the file, else NExT-GPT's alpha 32; see
            :func:`anygpt.nextgpt.lora_scale`).
        allow_unexpected: ignore (with a warning) tensors a NExT-GPT checkpoint should not hold.
        added_tokens: NExT-GPT's saved ``added_tokens.json`` (default: one next to the file or in
            its parent folder, else NExT-GPT's published ids; see
            :func:`anygpt.nextgpt.checkpoint_token_ids`).

    Raises:
        WeightsNotFoundError: the file cannot be had, or does not fit the model (the message lists
            what is missing, misshapen or unexpected, or names the token that cannot be mapped).
    """
    path = _fetch(reference, base_dir)
    if path.suffix == ".safetensors":
        fix = "re-download or re-convert it, or check `checkpoint:` in the config that names it"
        _load_projectors(model, read_safetensors(path, what="projector checkpoint", fix=fix), path)
        return
    load_nextgpt_state(model, read_nextgpt_file(path), source=path, folder=path.parent, added_tokens=added_tokens,
                       lora_alpha=lora_alpha, lora_r=lora_r, allow_unexpected=allow_unexpected)
    logger.info("loaded NExT-GPT checkpoint %s", path)


def _fetch(reference: str, base_dir: Path | None) -> Path:
    local = Path(resolve_path(reference, base_dir))
    if local.is_file():
        return local
    if ":" in reference and not local.exists():
        repo, filename = reference.split(":", 1)
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # hub errors vary (offline, missing repo, auth); all mean "not here"
            raise WeightsNotFoundError(
                f"checkpoint {reference!r}: could not download {filename} from {repo} ({exc}); "
                f"download it yourself and set `checkpoint:` to the local file") from exc
    raise WeightsNotFoundError(f"checkpoint {reference!r}: no such file; set `checkpoint:` to a local "
                               f"file or to hub_id:filename")


# NExT-GPT ---------------------------------------------------------------------------------------


def read_nextgpt_file(path: Path) -> dict[str, torch.Tensor]:
    """NExT-GPT's ``pytorch_model.pt``, memory-mapped where the file format allows.

    Raises:
        WeightsNotFoundError: the file is not a flat state dict of tensors.
    """
    state = read_torch_file(path, what="NExT-GPT checkpoint",
                            fix="re-download NExT-GPT's pytorch_model.pt, or check `checkpoint:` in the config")
    if not (isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise WeightsNotFoundError(f"{path}: not a flat state dict of tensors (NExT-GPT's pytorch_model.pt is one)")
    return dict(state)


def load_nextgpt_state(model: "AnyGPTModel", state: Mapping[str, torch.Tensor], *, source: object,
                       folder: Path | None = None, added_tokens: str | os.PathLike | None = None,
                       lora_alpha: float | None = None, lora_r: int | None = None,
                       allow_unexpected: bool = False) -> None:
    """Check NExT-GPT's flat state dict against ``model``, then load it: projectors, the
    embedding and LM-head rows (moved from NExT-GPT's token ids to the model's, by token string)
    and the LoRA factors (merged as ``W + alpha / r · B @ A``).

    Args:
        folder: the checkpoint's folder: where to look for a PEFT ``adapter_config.json`` and
            NExT-GPT's ``added_tokens.json`` (there or in its parent).
        added_tokens, lora_alpha, lora_r, allow_unexpected: as for :func:`load_checkpoint`.
    """
    state = nextgpt.normalise_keys(state)
    ids = nextgpt.checkpoint_token_ids(state, folder, added_tokens)
    lm = model.lm
    added = [lm.config.media_begin, lm.config.media_end] + [t for run in lm.signal_tokens.values() for t in run]
    rows = nextgpt.token_rows(lm.tokenizer.get_vocab(), lm.model.get_input_embeddings().num_embeddings, added, ids)
    layout = nextgpt.layout_for_model(model, rows)
    rank = nextgpt.check_state(state, layout, source=source, allow_unexpected=allow_unexpected)
    scale = nextgpt.lora_scale(rank, alpha=lora_alpha, r=lora_r, folder=folder)
    weights = nextgpt.convert_state(state, layout, rows, scale)
    _load_projectors(model, weights.projectors, source)
    llm = lm.model
    with torch.no_grad():
        llm.get_input_embeddings().weight.copy_(weights.embed_tokens)
        head = llm.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != llm.get_input_embeddings().weight.data_ptr():
            head.weight.copy_(weights.lm_head)
    merge_lora(llm, weights.lora, source=source)


# Checking NExT-GPT's checkpoint before the model is built ----------------------------------------


def check_nextgpt_checkpoint(config: AnyGPTConfig, reference: str, base_dir: Path | None = None, *,
                             added_tokens: str | os.PathLike | None = None, lora_alpha: float | None = None,
                             lora_r: int | None = None,
                             allow_unexpected: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """Fetch and read NExT-GPT's checkpoint ``reference`` and check it against the architecture
    ``config`` describes, before any model weights load (see :func:`check_nextgpt_state`).

    Returns:
        the file and its state dict, for :func:`load_nextgpt_state` once the model is built.

    Raises:
        WeightsNotFoundError: as :func:`load_checkpoint`, but before the LLM loads.
    """
    path = _fetch(reference, base_dir)
    state = read_nextgpt_file(path)
    check_nextgpt_state(config, state, source=path, base_dir=base_dir, folder=path.parent, added_tokens=added_tokens,
                        lora_alpha=lora_alpha, lora_r=lora_r, allow_unexpected=allow_unexpected)
    return path, state


def check_nextgpt_state(config: AnyGPTConfig, state: Mapping[str, torch.Tensor], *, source: object,
                        base_dir: Path | None = None, folder: Path | None = None,
                        added_tokens: str | os.PathLike | None = None, lora_alpha: float | None = None,
                        lora_r: int | None = None, allow_unexpected: bool = False) -> None:
    """The checks of :func:`load_nextgpt_state` (token ids, every key and shape, the LoRA rank),
    made from configs alone (:func:`expected_nextgpt_layout`), so that a bad checkpoint is
    reported in seconds rather than after the LLM has loaded. Nothing is logged: loading logs the
    same choices.

    Args:
        config: the architecture, with the base LLM the checkpoint was trained on.
        state: NExT-GPT's flat state dict (only shapes are read).
        source: names the checkpoint in messages.
        base_dir: the folder ``config``'s relative paths resolve against.
        folder, added_tokens, lora_alpha, lora_r, allow_unexpected: as for :func:`load_nextgpt_state`.

    Raises:
        WeightsNotFoundError: the checkpoint does not fit ``config``, or the LLM's config or
            tokenizer cannot be had.
        ConfigError: ``llm.arch`` is not a valid architecture.
    """
    state = nextgpt.normalise_keys(state)
    ids = nextgpt.checkpoint_token_ids(state, folder, added_tokens, log=False)
    layout, _ = expected_nextgpt_layout(config, base_dir, ids)
    rank = nextgpt.check_state(state, layout, source=source, allow_unexpected=allow_unexpected, log=False)
    nextgpt.lora_scale(rank, alpha=lora_alpha, r=lora_r, folder=folder, log=False)


def expected_nextgpt_layout(config: AnyGPTConfig, base_dir: Path | None = None,
                            ids: Mapping[str, int] | None = None) -> tuple[nextgpt.NextGPTLayout, nextgpt.TokenRows]:
    """The NExT-GPT layout and token rows of the model ``config`` describes, without building it:
    what :func:`anygpt.nextgpt.layout_for_model` and :func:`anygpt.nextgpt.token_rows` give for
    the built model.

    The layout is :func:`anygpt.nextgpt.build_layout`'s, read from modules built on the meta
    device (no memory, no weights): the LLM from its ``config.json`` (or ``llm.arch``), the
    projectors from the config with the encoder's width and the decoders' conditioning shapes.
    The token ids are those the LLM's tokenizer (read, small) gives the config's tokens.

    Args:
        ids: NExT-GPT's token ids (:func:`anygpt.nextgpt.checkpoint_token_ids`; None: the published ones).
    """
    tokenizer = _load_tokenizer(config.llm, base_dir)
    llm = _meta_llm(config.llm, tokenizer, base_dir)
    added = _config_added_tokens(config)
    vocab, num_rows = _vocab_once_added(tokenizer, added, llm.get_input_embeddings().num_embeddings)
    rows = nextgpt.token_rows(vocab, num_rows, added, ids)
    inputs, outputs = _meta_projectors(config, base_dir, llm.get_input_embeddings().embedding_dim)
    return nextgpt.build_layout(llm, inputs, outputs, rows.checkpoint_vocab), rows


def _meta_llm(config: LLMConfig, tokenizer: "PreTrainedTokenizerBase", base_dir: Path | None) -> "PreTrainedModel":
    """The LLM ``config`` names, built on the meta device from its ``config.json`` (or ``arch``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.pretrained is None and config.arch is not None:
        arch = dict(config.arch)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        hf_config = hf_config_for_arch(model_type, arch)
    else:
        source, kwargs = _resolve_source(config, base_dir)
        if not kwargs.get("gguf_file") and os.path.isfile(os.path.join(source, "config.json")):
            check_dims(read_json_config(os.path.join(source, "config.json")), os.path.join(source, "config.json"))
        try:
            hf_config = AutoConfig.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsNotFoundError(
                f"could not read the LLM's config {source!r} ({exc}); download it (unset HF_HUB_OFFLINE), "
                f"or point llm.pretrained at a local directory") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _config_added_tokens(config: AnyGPTConfig) -> list[str]:
    """The tokens :class:`~anygpt.llm.LanguageModel` adds for ``config``, in its order."""
    from anygpt.model import signal_tokens

    runs = [t for run in signal_tokens(config).values() for t in run]
    return [config.llm.media_begin, config.llm.media_end, *runs]


def _vocab_once_added(tokenizer: "PreTrainedTokenizerBase", tokens: list[str],
                      llm_rows: int) -> tuple[dict[str, int], int]:
    """The vocabulary and embedding rows of the LLM once ``tokens`` are added as
    :class:`~anygpt.llm.LanguageModel` adds them (the embeddings grow to the tokenizer, never shrink)."""
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in dict.fromkeys(tokens) if t not in vocab], special_tokens=True)
    return tokenizer.get_vocab(), max(llm_rows, len(tokenizer))


def _meta_projectors(config: AnyGPTConfig, base_dir: Path | None,
                     hidden: int) -> tuple["nn.ModuleDict", "nn.ModuleDict"]:
    """The projectors :meth:`AnyGPTModel.from_config` builds for ``config``, on the meta device."""
    from anygpt.model import build_projectors

    with torch.device("meta"):
        return build_projectors(config, encoder_width(config.encoder, base_dir), hidden, base_dir)


def encoder_width(config: EncoderConfig, base_dir: Path | None = None) -> int:
    """The width of the embeddings the encoder ``config`` describes, read from the config where
    it says (ImageBind's ``out_embed_dim``), else from ImageBind's defaults; an encoder of
    another kind is built to ask it."""
    if config.name != "imagebind":
        from anygpt.encoders import build_encoder

        return int(build_encoder(config, base_dir=base_dir).output_dim)
    if config.pretrained is None:
        arch = config.arch or {}
    else:
        arch = IMAGEBIND_HUGE_ARCH if config.pretrained == IMAGEBIND_HUGE else (config.arch or IMAGEBIND_HUGE_ARCH)
    if "out_embed_dim" not in arch:
        from anygpt.encoders import _resolve_arch, import_imagebind_model

        arch = _resolve_arch(import_imagebind_model().ImageBindModel, arch)
    return int(arch["out_embed_dim"])


def merge_lora(llm: torch.nn.Module, factors: LoraFactors, source: object) -> None:
    """Add ``scale · B @ A`` to the weight of each named module of ``llm`` (as PEFT merges).

    Raises:
        WeightsNotFoundError: a module path is not in the LLM.
    """
    modules = dict(llm.named_modules())
    with torch.no_grad():
        for path, (a, b, scale) in factors.items():
            if path not in modules:
                raise WeightsNotFoundError(f"{source}: LoRA target {path!r} is not in the LLM; was it "
                                           "trained on another LLM?")
            weight = modules[path].weight
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != weight.shape:
                raise WeightsNotFoundError(
                    f"{source}: LoRA factors of {path!r} do not fit the LLM: lora_A has shape "
                    f"{list(a.shape)} and lora_B {list(b.shape)} in the file, the model expects "
                    f"[r, {weight.shape[1]}] and [{weight.shape[0]}, r]; was it trained on another LLM? "
                    f"{_DIRECTORY_FIX[0].upper()}{_DIRECTORY_FIX[1:]}")
            # In float32, as PEFT merges on the CPU: (out, r) @ (r, in) -> (out, in).
            delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * scale
            weight.add_(delta.to(weight.dtype))


def stack_lora(first: LoraFactors, second: LoraFactors) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """One set of factors whose merge equals merging ``first`` then ``second``.

    Where both adapt a module, their ranks are concatenated with the scales folded into A:
    ``s1 B1 A1 + s2 B2 A2 = [B1 B2] @ [s1 A1; s2 A2]`` (scale 1).
    """
    out = dict(first)
    for path, (a, b, scale) in second.items():
        if path not in out:
            out[path] = (a, b, scale)
            continue
        a1, b1, s1 = out[path]
        a_both = torch.cat([a1.float() * s1, a.to(a1.device).float() * scale])  # (r1 + r2, in)
        b_both = torch.cat([b1.float(), b.to(b1.device).float()], dim=1)  # (out, r1 + r2)
        out[path] = (a_both, b_both, 1.0)
    return out


def _lora_state(factors: LoraFactors) -> dict[str, torch.Tensor]:
    state = {}
    for path, (a, b, scale) in factors.items():
        state[f"{path}.lora_A"] = a.detach().cpu().contiguous()
        state[f"{path}.lora_B"] = b.detach().cpu().contiguous()
        state[f"{path}.scale"] = torch.tensor(float(scale), dtype=torch.float64)
    return state


def _lora_factors(state: Mapping[str, torch.Tensor],
                  source: object = "LoRA factors") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    paths = sorted({key.rsplit(".", 1)[0] for key in state})
    for p in paths:
        missing = [f"{p}.{part}" for part in ("lora_A", "lora_B", "scale") if f"{p}.{part}" not in state]
        if missing:
            raise WeightsNotFoundError(f"{source}: LoRA factors: missing tensor(s) {', '.join(map(repr, missing))}; "
                                       f"{_DIRECTORY_FIX}")
        if state[f"{p}.scale"].numel() != 1:
            raise WeightsNotFoundError(f"{source}: LoRA factors: tensor '{p}.scale' has shape "
                                       f"{list(state[f'{p}.scale'].shape)} in the file, the model expects a scalar; "
                                       f"{_DIRECTORY_FIX}")
    return {p: (state[f"{p}.lora_A"], state[f"{p}.lora_B"], float(state[f"{p}.scale"])) for p in paths}

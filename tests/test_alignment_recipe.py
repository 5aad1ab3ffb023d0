"""The alignment recipe: configs, the three stages on the tiny preset, resume, DDP, CLI.

Everything runs offline on CPU with the `tiny` preset and the procedural synthetic dataset.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anygpt.errors import ConfigError

from anygpt.alignment.config import CONFIG_DIR, TrainConfig, load_train_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
STAGE_FILES = {1: "stage1_encoding", 2: "stage2_decoding", 3: "stage3_instruction"}
logger = logging.getLogger(__name__)


# Fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from anygpt.alignment.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=96, num_val=24, seed=0)


def _config(stage: int, output: Path, data: dict[str, Path], *overrides: str) -> TrainConfig:
    kind = "captions" if stage in (1, 2) else "dialogues"
    base = ["model=tiny", f"output_dir={output}", "log.progress_bar=false", "eval.every=0",
            "checkpoint.every=0", f"data.train={data[kind + '_train']}", f"data.val={data[kind + '_val']}"]
    if stage == 3:
        base.append(f"data.decoding_train={data['captions_train']}")
    return load_train_config(CONFIG_DIR / f"{STAGE_FILES[stage]}.yaml", [*base, *overrides])


def _tiny():
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(directory: Path):
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _signal_ids(model) -> torch.Tensor:
    return torch.tensor(sorted(i for run in model.lm.signal_ids.values() for i in run))


# Configs ----------------------------------------------------------------------------------------


def test_three_shipped_stage_configs_validate():
    configs = {load_train_config(path).stage: load_train_config(path) for path in shipped_configs()}
    assert sorted(configs) == [1, 2, 3]
    s1, s2, s3 = configs[1], configs[2], configs[3]
    assert s1.trainable.input_projectors == "all" and not s1.trainable.output_projectors
    assert not (s1.trainable.signal_embeddings or s1.trainable.lora)
    assert s2.trainable.output_projectors == "all" and s2.trainable.signal_embeddings
    assert not s2.trainable.input_projectors and s2.trainable.lora is None and s2.loss.condition_mse > 0
    assert s3.trainable.lora is not None and s3.trainable.lora.r == 32
    assert s3.trainable.input_projectors == "all" and s3.trainable.output_projectors == "all"
    assert json.loads((CONFIG_DIR / "deepspeed_zero2.json").read_text())["zero_optimization"]["stage"] == 2


def test_overrides_are_dotted_and_parsed_as_yaml():
    config = load_train_config(CONFIG_DIR / "stage2_decoding.yaml",
                               ["optim.lr=1e-3", "train.max_steps=7", "data.modalities=[image]", "data.val=null",
                                "trainable.lora={r: 4}"])
    assert config.optim.lr == 1e-3 and config.train.max_steps == 7
    assert config.data.modalities == ["image"] and config.data.val is None
    assert config.trainable.lora.r == 4 and config.trainable.lora.alpha == 32.0


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "config.optim: unknown field(s) lrr; valid fields:"),
    ("train.batch_size=abc", "config.train.batch_size: expected an integer"),
    ("schedule.name=step", "config.schedule.name: must be one of constant, linear, cosine"),
    ("optim.group_lr={bias: 1.0}", "config.optim.group_lr: unknown group(s)"),
    ("trainable.output_projectors=[image, smell]", None),
    ("lr", "expected key=value"),
])
def test_bad_configs_say_what_and_how(override, message, tmp_path):
    if message is None:  # a modality the model lacks is caught when the model is known
        from anygpt.alignment.trainable import configure_trainable

        config = load_train_config(CONFIG_DIR / "stage2_decoding.yaml", [override])
        with pytest.raises(ConfigError, match="no projector for .'smell'.; valid"):
            configure_trainable(_tiny().model, config.trainable)
        return
    with pytest.raises(ConfigError) as info:
        load_train_config(CONFIG_DIR / "stage2_decoding.yaml", [override])
    assert message in str(info.value)


def test_missing_config_file_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="stage1_encoding.yaml"):
        load_train_config(tmp_path / "nope.yaml")


# Stage 2: decoding-side alignment ---------------------------------------------------------------


@pytest.fixture(scope="module")
def plot_calls() -> list[tuple[int, dict[str, bytes]]]:
    """(last logged step, {file name: PNG bytes}) of each time the stage-2 run drew its plots."""
    return []


@pytest.fixture(scope="module")
def stage2(data, tmp_path_factory, plot_calls):
    """Train stage 2 once (with weight decay on, to show it never touches frozen rows) while
    counting text-encoder calls and recording the plots it draws (``plot_calls``); returns
    (result, before metrics, encode_text calls, steps)."""
    from anygpt.alignment.evaluate import conditioning_report
    from anygpt.alignment.data import read_manifest
    from anygpt.alignment.plots import RunPlots
    from anygpt.alignment.recipe import train
    from anygpt.decoders.base import Decoder

    before = conditioning_report(_tiny(), read_manifest(data["captions_val"]), decode=0)
    calls = []
    original = Decoder.encode_text

    def counting(self, captions):
        calls.append(len(captions))
        return original(self, captions)

    write = RunPlots.write

    def recording(self):
        written = write(self)
        plot_calls.append((max(self.history.series("train/loss")[0], default=0),
                           {p.name: p.read_bytes() for p in written}))
        return written

    steps = 100
    config = _config(2, tmp_path_factory.mktemp("stage2"), data, f"train.max_steps={steps}", "optim.lr=1e-2",
                     "optim.group_lr={}", "optim.weight_decay=0.1", "eval.every=50", "checkpoint.every=50")
    Decoder.encode_text, RunPlots.write = counting, recording
    try:
        result = train(config)
    finally:
        Decoder.encode_text, RunPlots.write = original, write
    return result, before, calls, steps


@pytest.mark.slow
def test_stage2_aligns_held_out_conditioning(stage2, data):
    from anygpt.alignment.data import read_manifest
    from anygpt.alignment.evaluate import conditioning_report

    result, before, _, _ = stage2
    after = conditioning_report(_load(result.model_dir), read_manifest(data["captions_val"]), decode=1)
    for modality in ("image", "audio", "video"):
        logger.warning("stage 2 held-out cosine/%s: %.3f -> %.3f (mse %.4f -> %.4f)", modality,
                       before[f"cosine/{modality}"], after[f"cosine/{modality}"],
                       before[f"mse/{modality}"], after[f"mse/{modality}"])
        assert before[f"cosine/{modality}"] < 0.5
        assert after[f"cosine/{modality}"] > 0.9
        assert after[f"mse/{modality}"] < before[f"mse/{modality}"]
        assert f"decode_cosine/{modality}" in after
    # the training run's own periodic evaluation agrees with the standalone one
    assert result.metrics["eval/condition_cosine/image"] == pytest.approx(after["cosine/image"], abs=1e-4)


@pytest.mark.slow
def test_stage2_changes_only_output_projectors_and_signal_rows(stage2):
    result, _, _, _ = stage2
    before, after = _tiny().model, _load(result.model_dir).model
    assert not _changed(before.encoder.state_dict(), after.encoder.state_dict())
    assert not _changed(before.input_projectors.state_dict(), after.input_projectors.state_dict())
    assert _changed(before.output_projectors.state_dict(), after.output_projectors.state_dict())
    llm_before, llm_after = before.lm.model.state_dict(), after.lm.model.state_dict()
    matrices = {"model.embed_tokens.weight", "lm_head.weight"}
    assert _changed(llm_before, llm_after) <= matrices
    signal = _signal_ids(after)
    frozen = torch.ones(llm_before["lm_head.weight"].shape[0], dtype=torch.bool)
    frozen[signal] = False
    for name in matrices:
        assert torch.equal(llm_before[name][frozen], llm_after[name][frozen]), f"{name}: a frozen row moved"
        assert not torch.equal(llm_before[name][signal], llm_after[name][signal]), f"{name}: signal rows did not train"


@pytest.mark.slow
def test_stage2_never_encodes_text_per_step(stage2):
    result, _, calls, steps = stage2
    # every caption was encoded once into the cache before training, not once per step
    assert 0 < len(calls) <= 6 < steps
    assert sum(calls) == len(set(_all_captions(result.model_dir.parent)))


def _all_captions(output_dir: Path) -> list[str]:
    """Every indexed caption of the run's target cache, prefixed by its decoder's name."""
    captions = []
    for index in (output_dir / "targets").glob("*/index.jsonl"):
        prefix = index.parent.name.split('-')[0]
        captions += [f"{prefix}:{json.loads(line)['caption']}" for line in index.read_text().splitlines()]
    return captions


def test_a_trained_stage_writes_a_model_card_with_its_data_and_evaluation(stage2, data):
    result, _, _, steps = stage2
    card = (result.model_dir / "README.md").read_text()
    assert card.startswith("---\npipeline_tag: any-to-any\n")
    assert "| recipe stage | " not in card and "- recipe stage: 2" in card
    assert f"- steps: {steps}" in card and data["captions_train"].name in card
    for name, value in result.metrics.items():
        assert f"| {name} | {value:.4g} |" in card
    assert "| decoder/image | stable-diffusion |" in card


@pytest.mark.slow
def test_stage2_writes_checkpoints_logs_and_config(stage2):
    result, _, _, _ = stage2
    output = result.model_dir.parent
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-00000050", "checkpoint-00000100"]
    files = {p.name for p in (output / "checkpoints" / "checkpoint-00000100").iterdir()}
    assert {"trainable.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "train_state.json", "train_config.yaml"} <= files
    assert "model.safetensors" not in files  # only trainable tensors, never the frozen model
    rows = (output / "logs" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,metric,value,time"
    assert any(",eval/condition_cosine/image," in row for row in rows)
    assert load_train_config(output / "train_config.yaml").stage == 2


def test_each_checkpoint_draws_the_loss_and_eval_plots(stage2, plot_calls):
    from PIL import Image

    from anygpt.alignment.plots import EVAL_PLOT, LOSS_PLOT

    output = stage2[0].model_dir.parent
    drawn = dict(plot_calls)  # checkpoints at steps 50 and 100, then the end of the run
    assert {50, 100} <= drawn.keys()
    for step in (50, 100):
        assert set(drawn[step]) == {LOSS_PLOT, EVAL_PLOT}
        assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in drawn[step].values())
    assert drawn[50][LOSS_PLOT] != drawn[100][LOSS_PLOT]  # redrawn with the new steps
    for name in (LOSS_PLOT, EVAL_PLOT):
        with Image.open(output / name) as image:
            image.verify()
    assert not list(output.glob(".*.tmp"))  # written atomically: no temporary file left


def test_tensorboard_events_hold_the_logged_scalars(stage2):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = stage2[0].model_dir.parent
    run = output / "logs" / "alignment"  # accelerate's TensorBoardTracker: <logging_dir>/<project name>
    assert list(run.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run))
    events.Reload()
    assert {"train/loss", "eval/condition_cosine/image"} <= set(events.Tags()["scalars"])
    logged = {int(step): float(value) for step, metric, value, _ in
              (row.split(",") for row in (output / "logs" / "metrics.csv").read_text().splitlines()[1:])
              if metric == "train/loss"}
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars.keys() == logged.keys() == set(range(10, 101, 10))
    assert scalars == pytest.approx(logged, rel=1e-5)  # the CSV keeps six significant digits


def test_stage2_denoising_loss_trains_the_image_projector(data, tmp_path):
    from anygpt.alignment.recipe import train

    config = _config(2, tmp_path, data, "train.max_steps=3", "train.batch_size=4", "loss.lm=0",
                     "loss.condition_mse=0", "loss.denoising=1", "data.val=null",
                     "log.every=1")
    result = train(config)
    rows = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "train/denoising/image" in rows
    before, after = _tiny().model.output_projectors, _load(result.model_dir).model.output_projectors
    assert _changed(before["image"].state_dict(), after["image"].state_dict())
    assert not _changed(before["audio"].state_dict(), after["audio"].state_dict())


def test_stage2_denoising_loss_trains_the_audio_and_video_projectors(data, tmp_path):
    """Each decoder turns its own media into training samples (mel spectrograms, frame stacks);
    the denoising loss trains only the chosen modalities' projectors and signal rows."""
    from anygpt.alignment.recipe import train

    config = _config(2, tmp_path, data, "train.max_steps=3", "train.batch_size=6", "loss.lm=0",
                     "loss.condition_mse=0", "loss.denoising=1", "loss.denoising_modalities=[audio, video]",
                     "data.val=null", "log.every=1", "optim.lr=1e-2")
    result = train(config)
    rows = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "train/denoising/audio" in rows and "train/denoising/video" in rows
    assert "train/denoising/image" not in rows
    before, after = _tiny().model, _load(result.model_dir).model
    for modality in ("audio", "video"):
        assert _changed(before.output_projectors[modality].state_dict(), after.output_projectors[modality].state_dict())
    assert not _changed(before.output_projectors["image"].state_dict(), after.output_projectors["image"].state_dict())
    assert not _changed(before.encoder.state_dict(), after.encoder.state_dict())
    assert not _changed(before.input_projectors.state_dict(), after.input_projectors.state_dict())
    llm_before, llm_after = before.lm.model.state_dict(), after.lm.model.state_dict()
    frozen = torch.ones(llm_before["lm_head.weight"].shape[0], dtype=torch.bool)
    frozen[_signal_ids(after)] = False
    assert _changed(llm_before, llm_after) <= {"model.embed_tokens.weight", "lm_head.weight"}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(llm_before[name][frozen], llm_after[name][frozen]), f"{name}: a frozen row moved"


def test_denoising_media_targets_come_from_each_decoders_training_sample(data):
    from PIL import Image

    from anygpt.alignment.data import read_manifest
    from anygpt.alignment.objective import MediaTargets
    from anygpt.modalities import get_modality

    pipe = _tiny()
    decoders = {m: pipe.decoder(m) for m in ("image", "audio", "video")}
    rows = read_manifest(data["captions_val"])
    targets = MediaTargets(rows, decoders)
    shapes = {"image": (3, 64, 64), "audio": (1, 100, 16), "video": (3, 4, 64, 64)}
    for modality, decoder in decoders.items():
        row = next(r for r in rows if r.media.get(modality))
        assert targets.has(modality, row.caption)
        assert not targets.has(modality, "a caption nobody wrote")
        batch = targets.get(modality, [row.caption, row.caption], torch.device("cpu"))
        assert batch.shape == (2, *shapes[modality]) and batch.dtype == torch.float32
        value = get_modality(modality).load(row.media[modality][0])
        assert torch.equal(batch[0], decoder.training_sample(value))
    # images are the bicubic resize in [-1, 1] that stage 2 has always used
    row = next(r for r in rows if r.media.get("image"))
    with Image.open(row.media["image"][0]) as image:
        pixels = np.asarray(image.convert("RGB").resize((64, 64), Image.BICUBIC))
    expected = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(targets.get("image", [row.caption], torch.device("cpu"))[0], expected)


def test_denoising_modalities_are_checked_against_the_registry():
    config = load_train_config(CONFIG_DIR / "stage2_decoding.yaml", ["loss.denoising_modalities=[audio, video]"])
    assert config.loss.denoising_modalities == ["audio", "video"]
    with pytest.raises(ConfigError, match="denoising_modalities: unknown modality name.*smell; valid: image, audio"):
        load_train_config(CONFIG_DIR / "stage2_decoding.yaml", ["loss.denoising_modalities=[smell]"])


# Stage 1: encoding-side alignment ---------------------------------------------------------------


@pytest.mark.slow
def test_stage1_lowers_held_out_caption_loss_and_trains_only_input_projectors(data, tmp_path):
    from anygpt.alignment.data import read_manifest
    from anygpt.alignment.evaluate import caption_loss
    from anygpt.alignment.recipe import train

    val = read_manifest(data["captions_val"])
    start = _tiny()
    before = caption_loss(start, val)
    result = train(_config(1, tmp_path, data, "train.max_steps=100", "optim.lr=1e-2"))
    trained = _load(result.model_dir)
    after = caption_loss(trained, val)
    logger.warning("stage 1 held-out caption loss: %.4f -> %.4f", before, after)
    assert after < before - 0.005
    assert not _changed(start.model.lm.model.state_dict(), trained.model.lm.model.state_dict())
    assert not _changed(start.model.output_projectors.state_dict(), trained.model.output_projectors.state_dict())
    assert _changed(start.model.input_projectors.state_dict(), trained.model.input_projectors.state_dict())


# Stage 3: instruction tuning ---------------------------------------------------------------------


@pytest.mark.slow
def test_stage3_emits_the_requested_signal_run(data, tmp_path):
    from anygpt.alignment.evaluate import signal_emission_report
    from anygpt.alignment.data import read_manifest
    from anygpt.alignment.recipe import train

    dialogues = read_manifest(data["dialogues_val"])
    before = signal_emission_report(_tiny(), dialogues)
    # On the random tiny LLM, mixing in caption→run examples teaches "description, then a run"
    # and costs precision; the dialogues alone are the cleaner signal for this check.
    config = _config(3, tmp_path, data, "train.max_steps=400", "optim.lr=1e-2", "data.decoding_train=null",
                     "trainable.lora={r: 16, alpha: 16, dropout: 0.0, target_modules: "
                     "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}")
    result = train(config)
    trained = _load(result.model_dir)
    after = signal_emission_report(trained, dialogues)
    logger.warning("stage 3 unforced signal-run rate on %d held-out requests: %.2f -> %.2f (spurious %.2f)",
                   after["requests"], before["emission_rate"], after["emission_rate"], after.get("spurious_rate", 0))
    assert after["emission_rate"] >= 0.9
    # LoRA is merged: the saved LLM has no adapter weights, and untargeted weights are unchanged
    llm_before, llm_after = _tiny().model.lm.model.state_dict(), trained.model.lm.model.state_dict()
    assert llm_before.keys() == llm_after.keys()
    changed = _changed(llm_before, llm_after)
    assert any("q_proj" in k for k in changed) and not any("norm" in k for k in changed)


def _projector_objective(pipe, rows, tmp_path, **trainable):
    from anygpt.alignment.config import LossConfig, TrainableConfig
    from anygpt.alignment.objective import AlignmentObjective, ConditionTargets
    from anygpt.alignment.targets import TargetCache
    from anygpt.alignment.trainable import configure_trainable

    model = pipe.model
    chosen = configure_trainable(model, TrainableConfig(**{"input_projectors": [], "output_projectors": "all",
                                                          "signal_embeddings": False, "lora": None, **trainable}))
    cache, ids = TargetCache(tmp_path / "targets"), {}
    for modality in model.output_projectors:
        decoder = pipe.decoder(modality)
        cache.build(decoder, sorted({r.caption for r in rows}))
        ids[modality] = TargetCache.decoder_id(decoder)
    return AlignmentObjective(model, LossConfig(lm=0.0, condition_mse=1.0), targets=ConditionTargets(cache, ids),
                              extra=chosen.modules)


def _loss_and_grads(objective, batch):
    objective.zero_grad()
    loss = objective(**batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


def test_projector_only_training_computes_each_examples_signal_states_once(data, tmp_path):
    """With everything upstream of the output projectors frozen, later epochs run the projectors
    alone, and give exactly the loss and gradients of the full forward pass."""
    from anygpt.alignment.data import AlignmentDataset, collate, read_manifest
    from anygpt.alignment.recipe import _pad_id

    pipe = _tiny()
    rows = read_manifest(data["captions_train"])[:6]
    objective = _projector_objective(pipe, rows, tmp_path)
    dataset = AlignmentDataset(rows, 2, pipe.model)
    batch = collate([dataset[i] for i in range(len(dataset))], pad_id=_pad_id(pipe.model))
    calls = []
    pipe.model.lm.model.register_forward_hook(lambda *args: calls.append(1))
    objective.eval()  # evaluation always runs the whole model
    full_loss, full_grads = _loss_and_grads(objective, batch)
    objective.train()
    first = _loss_and_grads(objective, batch)
    assert len(calls) == 2
    second = _loss_and_grads(objective, batch)
    assert len(calls) == 2  # no LLM pass: the states were kept
    assert full_grads and full_grads.keys() == first[1].keys() == second[1].keys()
    for loss, grads in (first, second):
        torch.testing.assert_close(loss, full_loss)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, full_grads[name], msg=name)
    # Trainable signal rows change the states: every step runs the LLM again.
    pipe = _tiny()
    objective = _projector_objective(pipe, rows, tmp_path / "rows", signal_embeddings=True).train()
    calls.clear()
    pipe.model.lm.model.register_forward_hook(lambda *args: calls.append(1))
    _loss_and_grads(objective, batch), _loss_and_grads(objective, batch)
    assert len(calls) == 2


@pytest.mark.slow
def test_lora_on_a_referenced_llm_is_saved_as_factors(stage2, data, tmp_path, monkeypatch):
    """Stage 3 from a model directory whose LLM is referenced by path (like a hub LLM or the mini
    preset's packaged LLM): the new directory keeps the LLM's weights as they were (hard-linked
    from the earlier stage, not rewritten merged) and stores only the LoRA factors, which reload
    into exactly the merged weights the training run ended with."""
    from safetensors.torch import load_file

    from anygpt.alignment import recipe
    from anygpt.checkpoint import LLM_LORA_FILE

    start = stage2[0].model_dir
    config = _config(3, tmp_path, data, f"model={start}", "train.max_steps=2", "train.batch_size=4",
                     "data.val=null", "optim.lr=1e-2", "trainable.lora.r=4")
    merged, original = {}, recipe.save_model

    def keep_merged(pipe, *args, **kwargs):
        out = original(pipe, *args, **kwargs)
        merged.update({k: v.clone() for k, v in pipe.model.lm.model.state_dict().items()})
        return out

    monkeypatch.setattr(recipe, "save_model", keep_merged)
    result = recipe.train(config)
    saved = result.model_dir
    assert (saved / "llm" / "model.safetensors").stat().st_ino == (start / "llm" / "model.safetensors").stat().st_ino
    factors = load_file(str(saved / LLM_LORA_FILE))
    assert {k.rsplit(".", 1)[1] for k in factors} == {"lora_A", "lora_B", "scale"}
    assert any("q_proj" in k for k in factors)
    before, after = _load(start).model.lm.model.state_dict(), _load(saved).model.lm.model.state_dict()
    assert any("q_proj" in k for k in _changed(before, after))
    for key, value in merged.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6, msg=key)

    # A later run without LoRA (the miniature's projector fit) keeps the merged LoRA it started from.
    fit = _config(3, tmp_path / "fit", data, f"model={saved}", "train.max_steps=2", "train.batch_size=4",
                  "data.val=null", "trainable.input_projectors=[]", "trainable.signal_embeddings=false",
                  "trainable.lora=null", "loss.lm=0.0")
    refit = _load(recipe.train(fit).model_dir).model
    assert (Path(fit.output_dir) / "model" / LLM_LORA_FILE).is_file()
    for key, value in refit.lm.model.state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=1e-6, msg=key)


# Resume ------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_is_exact(data, tmp_path, monkeypatch):
    """8 steps straight == 4 steps, interrupt, --resume 4 more: bitwise-equal weights. Stage 3
    exercises every piece of state: LoRA dropout (RNG), gradient accumulation, warmup + cosine
    schedule, AdamW moments, a mid-epoch data position and a mixed dataset."""
    from anygpt.alignment.checkpointing import Checkpointer
    from anygpt.alignment.recipe import train

    overrides = ["train.max_steps=8", "train.batch_size=4", "train.grad_accum=2", "checkpoint.every=2",
                 "schedule.warmup_steps=3", "data.val=null", "optim.lr=1e-3", "trainable.lora.r=4"]
    straight = train(_config(3, tmp_path / "straight", data, *overrides))

    save = Checkpointer.save

    def save_then_die(self, state):
        path = save(self, state)
        if state.step == 4:
            raise _Interrupted
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(_Interrupted):
        train(_config(3, tmp_path / "resumed", data, *overrides))
    monkeypatch.setattr(Checkpointer, "save", save)
    assert not (tmp_path / "resumed" / "model").exists()
    resumed = train(_config(3, tmp_path / "resumed", data, *overrides), resume=True)

    a, b = _load(straight.model_dir).model.state_dict(), _load(resumed.model_dir).model.state_dict()
    assert not _changed(a, b)
    assert _changed(_tiny().model.state_dict(), a)  # and training did change something


def test_resume_without_checkpoint_says_how_to_fix(data, tmp_path):
    from anygpt.alignment.checkpointing import latest_checkpoint
    from anygpt.alignment.recipe import train

    with pytest.raises(ConfigError, match=r"--resume: no checkpoint under .*checkpoints; train without "
                                          r"--resume first, or set checkpoint\.every"):
        train(_config(1, tmp_path / "run", data, "train.max_steps=2", "data.val=null"), resume=True)

    assert latest_checkpoint(tmp_path) is None
    (tmp_path / ".tmp-checkpoint-00000009").mkdir()  # an interrupted save is never picked
    done = tmp_path / "checkpoint-00000003"
    done.mkdir()
    (done / "train_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == done


# Distributed and CLI -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_cpu_run_trains_and_checkpoints(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "anygpt.cli", "train", "--config", str(CONFIG_DIR / "stage2_decoding.yaml"),
               "model=tiny", f"output_dir={out}", f"data.train={data['captions_train']}",
               f"data.val={data['captions_val']}", "train.max_steps=6", "train.batch_size=4",
               "checkpoint.every=3", "eval.every=3", "log.progress_bar=false"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checkpoint = out / "checkpoints" / "checkpoint-00000006"
    assert json.loads((checkpoint / "train_state.json").read_text())["num_processes"] == 2
    assert (checkpoint / "random_states_1.pkl").is_file()
    assert "trained 6 steps" in done.stdout
    _load(out / "model")


@pytest.mark.slow
def test_cli_eval_prints_metrics(stage2, data, tmp_path, capsys):
    from anygpt.cli import main

    result, _, _, _ = stage2
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(result.model_dir), "--data", str(data["captions_val"]),
                 "--decode", "1", "--max-examples", "6", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    written = json.loads(out.read_text())
    assert {"caption_loss", "cosine/image", "mse/image", "decode_mse/image"} <= written.keys()
    assert lines[0].split() == ["metric", "value"] and lines[-1] == f"wrote {out}"
    assert [line.split() for line in lines[1:-1]] == [[k, f"{written[k]:.4g}"] for k in sorted(written)]


def test_cli_eval_loads_the_model_with_the_model_arguments(stage2, data, monkeypatch, capsys):
    """--dtype (like --device and --gpu-memory) applies to `anygpt eval` as to every other command."""
    from anygpt.alignment import evaluate as evaluate_module
    from anygpt.cli import main

    seen = {}

    def fake(pipe, manifest, **kwargs):
        seen["dtype"] = pipe.model.lm.dtype
        return {"caption_loss": 1.0}

    monkeypatch.setattr(evaluate_module, "evaluate", fake)
    assert main(["eval", "--model", str(stage2[0].model_dir), "--data", str(data["captions_val"]),
                 "--dtype", "bfloat16"]) == 0
    assert seen["dtype"] == torch.bfloat16
    assert "caption_loss  1" in capsys.readouterr().out


def test_cli_train_reports_config_errors(tmp_path, capsys):
    from anygpt.cli import main

    assert main(["train", "--config", str(CONFIG_DIR / "stage1_encoding.yaml"), "optim.lr=-1"]) == 2
    assert "config.optim.lr: must be > 0" in capsys.readouterr().err


def test_target_cache_layout_comes_from_the_data_config(data, tmp_path):
    from safetensors import safe_open

    from anygpt.alignment.recipe import train

    config = _config(2, tmp_path / "run", data, "train.max_steps=1", "train.batch_size=2", "data.val=null",
                     "data.target_shard_size=7", "data.target_dtype=bfloat16")
    train(config)
    shards = sorted((tmp_path / "run" / "targets").rglob("*.safetensors"))
    assert len(shards) > 1
    rows = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            tensor = handle.get_tensor("targets")
        assert tensor.dtype == torch.bfloat16 and tensor.shape[0] <= 7
        rows += tensor.shape[0]
    assert rows == len(_all_captions(tmp_path / "run"))


@pytest.mark.parametrize("override, message", [("data.target_shard_size=0", "data.target_shard_size"),
                                               ("data.target_dtype=int8", "data.target_dtype")])
def test_bad_target_cache_layout_is_refused(override, message, data, tmp_path):
    from anygpt.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _config(2, tmp_path, data, override)


def _deepspeed_on_cuda() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _deepspeed_on_cuda(), reason="DeepSpeed ZeRO-2 needs CUDA and the `deepspeed` extra "
                    "(accelerate ignores DeepSpeed on CPU)")
def test_deepspeed_zero2_trains_checkpoints_and_resumes(data, tmp_path):
    """The shipped ZeRO-2 launch config, on one GPU: stage 2 trains, checkpoints, and resumes."""
    out = tmp_path / "zero2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(CONFIG_DIR / "accelerate_deepspeed_zero2.yaml"), "--num_processes", "1",
              "-m", "anygpt.cli", "train", "--config", str(CONFIG_DIR / "stage2_decoding.yaml"),
              "model=tiny", f"output_dir={out}", f"data.train={data['captions_train']}", "data.val=null",
              "train.max_steps=4", "train.batch_size=4", "train.mixed_precision=bf16", "checkpoint.every=2",
              "checkpoint.keep=2", "log.progress_bar=false"]
    middle = out / "checkpoints" / "checkpoint-00000002"
    for extra in ([], ["--resume-from", str(middle)]):
        # cwd: the launch config names its DeepSpeed JSON relative to the repository root
        done = subprocess.run([*launch, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "trained 4 steps" in done.stdout and middle.is_dir()
    _load(out / "model")

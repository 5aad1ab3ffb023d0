"""Evaluation of an aligned model on held-out data (``anygpt eval --model DIR --data MANIFEST``).

* Caption rows:
  - ``caption_loss``: LM loss of the caption given the media (the stage-1 task);
  - per output modality, ``cosine/<m>`` and ``mse/<m>`` between the conditioning projected from
    the signal run (teacher-forced "caption + run") and the decoder's own text conditioning of
    the caption, and ``decode_mse/<m>`` / ``decode_cosine/<m>`` between media decoded from
    each with the same seed (pixels, samples or frames scaled to [0, 1] / [-1, 1]).
* Conversation rows:
  - ``dialogue_loss``: LM loss of the assistant's turns;
  - ``emission_rate`` (and per modality): how often the final answer to a request for a
    modality contains that modality's signal run *unforced* under greedy decoding;
    ``spurious_rate``: how often an answer that should have none starts one.
* With ``metrics``: real-data metrics of media generated from the captions (FID, CLIP score,
  FAD, CLAP score, CLIPSIM; see :mod:`anygpt.alignment.metrics`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anygpt.alignment.data import AlignmentDataset, Sample, read_manifest
from anygpt.alignment.metrics import media_metrics
from anygpt.alignment.objective import captioned_signal_states, conditioning_metrics

if TYPE_CHECKING:
    from anygpt.pipeline import AnyGPTPipeline

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "caption_loss", "conditioning_report", "signal_emission_report", "media_array"]


def evaluate(model: "str | Path | AnyGPTPipeline", manifest: str | Path, *, decode: int = 2, seed: int = 0,
             batch_size: int = 16, max_examples: int | None = None, metrics: Sequence[str] = (),
             extractors: Mapping[str, Any] | None = None, max_new_tokens: int | None = None) -> dict[str, float]:
    """All metrics that apply to ``manifest``'s rows (see the module docstring).

    Args:
        model: a model directory, preset name, or a loaded pipeline.
        manifest: a JSONL manifest of caption rows and/or conversation rows.
        decode: examples per output modality decoded for the media-agreement metrics (0: none).
        seed: decoding seed (the same for both conditionings).
        batch_size: teacher-forced batch size (and prompts generated at once for ``metrics``).
        max_examples: evaluate at most this many rows of each kind.
        metrics: real-data metrics to add, names from :data:`anygpt.alignment.metrics.METRICS`
            (``fid``, ``clip``, ``fad``, ``clap``, ``clipsim``): media generated from the captions
            against the real files and the captions.
        extractors: their feature extractors, ``{"clip": ..., "clap": ...}``: an object, a hub id
            or a folder (see :func:`anygpt.alignment.metrics.load_extractor`).
        max_new_tokens: the LLM's budget per answer when generating for ``metrics``.
    """
    pipe = _pipeline(model)
    samples = read_manifest(manifest)
    captions = [s for s in samples if s.caption is not None][:max_examples]
    dialogues = [s for s in samples if s.turns is not None][:max_examples]
    report: dict[str, float] = {}
    if captions and _has_media_for(pipe, captions, pipe.model.input_projectors):
        report["caption_loss"] = caption_loss(pipe, captions, stage=1, batch_size=batch_size)
    if captions and _has_media_for(pipe, captions, pipe.model.output_projectors):
        report.update(conditioning_report(pipe, captions, decode=decode, seed=seed, batch_size=batch_size))
    if dialogues:
        report["dialogue_loss"] = caption_loss(pipe, dialogues, stage=3, batch_size=batch_size)
        report.update(signal_emission_report(pipe, dialogues))
    if metrics:
        report.update(media_metrics(pipe, captions, metrics, extractors=extractors, seed=seed,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens))
    return report


def _pipeline(model: "str | Path | AnyGPTPipeline") -> "AnyGPTPipeline":
    from anygpt.pipeline import AnyGPTPipeline

    if isinstance(model, AnyGPTPipeline):
        return model
    pipe = AnyGPTPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _has_media_for(pipe: "AnyGPTPipeline", samples: Sequence[Sample], modules: Any) -> bool:
    return any(m in modules for s in samples for m in s.media)


def _batches(dataset: AlignmentDataset, pipe: "AnyGPTPipeline", batch_size: int):
    from accelerate.utils import send_to_device

    from anygpt.alignment.recipe import eval_loader

    for batch in eval_loader(dataset, pipe.model, batch_size):
        yield send_to_device(batch, pipe.device)


@torch.no_grad()
def caption_loss(pipe: "AnyGPTPipeline", samples: Sequence[Sample], stage: int = 1, batch_size: int = 16) -> float:
    """Mean LM loss per answer token of the stage's examples built from ``samples``."""
    model = pipe.model.eval()
    dataset = AlignmentDataset(samples, stage, model)
    total, tokens = 0.0, 0
    for batch in _batches(dataset, pipe, batch_size):
        out = model(batch["input_ids"], batch["attention_mask"], batch["media_mask"], batch["media"],
                    labels=batch["labels"])
        count = int((batch["labels"][:, 1:] != -100).sum())
        total, tokens = total + float(out.loss) * count, tokens + count
    return total / max(tokens, 1)


@torch.no_grad()
def conditioning_report(pipe: "AnyGPTPipeline", samples: Sequence[Sample], *, decode: int = 2, seed: int = 0,
                        batch_size: int = 16) -> dict[str, float]:
    """Projected vs native conditioning per output modality, and decoded-media agreement."""
    model = pipe.model.eval()
    dataset = AlignmentDataset(samples, 2, model)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for batch in _batches(dataset, pipe, batch_size):
        out = model(batch["input_ids"], batch["attention_mask"], batch["media_mask"], batch["media"])
        for modality in model.output_projectors:
            states, captions = captioned_signal_states(model, out.hidden_states, batch["input_ids"], modality,
                                                       batch["captions"], batch["output_modalities"])
            if states is None:
                continue
            predicted = model.project_signals(modality, states)
            native = pipe.decoder(modality).encode_text(captions).float().to(predicted.device)
            mse, cosine = conditioning_metrics(predicted, native)
            sums[f"mse/{modality}"] += float(mse) * len(captions)
            sums[f"cosine/{modality}"] += float(cosine) * len(captions)
            counts[modality] += len(captions)
            room = max(0, decode - len(pairs[modality]))
            pairs[modality].extend(zip(predicted[:room], native[:room]))
    metrics = {k: v / counts[k.split("/", 1)[1]] for k, v in sums.items()}
    for modality, items in pairs.items():
        if items:
            metrics.update(_decode_agreement(pipe, modality, items, seed))
    return metrics


def _decode_agreement(pipe: "AnyGPTPipeline", modality: str, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                      seed: int) -> dict[str, float]:
    """Mean MSE and cosine between media decoded from the projected and native conditionings."""
    decoder = pipe.decoder(modality)
    mses, cosines = [], []
    for predicted, native in pairs:
        a = media_array(decoder.decode(predicted[None], seed=seed)[0])
        b = media_array(decoder.decode(native[None], seed=seed)[0])
        n = min(a.size, b.size)
        a, b = torch.from_numpy(a.reshape(-1)[:n]), torch.from_numpy(b.reshape(-1)[:n])
        mses.append(float(F.mse_loss(a, b)))
        cosines.append(float(F.cosine_similarity(a - a.mean(), b - b.mean(), dim=0)))
    return {f"decode_mse/{modality}": float(np.mean(mses)), f"decode_cosine/{modality}": float(np.mean(cosines))}


def media_array(value: Any) -> np.ndarray:
    """A decoded media value as float32: images and video frames in [0, 1], audio as samples."""
    if hasattr(value, "waveform"):
        return np.asarray(value.waveform, dtype=np.float32)
    if hasattr(value, "frames"):
        return np.asarray(value.frames, dtype=np.float32) / 255.0
    return np.asarray(value.convert("RGB"), dtype=np.float32) / 255.0


@torch.no_grad()
def signal_emission_report(pipe: "AnyGPTPipeline", samples: Sequence[Sample],
                           extra_tokens: int = 16) -> dict[str, float]:
    """Greedy-decode each dialogue's final answer from its prompt; count unforced signal runs.

    An answer "requests" a modality when its reference text holds that modality's run. Up to
    twice the reference answer's length plus ``extra_tokens`` tokens are generated.
    """
    model = pipe.model.eval()
    dataset = AlignmentDataset(samples, 3, model)
    requests, hits = defaultdict(int), defaultdict(int)
    plain, spurious = 0, 0
    for index in range(len(dataset)):
        item = dataset[index]
        start, end = _last_answer_span(item["labels"])
        expected = _modalities_in(model, item["labels"][start:end])
        # room for a longer answer than the reference before the run (another phrasing is fine)
        produced = _greedy_runs(pipe, item, start, max_new_tokens=2 * (end - start) + extra_tokens)
        for modality in expected:
            requests[modality] += 1
            hits[modality] += modality in produced
        if not expected:
            plain += 1
            spurious += bool(produced)
    total = sum(requests.values())
    metrics = {"emission_rate": sum(hits.values()) / total if total else float("nan"),
               "requests": float(total)}
    metrics.update({f"emission_rate/{m}": hits[m] / n for m, n in requests.items()})
    if plain:
        metrics["spurious_rate"] = spurious / plain
    return metrics


def _last_answer_span(labels: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the last run of labelled positions (the final assistant answer)."""
    positions = (labels != -100).nonzero(as_tuple=True)[0].tolist()
    end = positions[-1] + 1
    start = end - 1
    while start - 1 in positions:
        start -= 1
    return start, end


def _modalities_in(model: Any, ids: torch.Tensor) -> set[str]:
    present = set(ids.tolist())
    return {m for m, run in model.lm.signal_ids.items() if run[0] in present}


def _greedy_runs(pipe: "AnyGPTPipeline", item: dict, start: int, max_new_tokens: int) -> set[str]:
    """Modalities of the signal runs the LLM begins by itself, greedy, after ``input_ids[:start]``."""
    from anygpt.generation import SamplingSettings, generate

    model = pipe.model
    ids = item["input_ids"][:start]
    embeds = model.embed_inputs(ids[None], item["media_mask"][:start][None], item["media"])
    values = {**asdict(pipe.config.generation), "do_sample": False, "max_new_tokens": max_new_tokens, "seed": 0}
    result = generate(model.lm, embeds, ids, SamplingSettings(**values))
    return {run.modality for run in result.runs if not run.forced}

"""The world evaluator: how well a model draws, sings, films and understands the world.

:func:`evaluate_world` measures five things on any pipeline whose modalities are the world's:

* ``decoders``: each decoder alone, conditioned on its own text encoding of a caption — the
  attribute accuracy of what it generates;
* ``forced``: the whole system asked with *held-out* request phrasings, the medium forced
  (``outputs=(m,)``) — the same accuracies;
* ``auto``: the same requests without forcing — the share that produce the requested medium —
  and plain questions — the share that produce no medium;
* ``understanding``: world media attached with held-out questions — the share of answers that
  name the item's attributes (and no other value of them);
* ``chat``: a few fixed general questions with known answers.

With ``metrics``, the real-data metrics of :mod:`anygpt.alignment.metrics` (FID, CLIP score,
FAD, CLAP score, CLIPSIM) are reported beside them: the whole system's forced answers to a
request for every world item, against one rendering of each item and its caption, with the
model's own encoder as the feature extractor by default (no CLIP or CLAP knows this world).

Generated media are judged by :mod:`.detect`, which knows only the world's spec. A detection
below its confidence threshold counts as wrong, so noise cannot score by chance.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from .detect import detect_media
from .phrasing import PLAIN_QUESTIONS, QUESTIONS, REQUESTS
from .render import render_item
from .spec import ITEM_TYPES, MODALITIES, Item, all_items

if TYPE_CHECKING:
    from anygpt.pipeline import AnyGPTPipeline

logger = logging.getLogger(__name__)

__all__ = ["WorldReport", "evaluate_world", "CHAT_CHECKS", "BARS", "named_attributes"]

#: Fixed general questions and a pattern the answer must contain.
CHAT_CHECKS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", r"\bparis\b"),
    ("What is two plus two?", r"\b(four|4)\b"),
    ("What colour is the sky on a clear day?", r"\bblue\b"),
)

#: The issue's bars: section → "modality/attribute" (or a share) → the least acceptable rate.
BARS: dict[str, dict[str, float]] = {
    "decoders": {"image/colour": 0.95, "image/shape": 0.90, "audio/pitch": 0.95, "audio/waveform": 0.85,
                 "video/direction": 0.95},
    "forced": {"image/colour": 0.90, "image/shape": 0.80, "audio/pitch": 0.90, "audio/waveform": 0.70,
               "video/direction": 0.90},
    "auto": {"requests_give_the_medium": 0.90, "plain_questions_give_none": 0.90},
    "understanding": {"image/colour": 0.80, "image/shape": 0.80, "audio/pitch": 0.80, "video/direction": 0.80},
    "chat": {"correct": 1.0},
}


@dataclass
class _Tally:
    hits: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.hits += int(ok)
        self.total += 1

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else float("nan")


@dataclass
class WorldReport:
    """What :func:`evaluate_world` measured.

    Attributes:
        rates: section → key (``image/colour``, ``requests_give_the_medium``, …) → rate in [0, 1].
        counts: the same keys → how many cases the rate is over.
        samples: section → modality → generated media values kept for contact sheets (the
            ``decoders`` and ``forced`` sections), with their captions in ``captions``.
        captions: section → modality → the caption of each kept sample.
        answers: ``(prompt, answer text)`` of the understanding and chat cases, for reading.
        metrics: real-data metrics, ``fid/image`` … → value (with ``metrics=``).
    """

    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    samples: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    captions: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    answers: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def passes(self) -> dict[str, dict[str, bool]]:
        """Section → key → whether the measured rate reaches :data:`BARS` (measured keys only)."""
        return {section: {key: self.rates[section][key] >= bar for key, bar in bars.items()
                          if key in self.rates.get(section, {})}
                for section, bars in BARS.items()}

    def table(self) -> str:
        """A plain-text table: section, key, rate, cases and the bar."""
        lines = [f"{'section':<14}{'measure':<28}{'rate':>7}{'cases':>7}{'bar':>7}"]
        for section, rates in self.rates.items():
            for key, rate in rates.items():
                bar = BARS.get(section, {}).get(key)
                mark = "" if bar is None else f"{bar:>6.0%}{' ok' if rate >= bar else ' --'}"
                lines.append(f"{section:<14}{key:<28}{rate:>7.1%}{self.counts[section][key]:>7}{mark:>10}")
        lines += [f"{'metrics':<14}{key:<28}{value:>7.4g}" for key, value in self.metrics.items()]
        return "\n".join(lines)

    def _store(self, section: str, tallies: dict[str, _Tally]) -> None:
        self.rates[section] = {k: t.rate for k, t in tallies.items()}
        self.counts[section] = {k: t.total for k, t in tallies.items()}

    def _keep(self, section: str, modality: str, value: Any, caption: str) -> None:
        self.samples.setdefault(section, {}).setdefault(modality, []).append(value)
        self.captions.setdefault(section, {}).setdefault(modality, []).append(caption)


def evaluate_world(pipe: "AnyGPTPipeline", *, seed: int = 0, cases: int = 18, max_new_tokens: int = 48,
                   decode_batch: int = 16, sections: Sequence[str] = tuple(BARS),
                   metrics: Sequence[str] = (), extractors: Mapping[str, Any] | None = None,
                   progress: bool = True) -> WorldReport:
    """Measure ``pipe`` on the world (see the module docstring).

    Args:
        pipe: a pipeline whose output and input modalities are (some of) the world's.
        seed: seeds the items drawn, the media rendered and every generation.
        cases: prompts per modality in the ``forced``, ``auto`` and ``understanding`` sections.
        max_new_tokens: the LLM's budget per answer.
        decode_batch: captions decoded at once in the ``decoders`` section.
        sections: which of ``decoders``, ``forced``, ``auto``, ``understanding``, ``chat`` to run.
        metrics: real-data metrics to add (names of :data:`anygpt.alignment.metrics.METRICS`).
        extractors: their feature extractors by kind (``clip``, ``clap``; see
            :func:`anygpt.alignment.metrics.media_metrics`); default the model's own encoder.
        progress: show a progress bar per section.

    Returns:
        The :class:`WorldReport`.
    """
    unknown = sorted(set(sections) - set(BARS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; valid: {', '.join(BARS)}")
    report = WorldReport()
    outputs = [m for m in pipe.config.output_modalities if m in MODALITIES]
    inputs = [m for m in pipe.config.input_modalities if m in MODALITIES]
    settings = {"max_new_tokens": max_new_tokens}
    runs = {
        "decoders": lambda: _decoders_alone(pipe, outputs, report, seed, decode_batch, progress),
        "forced": lambda: _requests(pipe, outputs, report, seed, cases, settings, progress, forced=True),
        "auto": lambda: _requests(pipe, outputs, report, seed, cases, settings, progress, forced=False),
        "understanding": lambda: _understanding(pipe, inputs, report, seed, cases, settings, progress),
        "chat": lambda: _chat(pipe, report, seed, settings),
    }
    for section in sections:
        logger.info("world evaluation: %s", section)
        runs[section]()
    if metrics:
        logger.info("world evaluation: metrics %s", ", ".join(metrics))
        report.metrics = _media_metrics(pipe, metrics, extractors, seed, max_new_tokens)
    return report


# Sections ---------------------------------------------------------------------------------


def _score(modality: str, item: Item, value: Any, tallies: dict[str, _Tally]) -> None:
    """Tally each attribute of ``item`` against the detections of ``value``."""
    detections = detect_media(modality, value)
    for name, expected in item.attributes().items():
        if name in detections:
            tallies.setdefault(f"{modality}/{name}", _Tally()).add(detections[name].value == expected)


def _decoders_alone(pipe, outputs, report, seed, batch, progress) -> None:
    tallies: dict[str, _Tally] = {}
    for modality in outputs:
        decoder = pipe.decoder(modality)
        items = all_items(modality)
        for start in _bar(range(0, len(items), batch), f"decoders/{modality}", progress):
            chunk = items[start:start + batch]
            captions = [item.caption() for item in chunk]
            values = decoder.decode(decoder.encode_text(captions), seed=seed + start)
            for item, caption, value in zip(chunk, captions, values):
                _score(modality, item, value, tallies)
                report._keep("decoders", modality, value, caption)
    report._store("decoders", tallies)


def _prompts(modality: str, seed: int, cases: int) -> Iterator[tuple[Item, str]]:
    """``cases`` (item, held-out request) pairs, items drawn without replacement where possible."""
    rng = np.random.default_rng([seed, MODALITIES.index(modality)])
    items = all_items(modality)
    order = rng.permutation(len(items))
    templates = REQUESTS[modality].held_out
    for i in range(cases):
        item = items[order[i % len(items)]]
        yield item, templates[i % len(templates)].format(caption=item.caption())


def _requests(pipe, outputs, report, seed, cases, settings, progress, *, forced: bool) -> None:
    tallies: dict[str, _Tally] = {}
    section = "forced" if forced else "auto"
    for modality in outputs:
        for i, (item, prompt) in enumerate(_bar(list(_prompts(modality, seed, cases)), f"{section}/{modality}",
                                               progress)):
            out = pipe(prompt, outputs=(modality,) if forced else (), seed=seed + i, **settings)
            made = out.media(modality)
            if forced:
                _score(modality, item, made[0], tallies)
                report._keep(section, modality, made[0], item.caption())
            else:
                tallies.setdefault("requests_give_the_medium", _Tally()).add(bool(made))
    if not forced:
        questions = PLAIN_QUESTIONS.held_out + PLAIN_QUESTIONS.train
        for i, question in enumerate(_bar(questions, "auto/plain", progress)):
            out = pipe(question, seed=seed + i, **settings)
            tallies.setdefault("plain_questions_give_none", _Tally()).add(not out.media())
    report._store(section, tallies)


def named_attributes(text: str, modality: str) -> dict[str, str | None]:
    """Attribute → the one value of it that ``text`` names (None if it names none or several)."""
    words = text.lower()
    found = {}
    for name, values in ITEM_TYPES[modality].VALUES.items():
        named = [v for v in values if re.search(rf"\b{re.escape(v)}\b", words)]
        found[name] = named[0] if len(named) == 1 else None
    return found


def _understanding(pipe, inputs, report, seed, cases, settings, progress) -> None:
    tallies: dict[str, _Tally] = {}
    for modality in inputs:
        plural = _plural(modality)
        rng = np.random.default_rng([seed, 7, MODALITIES.index(modality)])
        questions = QUESTIONS[modality].held_out
        for i, (item, _) in enumerate(_bar(list(_prompts(modality, seed + 1, cases)), f"understanding/{modality}",
                                           progress)):
            value = render_item(item, rng)
            question = questions[i % len(questions)]
            answer = pipe(question, seed=seed + i, **{plural: [_loaded(modality, value)]}, **settings).text
            report.answers.append((f"{question} [{item.caption()}]", answer))
            named = named_attributes(answer, modality)
            for name, expected in item.attributes().items():
                tallies.setdefault(f"{modality}/{name}", _Tally()).add(named[name] == expected)
    report._store("understanding", tallies)


def _chat(pipe, report, seed, settings) -> None:
    tally = _Tally()
    for i, (question, pattern) in enumerate(CHAT_CHECKS):
        answer = pipe(question, seed=seed + i, **settings).text
        report.answers.append((question, answer))
        tally.add(re.search(pattern, answer.lower()) is not None)
    report._store("chat", {"correct": tally})


def _media_metrics(pipe, metrics, extractors, seed, max_new_tokens) -> dict[str, float]:
    """Every world item of each scored modality, rendered once into a temporary manifest's files,
    then :func:`~anygpt.alignment.metrics.media_metrics` on it."""
    import tempfile
    from pathlib import Path

    from anygpt.alignment.data import Sample
    from anygpt.alignment.metrics import METRICS, OWN_ENCODER, media_metrics
    from anygpt.modalities import get_modality

    modalities = dict.fromkeys(METRICS[name].modality for name in metrics if name in METRICS)
    with tempfile.TemporaryDirectory(prefix="anygpt-world-") as folder:
        samples = []
        for modality in modalities:
            spec, rng = get_modality(modality), np.random.default_rng([seed, 11, MODALITIES.index(modality)])
            for item in all_items(modality):
                path = Path(folder) / f"{len(samples):04d}{spec.output_suffix}"
                spec.write(render_item(item, rng), path)
                samples.append(Sample(line=len(samples) + 1, media={modality: [path]}, caption=item.caption()))
        chosen = {"clip": OWN_ENCODER, "clap": OWN_ENCODER, **{k: v for k, v in (extractors or {}).items() if v}}
        return media_metrics(pipe, samples, metrics, extractors=chosen, seed=seed, max_new_tokens=max_new_tokens)


# Helpers ----------------------------------------------------------------------------------


def _plural(modality: str) -> str:
    from anygpt.modalities import get_modality

    return get_modality(modality).plural


def _loaded(modality: str, value: Any) -> Any:
    """A rendered value as the pipeline takes it (images as PIL)."""
    if modality == "image":
        from PIL import Image

        return Image.fromarray(value)
    return value


def _bar(iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False)

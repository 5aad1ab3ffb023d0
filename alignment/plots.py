"""Pictures of a training run: ``loss.png`` and ``eval.png`` in the run folder.

The recipe redraws both at every checkpoint and at the end of a run (``log.plots``), from the
metrics it logged (:class:`MetricHistory`; a resumed run starts from ``logs/metrics.csv``):

* ``loss.png``: the training loss (``train/loss``) against the optimizer step, and the
  validation loss (``eval/loss``) when the run evaluates;
* ``eval.png``: one panel per evaluation metric (``eval/*``), only when there is one.

They are drawn with matplotlib's Agg backend (``pip install 'anygpt[train]'``), through its
object-oriented API (no ``pyplot`` state), and written atomically: a hidden temporary file in
the run folder renamed over the old picture, so a viewer never sees half a PNG. Plotting never
stops training: a failure is logged as a warning that names the file and the problem.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["MetricHistory", "RunPlots", "draw_plots", "LOSS_PLOT", "EVAL_PLOT"]

LOSS_PLOT = "loss.png"
EVAL_PLOT = "eval.png"
_TRAIN_LOSS, _EVAL_LOSS, _EVAL = "train/loss", "eval/loss", "eval/"
_INSTALL = "pip install 'anygpt[train]'"


class MetricHistory:
    """Every logged value of every metric, by optimizer step.

    A step logged twice keeps its last value, so a resumed run that replays steps after its
    checkpoint (and appends them to ``metrics.csv`` again) draws each step once.
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[int, float]] = {}

    def add(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` (metric → number) at ``step``; values that are not numbers are skipped."""
        for name, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            self.values.setdefault(name, {})[int(step)] = number

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """The steps and values of ``name``, in step order (empty lists if it was never logged)."""
        points = sorted(self.values.get(name, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    def names(self, prefix: str = "") -> list[str]:
        """The metrics logged so far whose name starts with ``prefix``, sorted."""
        return sorted(n for n in self.values if n.startswith(prefix))

    def __len__(self) -> int:
        return sum(map(len, self.values.values()))

    @classmethod
    def from_csv(cls, path: str | os.PathLike, up_to: int | None = None) -> "MetricHistory":
        """The history in a ``metrics.csv`` (:class:`~anygpt.alignment.tracking.CSVTracker`'s
        ``step,metric,value,time`` rows), keeping steps ``<= up_to`` when given (resuming from a
        checkpoint at that step). A missing file gives an empty history; malformed rows are
        skipped."""
        history = cls()
        path = Path(path)
        if not path.is_file():
            return history
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    step, name, value = int(row["step"]), row["metric"], float(row["value"])
                except (KeyError, TypeError, ValueError):
                    continue
                if up_to is None or step <= up_to:
                    history.add({name: value}, step)
        return history


def draw_plots(history: MetricHistory, folder: str | os.PathLike) -> list[Path]:
    """Write ``loss.png`` (when a training loss was logged) and ``eval.png`` (when an evaluation
    metric was) into ``folder``, atomically; returns the files written.

    Raises:
        ImportError: matplotlib is not installed.
        OSError: a file cannot be written (the old picture, if any, stays as it was).
    """
    from matplotlib.figure import Figure  # noqa: F401  (fails early, before any drawing)

    folder = Path(folder)
    written = []
    for name, draw in ((LOSS_PLOT, _draw_loss), (EVAL_PLOT, _draw_eval)):
        figure = draw(history)
        if figure is not None:
            _save_atomic(figure, folder / name)
            written.append(folder / name)
    return written


class RunPlots:
    """The pictures of one run: :meth:`write` redraws them from :attr:`history` and never raises.

    Args:
        folder: the run folder (``output_dir``).
        history: the metrics so far (a resumed run passes :meth:`MetricHistory.from_csv`).
    """

    def __init__(self, folder: str | os.PathLike, history: MetricHistory | None = None):
        self.folder = Path(folder)
        self.history = history if history is not None else MetricHistory()
        self._missing_warned = False
        self._drawn: tuple[int, list[Path]] | None = None  # (history size, files) of the last draw

    def write(self) -> list[Path]:
        """Redraw ``loss.png`` and ``eval.png``; returns the files written (when nothing was
        logged since the last call, the files it wrote, without drawing them again).

        A failure is logged as a warning naming the file and the problem, and training goes on:
        a missing matplotlib once per run (with the command that installs it), any other
        failure every time it happens.
        """
        size = len(self.history)
        if self._drawn is not None and self._drawn[0] == size:
            return self._drawn[1]
        try:
            written = draw_plots(self.history, self.folder)
            self._drawn = (size, written)
            return written
        except ImportError as exc:
            if not self._missing_warned:
                self._missing_warned = True
                logger.warning("not drawing %s: matplotlib is not installed (%s); %s to get the plots "
                               "(training goes on, metrics are still logged)", self.folder / LOSS_PLOT, exc, _INSTALL)
        except Exception as exc:  # a plot must never end a training run
            logger.warning("could not write the training plots %s / %s: %s: %s (training goes on; the "
                           "previous plots, if any, are unchanged)", self.folder / LOSS_PLOT, EVAL_PLOT,
                           type(exc).__name__, exc)
        return []


# Drawing ------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _draw_loss(history: MetricHistory) -> "Figure | None":
    steps, values = history.series(_TRAIN_LOSS)
    if not steps:
        return None
    figure = _figure(7.0, 4.0)
    axes = figure.subplots()
    axes.plot(steps, values, label="training loss", color="tab:blue", linewidth=1.5)
    eval_steps, eval_values = history.series(_EVAL_LOSS)
    if eval_steps:
        axes.plot(eval_steps, eval_values, label="validation loss", color="tab:orange", marker="o",
                  markersize=4, linewidth=1.5)
    _log_scale_if_wide(axes, values + eval_values)
    _integer_steps(axes)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def _draw_eval(history: MetricHistory) -> "Figure | None":
    names = history.names(_EVAL)
    if not names:
        return None
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure = _figure(3.6 * columns, 2.8 * rows)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, name in zip(panels, names):
        steps, values = history.series(name)
        axes.plot(steps, values, color="tab:orange", marker="o", markersize=3, linewidth=1.2)
        axes.set_title(name.removeprefix(_EVAL), fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        _integer_steps(axes)
        axes.tick_params(labelsize=8)
        axes.grid(True, alpha=0.3)
    for axes in panels[len(names):]:
        axes.set_visible(False)
    figure.suptitle("evaluation on data.val")
    return figure


def _log_scale_if_wide(axes, values: list[float]) -> None:
    """A log y axis when positive values span more than 20×: early losses would flatten the rest."""
    from matplotlib.ticker import FuncFormatter

    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.3, not 3×10⁻¹
        axes.yaxis.set_minor_formatter(FuncFormatter(_minor_label))


def _minor_label(value: float, _position: object = None) -> str:
    """Minor ticks of a log axis labelled at 2× and 5× a power of ten only (legible, not crowded)."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (2, 5)) else ""


def _integer_steps(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save_atomic(figure: "Figure", path: Path) -> None:
    """Write ``figure`` as a PNG to a hidden temporary file beside ``path``, then rename it over
    ``path``; the temporary file is removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format="png")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a picture is for everyone who can see the run
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

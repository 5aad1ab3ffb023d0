"""Metric trackers for ``accelerate``: a CSV file always, TensorBoard when it is installed."""

from __future__ import annotations

import csv
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from accelerate.tracking import GeneralTracker

logger = logging.getLogger(__name__)

__all__ = ["CSVTracker", "build_trackers", "METRICS_FILE"]

METRICS_FILE = "metrics.csv"


class CSVTracker(GeneralTracker):
    """Appends ``step,metric,value,time`` rows to ``<logging_dir>/metrics.csv`` (main process).

    The long format keeps one file valid whatever metrics each row logs (training and
    evaluation log different keys), and a resumed run simply appends.
    """

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():
            self.path.write_text("step,metric,value,time\n")

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        """Hyperparameters live in ``train_config.yaml``; nothing to do here."""

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        now = f"{time.time():.3f}"
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            for key, value in values.items():
                writer.writerow([step if step is not None else "", key, f"{float(value):.6g}", now])


def tensorboard_available() -> bool:
    """Whether accelerate's TensorBoard tracker can run (``tensorboard`` or ``tensorboardX``)."""
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def build_trackers(names: Sequence[str], logging_dir: Path) -> list:
    """Trackers for ``accelerate.Accelerator(log_with=...)``; TensorBoard is skipped (with a log
    message) when neither ``tensorboard`` nor ``tensorboardX`` is installed."""
    trackers: list = []
    for name in names:
        if name == "csv":
            trackers.append(CSVTracker("alignment", logging_dir))
        elif name == "tensorboard":
            if tensorboard_available():
                trackers.append("tensorboard")
            else:
                logger.info("tensorboard is not installed: metrics go to %s only "
                            "(pip install 'anygpt[train]' to get TensorBoard logs)", logging_dir / METRICS_FILE)
    return trackers

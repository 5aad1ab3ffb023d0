"""The run's pictures (alignment/plots.py): history, atomic PNG writes, and failures that warn.

No training here (tests/test_alignment_recipe.py checks the plots and TensorBoard events of a
real run); each test draws from a hand-made history in well under a second.
"""

from __future__ import annotations

import logging
import sys

from PIL import Image

from anygpt.alignment.plots import EVAL_PLOT, LOSS_PLOT, MetricHistory, RunPlots, draw_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(eval_metrics: bool = True) -> MetricHistory:
    history = MetricHistory()
    for step in range(1, 21):
        history.add({"train/loss": 5.0 / step, "lr/output_projectors": 1e-3}, step)
        if eval_metrics and step % 5 == 0:
            history.add({"eval/loss": 4.0 / step, "eval/condition_cosine/image": step / 20}, step)
    return history


def assert_png(path) -> None:
    """``path`` is a complete, decodable PNG."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_draws_loss_and_eval_plots_atomically(tmp_path):
    written = draw_plots(_history(), tmp_path)
    assert written == [tmp_path / LOSS_PLOT, tmp_path / EVAL_PLOT]
    for path in written:
        assert_png(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [EVAL_PLOT, LOSS_PLOT]  # no temporary file left


def test_no_eval_plot_without_eval_metrics(tmp_path):
    assert draw_plots(_history(eval_metrics=False), tmp_path) == [tmp_path / LOSS_PLOT]
    assert draw_plots(MetricHistory(), tmp_path / "none") == []


def test_history_from_csv_keeps_the_last_value_of_a_replayed_step(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,metric,value,time\n1,train/loss,3,0\n2,train/loss,2,0\n3,train/loss,9,0\n"
                   "not-a-step,train/loss,1,0\n2,train/loss,2.5,0\n2,eval/loss,1.5,0\n")
    history = MetricHistory.from_csv(csv, up_to=2)
    assert history.series("train/loss") == ([1, 2], [3.0, 2.5])
    assert history.names("eval/") == ["eval/loss"]
    assert len(MetricHistory.from_csv(tmp_path / "missing.csv")) == 0


def test_a_failed_write_warns_naming_the_file_and_keeps_the_old_picture(tmp_path, monkeypatch, caplog):
    from matplotlib.figure import Figure

    plots = RunPlots(tmp_path, _history())
    assert plots.write()
    before = (tmp_path / LOSS_PLOT).read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    plots.history.add({"train/loss": 0.1}, 21)
    with caplog.at_level(logging.WARNING, logger="anygpt.alignment.plots"):
        assert plots.write() == []
    message = caplog.text
    assert str(tmp_path / LOSS_PLOT) in message and "No space left on device" in message
    assert "training goes on" in message
    assert (tmp_path / LOSS_PLOT).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [EVAL_PLOT, LOSS_PLOT]


def test_without_matplotlib_the_run_warns_once_and_says_how_to_install_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    plots = RunPlots(tmp_path, _history())
    with caplog.at_level(logging.WARNING, logger="anygpt.alignment.plots"):
        assert plots.write() == []
        plots.history.add({"train/loss": 0.1}, 21)
        assert plots.write() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install 'anygpt[train]'" in warnings[0].getMessage()
    assert not list(tmp_path.iterdir())


def test_plots_and_trackers_are_log_options_of_the_stage_configs():
    from anygpt.alignment.config import LogConfig, TrainConfig, load_train_config, shipped_configs

    config = TrainConfig.from_dict({"data": {"train": "x.jsonl"}, "trainable": {"input_projectors": "all"},
                                    "log": {"trackers": ["csv"], "plots": False}})
    assert config.log.plots is False and config.log.trackers == ["csv"]
    assert LogConfig().plots is True
    for path in shipped_configs():
        log = load_train_config(path).log
        assert log.plots and log.trackers == ["csv", "tensorboard"], path

"""The ``logger`` group (csv, tensorboard, wandb) and Lightning's ``ThroughputMonitor`` figures in a run's logs
(docs/runs.md, "Logs")."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
from torch import nn

from cdlm.config import compose
from tests.runs import TINY, fit, refused

FAST = ("trainer.max_steps=4", "trainer.precision=32-true")
RATES = (
    "train/device/batches_per_sec",
    "train/device/samples_per_sec",
    "train/device/items_per_sec",
    "train/device/flops_per_sec",
)


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "logs" / "version_0" / "metrics.csv").open()))


def test_csv_is_the_default_logger():
    cfg = compose(TINY)
    assert cfg.logger._target_ == "lightning.pytorch.loggers.CSVLogger" and cfg.choices.logger == "csv"


def test_throughput_monitor_figures_are_in_metrics_csv(tmp_path):
    module, trainer, _ = fit(tmp_path, *FAST)
    rows = metrics_rows(tmp_path)
    assert any(r.get("train/loss") for r in rows)  # the module's own logs are still there
    figures = [r for r in rows if r.get("train/device/items_per_sec")]
    assert len(figures) == 3  # a window of 2 batches (log_every_n_steps=1): every step after the first
    objective = module.objective
    linears = {id(m.weight): m.weight.numel() for m in objective.modules() if isinstance(m, nn.Linear)}
    seq_len, rows_per_batch = 32, 8
    per_token = 6 * sum(linears.values()) + 12 * objective.backbone.depth * seq_len * objective.backbone.width
    for row in figures:
        rates = {key: float(row[key]) for key in RATES}
        assert all(value > 0 for value in rates.values()), rates
        batches = rates["train/device/batches_per_sec"]
        assert math.isclose(rates["train/device/samples_per_sec"], rows_per_batch * batches, rel_tol=1e-9)
        assert math.isclose(rates["train/device/items_per_sec"], rows_per_batch * seq_len * batches, rel_tol=1e-9)
        assert math.isclose(rates["train/device/flops_per_sec"], per_token * rates["train/device/items_per_sec"])
    last = figures[-1]
    assert int(last["train/batches"]) == 4 and int(last["train/samples"]) == 4 * rows_per_batch
    assert int(last["train/lengths"]) == 4 * rows_per_batch * seq_len
    assert "train/device/mfu" not in rows[0]  # a CPU: Lightning knows no peak FLOP/s for it


def test_tensorboard_logger_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path, *FAST, "logger=tensorboard")
    log_dir = tmp_path / "logs" / "version_0"
    assert list(log_dir.glob("events.out.tfevents.*"))
    tags = EventAccumulator(str(log_dir)).Reload().Tags()["scalars"]
    assert "train/loss" in tags and "train/device/items_per_sec" in tags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "logs"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["logger.save_dir=/tmp/cdlm_escaped"], "logger.save_dir is set by cdlm itself"),
        (["logger.name=../escaped"], "logger.name is set by cdlm itself"),
        (["logger.version=../../escaped"], "logger.version is set by cdlm itself"),
        (["logger=tensorboard", "logger.save_dir=/tmp/cdlm_escaped"], "logger.save_dir is set by cdlm itself"),
        (["logger=tensorboard", "logger.sub_dir=../../escaped"], "must be a plain file name"),
        (["logger=wandb", "logger.dir=/tmp/cdlm_escaped"], "logger.dir is set by cdlm itself"),
        (["logger=wandb", "logger.id=../../escaped"], "must be a plain file name"),
        (["logger.bogus=1"], "unknown config key 'logger.bogus'"),
        (["logger=mlflow"], "no logger config named 'mlflow'; available: ['csv', 'tensorboard', 'wandb']"),
    ],
)
def test_logger_settings_that_would_move_logs_are_refused(tmp_path, capsys, overrides, message):
    err = refused(["train", *TINY, f"run_dir={tmp_path / 'run'}", *overrides], capsys)
    assert message in err
    assert not (tmp_path / "run").exists() and not Path("/tmp/cdlm_escaped").exists()


@pytest.mark.parametrize("choice, modules", [("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))])
def test_a_missing_logger_package_fails_before_anything_is_written(tmp_path, capsys, monkeypatch, choice, modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec finds nothing
    run_dir = tmp_path / "run"
    err = refused(["train", *TINY, *FAST, f"run_dir={run_dir}", f"logger={choice}"], capsys)
    assert f"cdlm: error: logger={choice} needs the {choice} package: pip install 'cdlm[{choice}]'" in err
    assert not run_dir.exists()

"""Helpers for tests that train tiny models end to end through the real config and CLI path."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from cdlm.cli import main
from cdlm.config import compose
from cdlm.training import prepare

TINY = [
    "model=tiny",
    "data=shakespeare_char",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.max_val_tokens=2048",
    "trainer.max_steps=12",
    "trainer.val_check_interval=1000",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_train_steps=4",
    "module.warmup_steps=2",
    "ema.decay=0.9",
]


# ``python driver.py CRASH train.py-options...``: trains like ``cdlm train``, killed (exit status 3) at step CRASH > 0
CRASH_DRIVER = """
import sys
import lightning as L
from cdlm import cli, training

class CrashAt(L.Callback):  # a killed run: every rank stops at the same step
    def __init__(self, step):
        self.step = step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SystemExit(3)

crash = int(sys.argv[1])
build = training.build_trainer
if crash:
    training.build_trainer = lambda cfg, run_dir: (lambda t: (t.callbacks.append(CrashAt(crash)), t)[1])(
        build(cfg, run_dir)
    )
cli.main(["train", *sys.argv[2:]])
"""


class LossRecorder(L.Callback):
    """Keeps ``{global_step: loss}`` of every optimizer step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class CrashAt(L.Callback):
    """Simulates a killed run: raises when ``global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def fit(run_dir: Path, *overrides: str, callbacks: tuple = ()):
    """Train with the tiny config plus ``overrides``; returns (module, trainer, datamodule)."""
    cfg = compose([*TINY, f"run_dir={run_dir}", *overrides])
    run = prepare(cfg)
    run.trainer.callbacks.extend(callbacks)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    return run.module, run.trainer, run.datamodule


def refused(args: list[str], capsys) -> str:
    """Run ``cdlm ARGS``; assert exit status 2, a ``cdlm: error:`` line and no traceback; return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "cdlm: error:" in err and "Traceback" not in err
    return err


def prompted_bounds(module, datamodule) -> tuple[float, float]:
    """A conditionally trained continuous run's bound of the second half of its first validation batch's rows given
    the first half (``conditional_nll``), and its unconditional bound of the same rows, nats/token, each with the
    same noise."""
    batch = next(iter(datamodule.val_dataloader()))
    fixed = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    fixed[:, : fixed.shape[1] // 2] = True
    with torch.no_grad(), module.seeded(-1, 0):
        given_half = module.objective.conditional_nll(batch, fixed)
    with torch.no_grad(), module.seeded(-1, 0):
        alone = module.objective.nll(batch)
    return float(given_half.nll.sum() / given_half.mask.sum()), float(alone.nll.sum() / alone.mask.sum())

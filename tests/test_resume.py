"""Exact resume: a run killed after a checkpoint and resumed with ``resume=auto`` reproduces the uninterrupted run's
per-step losses bit for bit, across epoch boundaries, in one process and under 2-process gloo DDP."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.runs import TINY, CrashAt, LossRecorder, fit

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "masked": ["objective=masked"],
    "bitstream": [
        "objective=bitstream",
        "sampler=euler",
        "objective.schedule.warmup_batches=3",
        "objective.schedule.refresh_every=2",
    ],
}
STEPS, EVERY = 13, 4  # checkpoints at steps 4, 8, 12; a kill at step 10 resumes from step 8


def small_corpus(path: Path) -> Path:
    """A corpus of 32 training rows of 32 characters: 4 steps of batch 8 per epoch (2 per rank under 2 processes
    of batch 4), so 13 steps cross three epoch boundaries."""
    words = "the quick brown fox jumps over a lazy dog and then runs far away from here".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(240))
    path.write_text(text[:1100], encoding="utf-8")
    return path


def overrides(tmp_path: Path, objective: str) -> list[str]:
    corpus = small_corpus(tmp_path / "corpus.txt")
    return [
        *OBJECTIVES[objective],
        f"data.source={corpus}",
        "data.val_fraction=0.05",
        f"trainer.max_steps={STEPS}",
        f"checkpoint.every_n_train_steps={EVERY}",
        "checkpoint.save_top_k=-1",
    ]


@pytest.mark.parametrize("objective, accumulate", [("bitstream", 1), ("masked", 1), ("masked", 2)])
def test_resume_after_a_crash_is_exact_across_epochs(tmp_path, objective, accumulate):
    args = [*overrides(tmp_path, objective), f"trainer.accumulate_grad_batches={accumulate}"]
    full = LossRecorder()
    _, trainer, datamodule = fit(tmp_path / "full", *args, callbacks=(full,))
    assert len(datamodule.train_dataloader()) == 4 and trainer.current_epoch >= 3  # three epoch boundaries crossed
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "killed", *args, callbacks=(CrashAt(10),))
    resumed = LossRecorder()
    fit(tmp_path / "killed", *args, "resume=auto", callbacks=(resumed,))
    first = 9 if accumulate == 1 else 8  # with accumulation, step 9's first micro-batch ends at global_step 8
    assert sorted(resumed.losses) == list(range(first, STEPS + 1))
    assert resumed.losses == {s: full.losses[s] for s in resumed.losses}


DRIVER = textwrap.dedent(
    """
    # Runs `cdlm train` with a callback that kills the whole process group (every rank, as `kill -9` would)
    # when rank 0 reaches step $KILL_AT.
    import os, signal, sys
    import lightning as L
    from cdlm import cli, training

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == int(os.environ["KILL_AT"]) and trainer.is_global_zero:
                os.killpg(0, signal.SIGKILL)

    build = training.build_trainer
    def build_trainer(cfg, run_dir):
        trainer = build(cfg, run_dir)
        if os.environ.get("KILL_AT"):
            trainer.callbacks.append(Kill())
        return trainer
    training.build_trainer = build_trainer
    cli.main(["train", *sys.argv[1:]])
    """
)


def train_ddp(driver: Path, run_dir: Path, args: list[str], kill_at: int | None = None) -> int:
    """``cdlm train`` on 2 gloo processes in a session of its own; returns the exit status (-9 when killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KILL_AT", None)
    if kill_at is not None:
        env["KILL_AT"] = str(kill_at)
    cmd = [
        sys.executable,
        str(driver),
        *TINY,
        *args,
        f"run_dir={run_dir}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.batch_size=4",
        "sample.n=1",
        "sample.length=8",
        "sampler.steps=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    if kill_at is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


def logged_losses(run_dir: Path, version: int) -> dict[int, float]:
    """``{step: train/loss}`` from a run's CSV log (one version per launch)."""
    rows = csv.DictReader((run_dir / "logs" / f"version_{version}" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.parametrize(
    "objective",
    # 35 s each under two processes: CI kills masked; bitstream's tables resume exactly in test_bitstream.py
    [o if o == "masked" else pytest.param(o, marks=pytest.mark.slow) for o in sorted(OBJECTIVES)],
)
def test_resume_after_kill_9_under_ddp_is_exact(tmp_path, objective):
    args = overrides(tmp_path, objective)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    train_ddp(driver, tmp_path / "full", args)
    status = train_ddp(driver, tmp_path / "killed", args, kill_at=10)
    assert status == -signal.SIGKILL
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    train_ddp(driver, tmp_path / "killed", [*args, "resume=auto"])
    full, resumed = logged_losses(tmp_path / "full", 0), logged_losses(tmp_path / "killed", 1)
    assert len(resumed) >= 4 and min(resumed) <= 8 + 1  # the resumed launch logged steps 9.. onwards
    assert resumed == {s: full[s] for s in resumed}


ROWS_DRIVER = textwrap.dedent(
    """
    # Records every row each rank reads (as the hash of its tokens), one file per rank.
    import hashlib, json, sys
    import lightning as L
    from cdlm import cli, training

    class Rows(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            ids = batch["input_ids"].cpu().numpy()
            self.rows.append([trainer.global_step, [hashlib.md5(r.tobytes()).hexdigest() for r in ids]])

        def on_train_end(self, trainer, pl_module):
            with open(f"{trainer.default_root_dir}/rows_{trainer.global_rank}.json", "w") as f:
                json.dump(self.rows, f)

    build = training.build_trainer
    def build_trainer(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.append(Rows())
        return trainer
    training.build_trainer = build_trainer
    cli.main(["train", *sys.argv[1:]])
    """
)


def test_ddp_ranks_read_disjoint_rows_that_make_up_the_one_process_batches(tmp_path):
    corpus = tmp_path / "random.txt"  # random letters: every 32-character row is distinct
    rng = random.Random(0)
    corpus.write_text("".join(rng.choice("abcdefghij ") for _ in range(1100)))
    args = [*overrides(tmp_path, "masked"), f"data.source={corpus}", "trainer.max_steps=8"]
    driver = tmp_path / "rows.py"
    driver.write_text(ROWS_DRIVER)
    train_ddp(driver, tmp_path / "ddp", args)
    ranks = [json.loads((tmp_path / "ddp" / f"rows_{r}.json").read_text()) for r in (0, 1)]
    single = tmp_path / "single"
    cmd = [
        sys.executable,
        str(driver),
        *TINY,
        *args,
        f"run_dir={single}",
        "data.batch_size=8",
        "sample.n=1",
        "sample.length=8",
        "sampler.steps=2",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    one = json.loads((single / "rows_0.json").read_text())
    for (step, a), (_, b), (_, both) in zip(ranks[0], ranks[1], one):
        assert not set(a) & set(b), step  # disjoint rows on the two ranks
        assert sorted(a + b) == sorted(both), step  # together: the one-process batch of the same step
    for epoch in range(2):  # 4 steps per epoch: every row of an epoch read once over both ranks
        seen = [
            h
            for step_rows in ranks[0][4 * epoch : 4 * epoch + 4] + ranks[1][4 * epoch : 4 * epoch + 4]
            for h in step_rows[1]
        ]
        assert len(seen) == len(set(seen)) == 32

"""End-to-end training: the loss falls, resume replays the uninterrupted run, bf16, non-finite guard, DDP."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdlm.module import warmup_cosine
from tests.runs import TINY, CrashAt, LossRecorder, fit

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_loss_falls(tmp_path):
    recorder = LossRecorder()
    fit(tmp_path, "trainer.max_steps=60", "module.lr=3e-3", callbacks=(recorder,))
    losses = [recorder.losses[s] for s in sorted(recorder.losses)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    full = LossRecorder()
    fit(tmp_path / "full", callbacks=(full,))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "killed", callbacks=(CrashAt(10),))
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()  # saved at step 8
    resumed = LossRecorder()
    fit(tmp_path / "killed", "resume=auto", callbacks=(resumed,))
    assert sorted(resumed.losses) == [9, 10, 11, 12]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], rel=1e-6, abs=1e-6), step


def test_bf16_mixed_step_is_finite(tmp_path):
    recorder = LossRecorder()
    module, trainer, _ = fit(tmp_path, "trainer.precision=bf16-mixed", "trainer.max_steps=2", callbacks=(recorder,))
    assert trainer.precision == "bf16-mixed"
    assert all(math.isfinite(v) for v in recorder.losses.values())
    assert all(torch.isfinite(p).all() for p in module.parameters())


class Poison:
    """Turns the head's bias to NaN before step 6, so the next loss is non-finite."""

    def __new__(cls):
        import lightning as L

        class _Poison(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == 6:
                    with torch.no_grad():
                        pl_module.objective.head.bias.fill_(float("nan"))

        return _Poison()


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at step 6"):
        fit(tmp_path, callbacks=(Poison(),))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def train_cli(run_dir: Path, *overrides: str) -> dict:
    cmd = [
        sys.executable,
        "train.py",
        *TINY,
        f"run_dir={run_dir}",
        "trainer.max_steps=30",
        "sample.n=1",
        "sample.length=16",
        "sampler.steps=4",
        *overrides,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return json.loads((run_dir / "metrics.json").read_text())


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """2 gloo processes x batch 8 against 1 process x batch 16: the same global batch, statistically equal."""
    two = train_cli(tmp_path / "ddp", "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=8")
    one = train_cli(tmp_path / "single", "trainer.devices=1", "data.batch_size=16")
    assert math.isfinite(two["val/bpc"]) and two["val/bpc"] < 6.0
    assert two["val/bpc"] == pytest.approx(one["val/bpc"], rel=0.05)


def test_final_metrics_reuse_a_validation_at_the_last_step(tmp_path):
    from cdlm.cli import final_validation

    module, trainer, datamodule = fit(tmp_path, "trainer.val_check_interval=12")  # validates at step 12 = the end
    assert module.validated_at[1] == trainer.global_step == 12
    reused = final_validation(module, trainer, datamodule)
    fresh = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert set(reused) == {"val/nll", "val/ppl", "val/bpc"}
    for key, value in reused.items():
        assert value == pytest.approx(float(fresh[key]), rel=1e-6), key

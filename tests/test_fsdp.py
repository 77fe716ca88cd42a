"""``trainer=fsdp`` (FSDP2 through Lightning's ModelParallelStrategy) on CPU processes (gloo): two sharded processes
take the same steps as two DDP processes, a killed sharded run resumes exactly, ``final/`` holds the full weights,
and what the strategy does not support is refused before anything is written."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdlm.cli import main
from tests.runs import CRASH_DRIVER, TINY

ROOT = Path(__file__).resolve().parents[1]


FSDP_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "ema=null"]


def train(tmp_path: Path, run_dir: Path, *overrides: str, crash: int = 0, expect: int = 0) -> str:
    driver = tmp_path / "driver.py"
    driver.write_text(CRASH_DRIVER)
    cmd = [
        sys.executable,
        str(driver),
        str(crash),
        *TINY,
        f"run_dir={run_dir}",
        "trainer.max_steps=12",
        "sample.n=2",
        "sample.length=16",
        "sampler.steps=4",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc.stdout


def losses(run_dir: Path) -> dict[int, float]:
    """``{step: train/loss}`` from every ``logs/version_*/metrics.csv`` of a run (a resumed run adds a version)."""
    out = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def test_two_sharded_processes_take_the_steps_of_two_ddp_processes(tmp_path):
    """Same data per rank, same per-step randomness, same averaged gradient: the losses agree step by step."""
    train(tmp_path, tmp_path / "fsdp", *FSDP_CPU, "trainer.devices=2", "data.batch_size=4")
    ddp = ("trainer.devices=2", "trainer.strategy=ddp", "trainer.precision=32-true", "ema=null", "data.batch_size=4")
    train(tmp_path, tmp_path / "ddp", *ddp)
    sharded, replicated = losses(tmp_path / "fsdp"), losses(tmp_path / "ddp")
    assert len(sharded) == 12 and sharded.keys() == replicated.keys()
    for step in sharded:
        assert sharded[step] == pytest.approx(replicated[step], rel=1e-4, abs=1e-4), step
    assert sharded[11] < sharded[0]


def test_killed_sharded_run_resumes_exactly_and_final_holds_full_weights(tmp_path):
    train(tmp_path, tmp_path / "full", *FSDP_CPU, "trainer.devices=2", "data.batch_size=4")
    train(tmp_path, tmp_path / "killed", *FSDP_CPU, "trainer.devices=2", "data.batch_size=4", crash=10, expect=3)
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    train(tmp_path, tmp_path / "killed", *FSDP_CPU, "trainer.devices=2", "data.batch_size=4", "resume=auto")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    for step in range(8, 12):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-5), step

    from cdlm import load

    model = load(tmp_path / "full" / "final")  # gathered from both ranks: every tensor whole and trained
    stored = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name]), name


def test_fsdp_with_ema_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, f"run_dir={run_dir}", "trainer=fsdp", "trainer.accelerator=cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "cdlm: error: trainer.strategy=fsdp does not support the EMA callback yet" in err and "ema=null" in err
    assert not run_dir.exists()


def test_two_compiled_ddp_processes_take_the_steps_of_two_eager_ones(tmp_path):
    """``model.compile=true`` under 2-process DDP: the compiled blocks' losses follow the eager run's step by step
    (inductor's fused kernels round differently, so to 1e-4), and the run finishes (final/, samples, metrics)."""
    ddp = ("trainer.devices=2", "trainer.strategy=ddp", "trainer.precision=32-true", "data.batch_size=4")
    train(tmp_path, tmp_path / "eager", *ddp, "trainer.max_steps=6")
    train(tmp_path, tmp_path / "compiled", *ddp, "trainer.max_steps=6", "model.compile=true")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled) == 6 and compiled.keys() == eager.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-4), step
    assert (tmp_path / "compiled" / "final" / "model.safetensors").is_file()

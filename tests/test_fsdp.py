"""``trainer=fsdp`` (FSDP2 through Lightning's ModelParallelStrategy) on CPU processes (gloo), with TINY's EMA
(decay 0.9): two sharded processes take the same steps and reach the same EMA weights as two DDP processes, a killed
sharded run resumes exactly, and ``final/`` holds the full EMA weights, as the checkpoints do."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cdlm.cli import main
from cdlm.ema import ShardedAverage, exact_ema
from tests.runs import CRASH_DRIVER, TINY

ROOT = Path(__file__).resolve().parents[1]


FSDP_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true"]


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


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def last_checkpoint(run_dir: Path) -> dict:
    """``last.ckpt`` (step 12), asserted to hold an EMA visibly away from the trained weights."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ema, trained = ckpt["state_dict"], ckpt["current_model_state"]
    assert ckpt["global_step"] == 12 and int(ckpt["averaging_state"]["n_averaged"]) == 12
    assert ema.keys() == trained.keys()
    assert max(float((ema[k] - trained[k]).abs().max()) for k in ema) > 1e-3
    return ckpt


def test_two_sharded_processes_take_the_steps_of_two_ddp_processes(tmp_path):
    """Same data per rank, same per-step randomness, same averaged gradient: the losses agree step by step, and so
    do the EMA weights of ``final/``; a validation at step 6 swaps the sharded EMA in and out again."""
    both = ("trainer.devices=2", "data.batch_size=4", "trainer.val_check_interval=6")
    train(tmp_path, tmp_path / "fsdp", *FSDP_CPU, *both)
    train(tmp_path, tmp_path / "ddp", "trainer.strategy=ddp", "trainer.precision=32-true", *both)
    sharded, replicated = losses(tmp_path / "fsdp"), losses(tmp_path / "ddp")
    assert len(sharded) == 12 and sharded.keys() == replicated.keys()
    for step in sharded:
        assert sharded[step] == pytest.approx(replicated[step], rel=1e-4, abs=1e-4), step
    # 12 steps move the weights (``last_checkpoint``: the EMA lags the trained weights by > 1e-3) but one batch's loss
    # is dominated by its noise level, so no single pair of steps is compared

    final, ddp_final = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "ddp")
    assert final.keys() == ddp_final.keys()
    for name, value in final.items():
        torch.testing.assert_close(value, ddp_final[name], rtol=0, atol=1e-5, msg=name)
    sharded_ckpt, ddp_ckpt = last_checkpoint(tmp_path / "fsdp"), last_checkpoint(tmp_path / "ddp")
    assert sharded_ckpt.keys() == ddp_ckpt.keys() and sharded_ckpt["state_dict"].keys() == ddp_ckpt["state_dict"].keys()
    for name, value in sharded_ckpt["state_dict"].items():  # the same layout, the EMA gathered whole
        assert torch.equal(value, final[name]) and value.shape == ddp_ckpt["state_dict"][name].shape, name


def test_killed_sharded_run_resumes_exactly_and_final_holds_full_weights(tmp_path):
    train(tmp_path, tmp_path / "full", *FSDP_CPU, "trainer.devices=2", "data.batch_size=4")
    train(tmp_path, tmp_path / "killed", *FSDP_CPU, "trainer.devices=2", "data.batch_size=4", crash=10, expect=3)
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    train(tmp_path, tmp_path / "killed", *FSDP_CPU, "trainer.devices=2", "data.batch_size=4", "resume=auto")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    for step in range(8, 12):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-5), step
    final, resumed_final = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    for name, value in final.items():  # the EMA and the trained weights restored exactly
        assert torch.equal(value, resumed_final[name]), name

    from cdlm import load

    model = load(tmp_path / "full" / "final")  # gathered from both ranks: every tensor whole and trained
    stored = last_checkpoint(tmp_path / "full")["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name]), name


def test_sharded_checkpoints_are_written_per_rank_and_resume_exactly(tmp_path):
    """``sharded_checkpoints=true``: every checkpoint a directory of per-rank shards; a run killed at step 10 resumes
    from its step-8 directory (read through cdlm's safe reader) to the losses of the uninterrupted run, and
    ``cdlm.load`` reads a sharded checkpoint whole."""
    sharded = (*FSDP_CPU, "ema=null", "sharded_checkpoints=true", "trainer.devices=2", "data.batch_size=4")
    train(tmp_path, tmp_path / "full", *sharded)
    train(tmp_path, tmp_path / "killed", *sharded, crash=10, expect=3)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    train(tmp_path, tmp_path / "killed", *sharded, "resume=auto")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert len(full) == 12
    for step in range(8, 12):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-5), step

    from cdlm import load

    whole = load(tmp_path / "killed" / "checkpoints" / "last.ckpt").state_dict()  # step 12, no EMA: final's weights
    for name, value in load(tmp_path / "killed" / "final").state_dict().items():
        assert torch.equal(value, whole[name]), name


def test_sharded_checkpoints_with_an_ema_hold_both_weights_and_resume_exactly(tmp_path):
    """With an EMA (TINY's, decay 0.9) every rank writes its shards of the average (``state_dict``) and of the trained
    weights (``current_model_state``); a run killed at step 10 resumes from its step-8 directory to the uninterrupted
    losses and the same ``final/`` (the EMA), bit for bit, and ``cdlm.load`` of the last directory is that EMA."""
    from cdlm import load
    from cdlm.sharded_checkpoint import read_sharded_ckpt

    sharded = (*FSDP_CPU, "sharded_checkpoints=true", "trainer.devices=2", "data.batch_size=4")
    train(tmp_path, tmp_path / "full", *sharded)
    train(tmp_path, tmp_path / "killed", *sharded, crash=10, expect=3)
    assert read_sharded_ckpt(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"] == 8
    train(tmp_path, tmp_path / "killed", *sharded, "resume=auto")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    for step in range(8, 12):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-5), step
    final, resumed_final = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    for name, value in final.items():  # the average and the trained weights both restored exactly
        assert torch.equal(value, resumed_final[name]), name

    ckpt = read_sharded_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt")
    ema, trained = ckpt["state_dict"], ckpt["current_model_state"]
    assert ckpt["global_step"] == 12 and int(ckpt["averaging_state"]["n_averaged"]) == 12
    assert ema.keys() == trained.keys() and max(float((ema[k] - trained[k]).abs().max()) for k in ema) > 1e-3
    whole = load(tmp_path / "full" / "checkpoints" / "last.ckpt").state_dict()
    for name, value in load(tmp_path / "full" / "final").state_dict().items():
        assert torch.equal(value, whole[name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sharded_checkpoints=true", "ema=null"], "sharded_checkpoints=true needs trainer=fsdp"),
    ],
)
def test_sharded_checkpoints_where_they_cannot_work_are_refused_before_anything_is_written(
    tmp_path, capsys, overrides, message
):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, f"run_dir={run_dir}", *overrides])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err and not run_dir.exists()


@pytest.mark.parametrize("use_buffers", [True, False])
def test_sharded_average_updates_as_lightnings_averaged_model(use_buffers):
    """On whole tensors ``ShardedAverage`` is ``AveragedModel`` with ``exact_ema``, bit for bit (first update a copy,
    buffers copied without ``use_buffers``); swapping twice is the identity."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reference = AveragedModel(module, avg_fn=exact_ema(0.9), use_buffers=use_buffers)
    average = ShardedAverage(module, exact_ema(0.9), None, use_buffers)
    for _ in range(3):
        module(torch.randn(5, 3))  # moves the BatchNorm statistics
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        reference.update_parameters(module)
        average.update_parameters(module)
    expected = [*reference.module.parameters(), *reference.module.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(average.tensors, expected, strict=True))
    assert int(average.n_averaged) == int(reference.n_averaged) == 3
    trained = [t.clone() for t in [*module.parameters(), *module.buffers()]]
    average.swap(module)
    assert all(torch.equal(a, b) for a, b in zip([*module.parameters(), *module.buffers()], expected, strict=True))
    average.swap(module)
    assert all(torch.equal(a, b) for a, b in zip([*module.parameters(), *module.buffers()], trained, strict=True))
    assert not torch.equal(trained[0], expected[0])


@pytest.mark.slow  # 37 s; compiled = eager is also checked in one process (test_fast_step.py)
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


@pytest.mark.parametrize(
    ("objective", "compiled"), [("masked", True), ("langflow", False)], ids=["masked-compiled", "langflow"]
)
def test_two_ddp_processes_take_the_steps_of_one_process(tmp_path, objective, compiled):
    """2 DDP processes x 4 rows and 1 process x 8 rows train the same global batches with the same noise (drawn per
    global row, ``cdlm/draws.py``; LangFlow's self-conditioning coin per batch, its schedule fit normalised over the
    global batch): after 6 steps the weights agree to float rounding. With noise drawn per rank the gap was 2.7e-3
    (masked) and 1.1e-3 (LangFlow's batch-normalised fit); another seed moves the weights by more than 0.1."""
    common = ("trainer.precision=32-true", "trainer.max_steps=6", f"objective={objective}")
    common = (*common, "sampler=ancestral" if objective == "masked" else "sampler=euler")
    common = (*common, *(["model.compile=true"] if compiled else []))
    train(tmp_path, tmp_path / "two", *common, "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=4")
    train(tmp_path, tmp_path / "one", *common, "data.batch_size=8")
    two, one = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert two.keys() == one.keys()
    gap = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert gap < 2e-5, gap

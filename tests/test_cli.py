"""The sample command: JSONL output, sharding over 2 CPU processes, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdlm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_sample_writes_jsonl(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = tmp_path / "samples.jsonl"
    main(["sample", f"path={run_dir / 'final'}", "n=3", "length=16", "sampler.steps=8", "seed=5", f"out={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[0]) == {"text", "ids", "seed", "nfe", "seconds"}
    assert all(len(r["ids"]) == 16 and r["seed"] == 5 and 1 <= r["nfe"] <= 9 for r in rows)
    assert "===== sample 2" in capsys.readouterr().out


def test_sample_sharded_over_two_processes_writes_n_distinct(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "sharded.jsonl"
    cmd = [
        sys.executable,
        "sample.py",
        f"path={run_dir / 'final'}",
        "n=5",
        "length=24",
        "sampler.steps=8",
        "devices=2",
        f"out={out}",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    assert len({r["text"] for r in rows}) == 5
    assert sorted({r["seed"] for r in rows}) == [0, 1]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["n=2"], "path= is required"),
        (["path={final}", "temperature=3"], "unknown sample option"),
        (["path={final}", "sampler.temprature=3"], "unknown sampler option"),
        (["path={final}", "sampler=no-such"], "available"),
        (["path=/no/such/dir"], "no checkpoint at"),
    ],
)
def test_sample_bad_input_is_clear(tiny_run, capsys, args, fragment):
    run_dir, _ = tiny_run
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", *[a.format(final=run_dir / "final") for a in args]])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_train_bad_config_exits_with_message(capsys):
    with pytest.raises(SystemExit):
        main(["train", "model.dept=3"])
    assert "valid keys under model" in capsys.readouterr().err

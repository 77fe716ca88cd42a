"""The sample command: JSONL output, sharding over 2 CPU processes, and clear errors; the typed API behind the
commands (``cdlm.api``): results returned, bad input raised as ``ValueError``, never an exit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cdlm
from cdlm.cli import main
from cdlm.options import as_arguments
from cdlm.sampling import Samples
from tests.runs import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_sample_writes_jsonl(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = tmp_path / "samples.jsonl"
    main(["sample", f"path={run_dir / 'final'}", "n=3", "length=16", "sampler.steps=8", "seed=5", f"out={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[0]) == {"text", "ids", "seed", "nfe", "seconds", "stop"}  # stop: the first EOS, or null
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
    for _ in range(2):  # one retry, only for a process killed by a signal at start (a rare SIGABRT in gloo's setup)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode >= 0:
            break
    assert done.returncode == 0, done.stderr[-3000:]
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


# ---- cdlm.api: the commands as typed functions that raise instead of exiting -----------------------------------
def test_api_sample_returns_samples(tiny_run):
    samples = cdlm.api.sample(tiny_run[0] / "final", n=3, length=16, seed=5, sampler_options={"steps": 8})
    assert isinstance(samples, Samples)
    assert samples.ids.shape == (3, 16) and len(samples.texts) == 3 and samples.seeds == [5, 5, 5]
    assert 1 <= samples.nfe <= 9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be a positive integer"),
        ({"n": "4"}, "n='4' is not valid"),
        ({"sampler_options": {"temprature": 3}}, "unknown sampler option"),
        ({"sampler": "no-such"}, "available"),
        ({"length": 10_000}, "exceeds the model's max_len"),
    ],
)
def test_api_sample_bad_option_raises_value_error(tiny_run, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cdlm.api.sample(tiny_run[0] / "final", **kwargs)


def test_api_bad_path_and_overrides_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        cdlm.api.sample(tmp_path / "missing")
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        cdlm.api.evaluate(tmp_path, seeds=0)
    with pytest.raises(ValueError, match="valid keys under model"):
        cdlm.api.train({"model.dept": 3})
    with pytest.raises(ValueError, match="list of key=value strings or a mapping"):
        cdlm.api.train("model=tiny")


def test_api_evaluate_returns_the_result(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    evaluation = cdlm.api.evaluate(
        tiny_run[0] / "final", n=2, seeds=1, length=16, val_batches=1, sampler_options={"steps": 4}, out=out
    )
    assert evaluation.path == out and json.loads(out.read_text()) == evaluation.result
    assert evaluation.metrics["val_bpc"] > 0 and evaluation.metrics["nfe"] <= 5
    assert evaluation.result["model"] == str(tiny_run[0] / "final")
    unwritten = cdlm.api.evaluate(tiny_run[0] / "final", n=1, seeds=1, length=8, val_batches=0, write=False)
    assert unwritten.path is None and "val_bpc" not in unwritten.metrics


def test_api_train_from_a_mapping(tmp_path):
    overrides = dict(a.split("=", 1) for a in TINY) | {"trainer.max_steps": 2, "run_dir": tmp_path / "run"}
    run = cdlm.api.train(overrides)
    assert run.run_dir == tmp_path / "run" and (run.final / "model.safetensors").is_file()
    assert run.metrics["val/bpc"] > 0
    assert json.loads((run.run_dir / "metrics.json").read_text()) == run.metrics


def test_overrides_as_arguments():
    assert as_arguments(["a=1"]) == ["a=1"]
    assert as_arguments({"a": True, "b": None, "c": [1, 2], "d": 0.5}) == ["a=true", "b=null", "c=[1, 2]", "d=0.5"]

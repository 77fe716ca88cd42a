"""A catalogue of bad inputs to every command: each exits 2 with ``cdlm: error:`` naming the bad value and what is
valid, prints no traceback, and leaves the run directory (or the model folder) exactly as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cdlm.cli import main
from cdlm.rundir import RunLock
from tests.runs import TINY, refused


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file under ``path`` with a hash of its bytes (None if ``path`` does not exist)."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def fill(text: str, names: dict) -> str:
    """``text`` with each ``{name}`` of ``names`` replaced by its value (other braces left alone)."""
    for key, value in names.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Bad data files, a corrupt checkpoint, an existing output file and a folder."""
    names = {"utf16": "utf16.txt", "binary": "binary.txt", "bad_jsonl": "bad.jsonl", "nofield": "nofield.jsonl"}
    names |= {"short": "short.txt", "exists": "exists.jsonl"}
    paths = {key: tmp_path / name for key, name in names.items()}
    paths["utf16"].write_bytes("To be or not".encode("utf-16"))
    paths["binary"].write_bytes(b"PNG\x00\x00\x1a image data")
    paths["bad_jsonl"].write_text('{"text": "a line"}\n{"text": "the \\u2028 line"}\n{"text": oops}\n')
    paths["nofield"].write_text('{"body": "a line"}\n')
    paths["short"].write_text("far too short a corpus")
    paths["exists"].write_text("{}\n")
    paths["folder"] = tmp_path / "folder"
    paths["folder"].mkdir()
    return paths


TRAIN = [
    (["trainer.max_steps=abc"], ["trainer.max_steps='abc'", "expected int"]),
    (["trainer.max_steps=-5"], ["max_steps", "-5", "non-negative integer or -1"]),
    (["model.width=abc"], ["model.width='abc'", "expected int"]),
    (["model.depth=-1"], ["depth", "-1", ">= 1"]),
    (["model.heads=3"], ["heads=3", "divisible"]),
    (["model.dropout=1.5"], ["dropout", "1.5", "[0.0, 1.0)"]),
    (["model.mask_mode=sideways"], ["'sideways'", "bidirectional"]),
    (["model.dept=3"], ["model.dept", "valid keys under model"]),
    (["learning_rate=3"], ["learning_rate", "valid keys under the top level"]),
    (["depth"], ["'depth'", "key=value"]),
    (["model=enormous"], ["'enormous'", "available", "tiny"]),
    (["objective=nosuch"], ["'nosuch'", "masked"]),
    (["data=nosuch"], ["'nosuch'", "shakespeare_char"]),
    (["trainer=tpu"], ["'tpu'", "cpu"]),
    (["experiment=nope"], ["'nope'", "quickstart"]),
    (["objective.schedule=bogus"], ["'bogus'", "loglinear"]),
    (["objective.eps=2"], ["eps", "2", "[0.0, 1.0)"]),
    (["objective=flow", "sampler=ancestral"], ["'ancestral'", "euler"]),
    (["sampler=nosuch"], ["'nosuch'", "ancestral"]),
    (["sampler.top_p=5"], ["top_p=5", "(0, 1]"]),
    (["sampler=parallel", "sampler.selector=bogus"], ["selector='bogus'", "threshold"]),
    (["sampler.steps=0"], ["steps=0", ">= 1"]),
    (["sampler.steps=abc"], ["steps='abc'", "integer"]),
    (["sampler.temprature=0.5"], ["sampler.temprature", "valid keys under sampler"]),
    (["sample.n=0"], ["sample.n", "0", "positive"]),
    (["sample.length=-3"], ["sample.length", "-3", "positive"]),
    (["seed=abc"], ["seed='abc'", "expected int"]),
    (["resume=true"], ["resume=True", "str | null"]),
    (["resume=nosuch.ckpt"], ["'nosuch.ckpt'", "no such checkpoint file", "auto"]),
    (["overwrite=maybe"], ["overwrite='maybe'", "bool"]),
    (["resume=auto", "overwrite=true"], ["resume='auto'", "overwrite=true", "contradict"]),
    (["data.seq_len=0"], ["seq_len", "0", "positive"]),
    (["data.batch_size=-1"], ["batch_size", "-1", "positive"]),
    (["data.val_fraction=1.5"], ["val_fraction", "1.5", "(0, 1)"]),
    (["data.tokenizer=wordpiece"], ["'wordpiece'", "bpe"]),
    (["data.source=/no/such/corpus.txt"], ["'/no/such/corpus.txt'", "not found", "shakespeare"]),
    (["data.source={utf16}"], ["utf16.txt", "not UTF-8", "byte offset"]),
    (["data.source={binary}"], ["binary.txt", "looks binary", "NUL byte at offset 3"]),
    (["data.source={bad_jsonl}"], ["bad.jsonl:3", "not valid JSON"]),
    (["data.source={nofield}"], ["nofield.jsonl:1", "'text'", "['body']"]),
    (["data.source={short}"], ["short.txt", "too short", "batch_size <="]),
    (["module.lr=abc"], ["module.lr='abc'", "float"]),
    (["module.lr=-1"], ["lr", "-1", "> 0"]),
    (["module.betas=[0.9]"], ["module.betas=[0.9]", "tuple[float, float]"]),
    (["module.warmup_steps=-5"], ["warmup_steps", "-5", ">= 0"]),
    (["ema.decay=2"], ["decay", "2", "[0,1]"]),
    (["trainer.precision=bf17"], ["'bf17'", "bf16-mixed"]),
    (["trainer.devices=0"], ["devices=0", "not a valid input"]),
    (["trainer.accelerator=gpu"], ["gpu"]),
    (["trainer.strategy=nonsense"], ["'nonsense'", "ddp"]),
    (["checkpoint.every_n_train_steps=abc"], ["every_n_train_steps='abc'", "int | null"]),
    (["checkpoint.filename=../x"], ["filename='../x'", "plain file name"]),
    (["trainer.default_root_dir=/tmp/x"], ["trainer.default_root_dir", "set by cdlm"]),
    (["module._target_=torch.nn.Linear"], ["'torch.nn.Linear'", "cdlm.module.DiffusionLM"]),
    (["run_dir=${oc.env:HOME}"], ["oc.env", "resolver"]),
    (["run_dir={short}"], ["short.txt", "is a file"]),
]


@pytest.mark.parametrize("overrides, fragments", TRAIN, ids=[" ".join(o) for o, _ in TRAIN])
def test_train(tmp_path, capsys, files, overrides, fragments):
    run_dir = tmp_path / "run"
    args = [fill(o, files) for o in overrides]
    err = refused(["train", *TINY, f"run_dir={run_dir}", *args], capsys)
    for fragment in fragments:
        assert fill(fragment, files) in err, err
    assert not run_dir.exists() or run_dir.is_file()  # nothing was created


@pytest.fixture
def used_run(tiny_run, tmp_path) -> Path:
    """A copy of a trained run's directory (checkpoints, final/, logs)."""
    run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "used")
    return tmp_path / "used"


USED = [
    ([], ["already holds a run", "resume=auto", "overwrite=true"]),
    (["resume=auto", "model.depth=3"], ["other settings", "model.depth: checkpoint 2, this run 3"]),
    (["resume=auto", "objective=flow", "sampler=euler"], ["other settings", "objective._target_"]),
    (["resume=auto", "data=shakespeare_bpe"], ["other settings", "data.tokenizer: checkpoint 'char', this run 'bpe'"]),
    (["resume={corrupt}"], ["cannot read checkpoint", "corrupt.ckpt"]),
    (["resume=auto", "data.batch_size=100000000"], ["too short", "batch_size"]),
]


@pytest.mark.parametrize("overrides, fragments", USED, ids=[" ".join(o) or "resume=null" for o, _ in USED])
def test_train_into_a_used_run_dir(used_run, tmp_path, capsys, overrides, fragments):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((used_run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    before = snapshot(used_run)
    args = [fill(o, {"corrupt": corrupt}) for o in overrides]
    err = refused(["train", *TINY, f"run_dir={used_run}", *args], capsys)
    for fragment in fragments:
        assert fragment in err, err
    assert snapshot(used_run) == before


def test_resume_auto_without_last_ckpt_in_a_used_dir(used_run, capsys):
    shutil.rmtree(used_run / "checkpoints")
    before = snapshot(used_run)
    err = refused(["train", *TINY, f"run_dir={used_run}", "resume=auto"], capsys)
    assert "no checkpoints/last.ckpt" in err and "overwrite=true" in err
    assert snapshot(used_run) == before


def test_a_second_training_in_a_locked_run_dir_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        before = snapshot(run_dir)
        err = refused(["train", *TINY, f"run_dir={run_dir}"], capsys)
        assert "in use by another training" in err and "pid" in err
        assert snapshot(run_dir) == before


SAMPLE = [
    (["n=0"], ["n must be a positive integer, got 0"]),
    (["n=-1"], ["got -1"]),
    (["n=abc"], ["n='abc'", "expected int"]),
    (["length=0"], ["length must be a positive integer, got 0"]),
    (["length=100000"], ["length=100000", "max_len"]),
    (["seed=1.5"], ["seed=1.5", "int"]),
    (["devices=0"], ["devices", "got 0"]),
    (["batch_size=0"], ["batch_size", "got 0"]),
    (["device=tpu"], ["'tpu'", "cpu, cuda"]),
    (["device=cuda:7"], ["'cuda:7'", "device=cpu"]),
    (["temperature=3"], ["['temperature']", "valid:", "sampler.KEY=value"]),
    (["positional"], ["'positional'", "key=value"]),
    (["sampler=nosuch"], ["'nosuch'", "ancestral"]),
    (["sampler=euler"], ["'euler'", "['ancestral', 'edlm', 'parallel']"]),
    (["sampler.top_p=5"], ["top_p=5", "(0, 1]"]),
    (["sampler.top_p=abc"], ["top_p='abc'", "(0, 1]"]),
    (["sampler.final=maybe"], ["final='maybe'", "argmax"]),
    (["sampler.steps=0"], ["steps=0", ">= 1"]),
    (["sampler.temprature=3"], ["'temprature'", "top_p"]),
    (["sampler=parallel", "sampler.selector=bogus"], ["selector='bogus'", "prophet"]),
    (["sampler=parallel", "sampler.tau=0"], ["tau=0", "(0, 1]"]),
    (["sampler=parallel", "sampler.block_length=0"], ["block_length=0", ">= 1"]),
    (["out={exists}"], ["exists.jsonl", "exists", "overwrite=true"]),
    (["out={folder}"], ["is a folder"]),
    (["trace={exists}"], ["exists.jsonl", "overwrite=true"]),
]


@pytest.mark.parametrize("options, fragments", SAMPLE, ids=[" ".join(o) for o, _ in SAMPLE])
def test_sample(tiny_run, capsys, files, options, fragments):
    final = tiny_run[0] / "final"
    before = snapshot(final), snapshot(files["folder"])
    args = [fill(o, files) for o in options]
    err = refused(["sample", f"path={final}", *args], capsys)
    for fragment in fragments:
        assert fragment in err, err
    assert (snapshot(final), snapshot(files["folder"])) == before
    assert files["exists"].read_text() == "{}\n"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["sample", "n=2"], ["path= is required"]),
        (["sample", "path=/no/such/model"], ["'/no/such/model'", "no checkpoint at", "save_pretrained folder"]),
        (["sample", "path={corrupt}"], ["cannot read checkpoint", "corrupt.ckpt"]),
        (["eval", "path={final}", "seeds=0"], ["seeds must be a positive integer, got 0"]),
        (["eval", "path={final}", "n=abc"], ["n='abc'", "expected int"]),
        (["eval", "path={final}", "val_batches=-1"], ["val_batches", "-1", ">= 0"]),
        (["eval", "path={final}", "judge=/no/such/judge", "val_batches=0"], ["'/no/such/judge'", "cannot be loaded"]),
        (["eval", "path={final}", "reference=maybe"], ["reference='maybe'", "bool"]),
        (["schedule", "path={final}"], ["MaskedDiffusion", "bitstream"]),
        (["schedule"], ["path= is required"]),
        (["sweep", "/no/such/sweep.yaml"], ["'/no/such/sweep.yaml'", "not found", "configs/sweep"]),
        (["sweep", "{bad_yaml}"], ["not valid YAML"]),
        (["sweep", "{sweep}", "--bogus"], ["['--bogus']", "--print"]),
        (["sweep", "{sweep}", "{sweep}"], ["one sweep file"]),
        (["sweep", "{bad_point}"], ["top_p=5", "(0, 1]"]),
        (["sweep", "{unknown_key}"], ["['bogus']", "valid keys"]),
        (["nosuchcommand"], ["'nosuchcommand'", "train"]),
    ],
)
def test_other_commands(tiny_run, tmp_path, capsys, args, fragments):
    final = tiny_run[0] / "final"
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((tiny_run[0] / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    sweeps = {"bad_yaml": "a: [1, 2\n", "unknown_key": "bogus: 1\n"}
    sweeps["sweep"] = f"command: eval\nbase: [path={final}, n=1, seeds=1]\ngrid: {{n: [1]}}\nout: {tmp_path / 'out'}\n"
    sweeps["bad_point"] = sweeps["sweep"].replace("{n: [1]}", "{sampler.top_p: [0.5, 5]}")
    for name, text in sweeps.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    names = {"final": final, "corrupt": corrupt, **{k: tmp_path / f"{k}.yaml" for k in sweeps}}
    before = snapshot(final)
    err = refused([fill(a, names) for a in args], capsys)
    for fragment in fragments:
        assert fragment in err, err
    assert snapshot(final) == before and not (tmp_path / "out").exists()


def test_no_command_prints_help_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "commands:" in capsys.readouterr().out


def test_a_file_written_meanwhile_is_not_replaced(tmp_path):
    """Two processes writing one ``out=`` file: the second finds the first's file and replaces nothing."""
    from cdlm.cli import write_new
    from cdlm.config import ConfigError

    out = tmp_path / "samples.jsonl"
    write_new(out, "first\n", overwrite=False)
    with pytest.raises(ConfigError, match="written by another process"):
        write_new(out, "second\n", overwrite=False)
    assert out.read_text() == "first\n" and [p.name for p in tmp_path.iterdir()] == ["samples.jsonl"]
    write_new(out, "second\n", overwrite=True)
    assert out.read_text() == "second\n"

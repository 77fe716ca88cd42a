"""Hostile checkpoints, folders and configs: loading never runs code and never writes outside its target.

Every attack below names something that, if built or unpickled, would create a marker file (a shell command, a
file-writing cdlm function, a ``zipfile.ZipFile`` reached through a ``torch.utils`` module) or write a tokenizer
file outside the temporary folder. Each must be refused with exit status 2 and a ``cdlm: error:`` line, and leave
no marker.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import cdlm
from cdlm.checkpoint import CheckpointError, checked_config
from cdlm.config import ConfigError, compose, to_dict
from tests.runs import TINY, refused


def code_targets(marker: Path) -> dict[str, dict]:
    """``_target_`` nodes that would run a shell command or write / truncate a file if they were built."""
    return {
        "torch subprocess": {
            "_target_": "torch.distributed.elastic.multiprocessing.subprocess_handler.SubprocessHandler",
            "entrypoint": "sh",
            "args": ["-c", f"touch {marker}"],
            "env": {},
            "stdout": None,
            "stderr": None,
            "local_rank_id": 0,
        },
        "torch.utils zipfile alias": {
            "_target_": "torch.utils.model_dump.zipfile.ZipFile",
            "file": str(marker),
            "mode": "w",
        },
        "cdlm function": {"_target_": "cdlm.config.save_config", "cfg": {"a": 1}, "path": str(marker)},
        "lightning module path": {
            "_target_": "lightning.fabric.utilities.cloud_io._atomic_save",
            "checkpoint": {},
            "filepath": str(marker),
        },
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
        "builtins.eval": {"_target_": "builtins.eval", "source": f"open('{marker}', 'w')"},
    }


SLOTS = ("model", "objective", "module")


class Exploit:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def sample_args(path: Path) -> list[str]:
    return ["sample", f"path={path}", "n=1", "length=8", "sampler.steps=2"]


def edit_folder(final: Path, dest: Path, edit) -> Path:
    """A copy of a ``save_pretrained`` folder with its ``config.yaml`` passed through ``edit``."""
    shutil.copytree(final, dest)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    edit(config)
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


def edit_ckpt(last: Path, dest: Path, config_edit=None, tokenizer=None) -> Path:
    """A copy of a Lightning checkpoint with its stored config or tokenizer files replaced."""
    ckpt = torch.load(last, weights_only=True)
    if config_edit is not None:
        config_edit(ckpt["cdlm"]["config"])
    if tokenizer is not None:
        ckpt["cdlm"]["tokenizer"] = tokenizer
    torch.save(ckpt, dest)
    return dest


@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize("attack", sorted(code_targets(Path("m"))))
def test_stored_config_naming_code_is_refused(tiny_run, tmp_path, capsys, slot, attack):
    run_dir, _ = tiny_run
    marker = tmp_path / "marker"
    node = code_targets(marker)[attack]
    folder = edit_folder(run_dir / "final", tmp_path / "folder", lambda c: c.__setitem__(slot, dict(node)))
    ckpt = edit_ckpt(run_dir / "checkpoints" / "last.ckpt", tmp_path / "x.ckpt", lambda c: c.__setitem__(slot, node))
    for path in (folder, ckpt):
        with pytest.raises(CheckpointError, match="not allowed|may be one of"):
            cdlm.load(path)
        refused(sample_args(path), capsys)
        refused(["eval", f"path={path}", "n=1", "seeds=1"], capsys)
    err = refused(["train", *TINY, f"run_dir={tmp_path / 'resumed'}", f"resume={ckpt}"], capsys)
    assert "not allowed" in err or "may be one of" in err
    assert not marker.exists() and not (tmp_path / "resumed").exists()


def test_nested_target_in_a_stored_config_is_refused(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    marker = tmp_path / "marker"
    nested = code_targets(marker)["torch subprocess"]
    folder = edit_folder(run_dir / "final", tmp_path / "f", lambda c: c["objective"].__setitem__("schedule", nested))
    err = refused(sample_args(folder), capsys)
    assert "only these keys may name a class" in err and not marker.exists()


def test_yaml_python_tags_are_not_constructed(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    marker = tmp_path / "marker"
    folder = tmp_path / "f"
    shutil.copytree(run_dir / "final", folder)
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(f"evil: !!python/object/apply:os.system ['touch {marker}']\n{text}")
    refused(sample_args(folder), capsys)
    assert not marker.exists()


def test_resolvers_in_a_stored_config_are_refused(tiny_run, tmp_path, capsys, monkeypatch):
    run_dir, _ = tiny_run
    monkeypatch.setenv("CDLM_TEST_SECRET", "hunter2")
    folder = edit_folder(
        run_dir / "final", tmp_path / "f", lambda c: c.__setitem__("run_dir", "${oc.env:CDLM_TEST_SECRET}")
    )
    err = refused(sample_args(folder), capsys)
    assert "resolver" in err and "hunter2" not in err


@pytest.mark.parametrize(
    "name", ["../../escaped.json", "/tmp/cdlm_absolute_escape.json", "sub/dir.json", "..", "", "a\\..\\b"]
)
def test_tokenizer_file_names_must_be_plain(tiny_run, tmp_path, capsys, name):
    run_dir, _ = tiny_run
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["cdlm"]["tokenizer"]
    state = {**state, name: torch.frombuffer(bytearray(b'{"evil": 1}'), dtype=torch.uint8)}
    ckpt = edit_ckpt(run_dir / "checkpoints" / "last.ckpt", work / "x.ckpt", tokenizer=state)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match="plain file names"):
        cdlm.load(ckpt)
    refused(sample_args(ckpt), capsys)
    refused(["train", *TINY, f"run_dir={work / 'run'}", f"resume={ckpt}"], capsys)
    assert set(tmp_path.rglob("*")) == before
    assert not Path("/tmp/cdlm_absolute_escape.json").exists()


def test_pickle_payloads_are_never_unpickled(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    marker = tmp_path / "marker"
    zipped = tmp_path / "zipped.ckpt"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["cdlm"]["config"]["payload"] = Exploit(marker)
    torch.save(ckpt, zipped)  # a real torch zip file with one object that is not a tensor or container
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": Exploit(marker), "cdlm": {}}))
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            cdlm.load(path)
        err = refused(sample_args(path), capsys)
        assert "weights_only=False" not in err  # torch's advice to unpickle anyway is not passed on
        refused(["train", *TINY, f"run_dir={tmp_path / 'run'}", f"resume={path}"], capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("slot", ["model", "objective", "module", "data", "trainer", "ema", "checkpoint"])
@pytest.mark.parametrize("attack", sorted(code_targets(Path("m"))))
def test_command_line_targets_are_refused(tmp_path, capsys, slot, attack):
    marker = tmp_path / "marker"
    target = code_targets(marker)[attack]["_target_"]
    err = refused(["train", *TINY, f"run_dir={tmp_path / 'run'}", f"{slot}._target_={target}"], capsys)
    assert "not allowed" in err or "may be one of" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("attack", sorted(code_targets(Path("m"))))
def test_experiment_files_naming_code_are_refused(tmp_path, capsys, attack):
    marker = tmp_path / "marker"
    experiment = tmp_path / "evil.yaml"
    node = code_targets(marker)[attack]
    experiment.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "module": node}))
    refused(["train", f"experiment={experiment}", *TINY], capsys)
    experiment.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"extra": node}}))
    refused(["train", f"experiment={experiment}", *TINY], capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override",
    [
        "checkpoint.filename=../../escaped",
        "checkpoint.filename=/tmp/cdlm_escaped",
        "checkpoint.dirpath=/tmp/cdlm_escaped",
        "trainer.default_root_dir=/tmp/cdlm_escaped",
        "trainer.logger=true",
        "trainer.callbacks=[]",
        "run_dir=${oc.env:HOME}",
        "model.width=${oc.decode:'64'}",
        "experiment=../configs/config",
        "model=../experiment/quickstart",
    ],
)
def test_command_line_cannot_write_outside_the_run_or_read_env(tmp_path, capsys, override):
    refused(["train", *TINY, f"run_dir={tmp_path / 'run'}", override], capsys)
    assert not (tmp_path / "run").exists() and not Path("/tmp/cdlm_escaped").exists()


def test_allowed_targets_are_exactly_the_listed_classes():
    from cdlm.components import allowed_targets, resolve

    for path in allowed_targets():
        assert isinstance(resolve(path), type), path
    for path in ("torch.nn.Linear", "lightning.pytorch.loggers.CSVLogger", "cdlm.checkpoint.load", "cdlm.cli.main"):
        with pytest.raises(ConfigError, match="not allowed"):
            compose([*TINY, f"model._target_={path}"])


@pytest.mark.parametrize(
    ("objective", "key"),
    [
        ("masked_distill", "teacher_model"),
        ("flow_map", "teacher_model"),
        ("latent_prior", "vae_model"),
        ("latent_vae", "aligner"),
    ],
)
def test_loaded_inputs_cannot_be_set_by_a_config(objective, key):
    """The modules cdlm loads for an objective (``components.FROZEN_INPUTS``) are set by cdlm only: a command line or
    a stored config that names one is refused."""
    with pytest.raises(ConfigError, match="set by cdlm itself"):
        compose([*TINY, f"objective={objective}", f"objective.{key}=/tmp/x"])
    cfg = compose([*TINY, f"objective={objective}"])
    stored = to_dict(cfg)
    stored["objective"][key] = "/tmp/x"
    with pytest.raises(CheckpointError, match="set by cdlm itself"):
        checked_config(stored, Path("stored"))

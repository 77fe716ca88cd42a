"""``--help`` / ``-h`` on every entry point prints the options with their defaults and the choices, and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cdlm.cli import main
from cdlm.config import group_options
from cdlm.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]


def help_of(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_scripts_print_help_and_exit_0(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "Traceback" not in proc.stderr


def test_train_help_lists_groups_choices_and_fitting_samplers(capsys):
    text = help_of(["train", "-h"], capsys)
    for group in ("data", "model", "objective", "sampler", "trainer", "experiment"):
        for name in group_options(group):
            assert name in text, (group, name)
    assert "resume=null" in text and "overwrite=false" in text and "run_dir=runs/default" in text
    objective_lines = {line.split()[0]: line for line in text.splitlines() if "samplers:" in line}
    assert objective_lines["masked*"].endswith("ancestral, edlm, parallel")
    assert "flowmap" in objective_lines["flow_map"] and "flowmap" not in objective_lines["flow"]
    assert objective_lines["autoregressive"].endswith("autoregressive")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_help_list_options_and_every_sampler(capsys, command):
    text = help_of([command, "--help"], capsys)
    assert "path=" in text and "n=" in text and "device=auto" in text
    for name, spec in SAMPLERS.items():
        assert f"  {name} ({spec.space} objectives)" in text
        for knob in spec.knobs():
            assert knob in text, (name, knob)


@pytest.mark.parametrize("command, fragment", [("sweep", "--skip-done"), ("schedule", "out="), ("prepare", "data=owt")])
def test_sweep_and_schedule_help(capsys, command, fragment):
    assert fragment in help_of([command, "--help"], capsys)


def test_cdlm_help_lists_commands(capsys):
    text = help_of(["--help"], capsys)
    for command in ("train", "prepare", "sample", "eval", "sweep", "schedule"):
        assert f"cdlm {command}" in text

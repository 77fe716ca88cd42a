"""Sweeps: grid expansion, --print mode, in-process execution with a fake runner, tables and the plot; a real eval
sweep through ``cdlm.api``, and how a failing point is reported."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from cdlm import api
from cdlm.cli import main
from cdlm.config import ConfigError
from cdlm.sweep import CONFIG_EXAMPLE, SweepError, expand, load_sweep, run_sweep, sweep_arguments


def write_sweep(tmp_path: Path, **fields) -> Path:
    sweep = {
        "command": "eval",
        "base": ["path=runs/x/final", "n=4"],
        "grid": {"sampler.steps": [8, 32], "sampler.top_p": [0.9, 1.0]},
        "columns": ["sampler.steps", "sampler.top_p", "nfe", "gen_ppl_mean", "entropy_mean"],
        "plot": {"x": "nfe", "y": "gen_ppl_mean", "annotate": "entropy_mean", "logx": True, "title": "t"},
        "out": str(tmp_path / "sweep"),
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def fake_eval(command: str, args: list[str]) -> None:
    """Writes what ``cdlm eval`` writes: flat metrics, protocol and reference dicts."""
    assert command == "eval"
    opts = dict(a.split("=", 1) for a in args)
    steps, top_p = int(opts["sampler.steps"]), float(opts["sampler.top_p"])
    metrics = {"nfe": float(steps), "gen_ppl_mean": 100 / steps + top_p, "gen_ppl_std": 0.5, "entropy_mean": 4.2}
    result = {"metrics": metrics, "protocol": {"n": 4}, "reference": {"gen_ppl_mean": 9.87654, "entropy_mean": 4.5}}
    Path(opts["out"]).write_text(json.dumps(result))


def test_expand_product_of_two_keys(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    argv = expand(sweep)
    out = tmp_path / "sweep" / "points"
    assert len(argv) == 4
    assert argv[0] == [
        "path=runs/x/final",
        "n=4",
        "sampler.steps=8",
        "sampler.top_p=0.9",
        f"out={out}/sampler.steps-8_sampler.top_p-0.9.json",
    ]
    assert [a[2:4] for a in argv] == [
        ["sampler.steps=8", "sampler.top_p=0.9"],
        ["sampler.steps=8", "sampler.top_p=1.0"],
        ["sampler.steps=32", "sampler.top_p=0.9"],
        ["sampler.steps=32", "sampler.top_p=1.0"],
    ]
    assert len({a[-1] for a in argv}) == 4


def test_print_mode_runs_nothing(tmp_path, capsys):
    rows = api.sweep(write_sweep(tmp_path), execute=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert rows == [] and len(lines) == 4
    assert all(line.startswith("cdlm eval path=runs/x/final n=4 sampler.steps=") for line in lines)
    assert not (tmp_path / "sweep").exists()


def test_eval_sweep_with_fake_runner(tmp_path):
    rows = run_sweep(write_sweep(tmp_path), runner=fake_eval)
    out = tmp_path / "sweep"
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(rows) == len(table) == 4
    assert [(r["sampler.steps"], r["sampler.top_p"]) for r in table] == [
        ("8", "0.9"),
        ("8", "1.0"),
        ("32", "0.9"),
        ("32", "1.0"),
    ]
    assert float(table[0]["gen_ppl_mean"]) == pytest.approx(13.4) and table[0]["reference.entropy_mean"] == "4.5"
    markdown = (out / "results.md").read_text()
    assert "| sampler.steps | sampler.top_p | nfe | gen_ppl_mean | entropy_mean |" in markdown
    assert "| 8 | 0.9 | 8 | 13.400 | 4.200 |" in markdown and "| 32 | 1 | 32 | 4.125 | 4.200 |" in markdown
    assert "| reference |  |  | 9.877 | 4.500 |" in markdown
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_sweep_reads_metrics_json(tmp_path):
    def fake_train(command: str, args: list[str]) -> None:
        assert command == "train"
        run_dir = Path(dict(a.split("=", 1) for a in args)["run_dir"])
        run_dir.mkdir(parents=True)
        depth = int(dict(a.split("=", 1) for a in args)["model.depth"])
        (run_dir / "metrics.json").write_text(json.dumps({"val/bpc": 3.0 - depth / 10, "val/ppl": 5.0}))

    path = write_sweep(
        tmp_path,
        command="train",
        base=["experiment=quickstart"],
        grid={"model.depth": [2, 4]},
        columns=["model.depth", "val/bpc"],
        plot={"x": "model.depth", "y": "val/bpc"},
    )
    rows = run_sweep(path, runner=fake_train)
    assert expand(load_sweep(path))[1][-2:] == [
        f"run_dir={tmp_path / 'sweep' / 'points' / 'model.depth-4'}",
        "resume=auto",
    ]
    assert [(r["model.depth"], r["val/bpc"]) for r in rows] == [(2, 2.8), (4, 2.6)]
    assert "| 4 | 2.600 |" in (tmp_path / "sweep" / "results.md").read_text()
    assert (tmp_path / "sweep" / "plot.png").is_file()


def test_skip_done_runs_only_missing_points(tmp_path):
    path = write_sweep(tmp_path)
    run_sweep(path, runner=fake_eval)
    (tmp_path / "sweep" / "points" / "sampler.steps-8_sampler.top_p-1.0.json").unlink()
    ran: list[list[str]] = []

    def recording(command: str, args: list[str]) -> None:
        ran.append(args)
        fake_eval(command, args)

    rows = run_sweep(path, runner=recording, skip_done=True)
    assert len(ran) == 1 and "sampler.top_p=1.0" in ran[0] and "sampler.steps=8" in ran[0] and len(rows) == 4


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="valid keys: .*'grid'"):
        run_sweep(write_sweep(tmp_path, grid_search={"a": [1]}), runner=fake_eval)


def test_example_sweep_expands():
    sweep = load_sweep(CONFIG_EXAMPLE)
    argv = expand(sweep)
    assert len(argv) == 4 and argv[-1][-2:] == [
        "sampler.steps=512",
        "out=bench/results/sweeps/masked_steps/points/sampler.steps-512.json",
    ]


GRIDS = [
    {"label": "a", "path": "runs/a/final", "sampler.steps": [4, 16]},
    {"label": "b", "path": "runs/b/final", "sampler": "flowmap", "sampler.steps": [1, 2]},
    {"label": "c", "path": "runs/a/final", "sampler": "autoregressive"},
]
TWO_PLOTS = [
    {"x": "nfe", "y": "gen_ppl_mean", "lines": ["label"], "annotate": "entropy_mean", "logx": True},
    {"x": "seconds_per_sample_mean", "y": "gen_ppl_mean", "lines": ["label"], "file": "plot_seconds.png"},
]


def write_grids_sweep(tmp_path: Path, **fields) -> Path:
    fields = {"grid": None, "grids": GRIDS, "columns": ["label", "sampler.steps", "nfe", "gen_ppl_mean"], **fields}
    sweep = {k: v for k, v in yaml.safe_load(write_sweep(tmp_path).read_text()).items() if k != "grid"}
    sweep.update({k: v for k, v in fields.items() if v is not None})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def fake_eval_any(command: str, args: list[str]) -> None:
    """``cdlm eval``'s JSON for any point; the reference holds one figure per metric, as ``cdlm eval`` writes it."""
    opts = dict(a.split("=", 1) for a in args)
    nfe = float(opts.get("sampler.steps", 256))
    metrics = {"nfe": nfe, "gen_ppl_mean": 1000 / nfe, "entropy_mean": 4.0, "seconds_per_sample_mean": nfe / 100}
    result = {"metrics": metrics, "reference": {"gen_ppl": 40.5, "entropy": 4.49}}
    Path(opts["out"]).write_text(json.dumps(result))


def test_grids_expand_in_order_without_label_overrides(tmp_path):
    argv = expand(load_sweep(write_grids_sweep(tmp_path)))
    assert [a[2:-1] for a in argv] == [
        ["path=runs/a/final", "sampler.steps=4"],
        ["path=runs/a/final", "sampler.steps=16"],
        ["path=runs/b/final", "sampler=flowmap", "sampler.steps=1"],
        ["path=runs/b/final", "sampler=flowmap", "sampler.steps=2"],
        ["path=runs/a/final", "sampler=autoregressive"],
    ]
    assert not any(arg.startswith("label=") for args in argv for arg in args)
    names = [Path(a[-1].removeprefix("out=")).name for a in argv]
    assert names[0] == "label-a_path-runs-a-final_sampler.steps-4.json" and len(set(names)) == 5


def test_grids_sweep_rows_two_plots_and_reference_row(tmp_path):
    rows = run_sweep(write_grids_sweep(tmp_path, plot=TWO_PLOTS), runner=fake_eval_any)
    out = tmp_path / "sweep"
    steps = [(r["label"], r.get("sampler.steps")) for r in rows]
    assert steps == [("a", 4), ("a", 16), ("b", 1), ("b", 2), ("c", None)]
    markdown = (out / "results.md").read_text()
    assert "| label | sampler.steps | nfe | gen_ppl_mean |" in markdown and "| c |  | 256 | 3.906 |" in markdown
    assert "| reference |  |  | 40.500 |" in markdown
    for name in ("plot.png", "plot_seconds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_print_mode_leaves_labels_out(tmp_path, capsys):
    main(["sweep", str(write_grids_sweep(tmp_path)), "--print"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[4].startswith("cdlm eval path=runs/x/final n=4 path=runs/a/final sampler=auto")
    assert not any(" label=" in line for line in lines)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"grid": {"sampler.steps": [8]}}, "either grid .* or grids"),
        ({"grids": {"label": "a"}}, "grids must be a non-empty list"),
        ({"grids": []}, "grids must be a non-empty list"),
        ({"grids": [{"label": "a"}, ["sampler.steps", 8]]}, r"grids\[1\] must map config keys"),
        ({"grids": [{"label": ["a", "b"], "sampler.steps": 8}]}, "label names the whole grid"),
        ({"grids": [{"sampler.steps": [8, 16]}, {"sampler.steps": 8}]}, "share result names .*give each grid"),
        ({"grids": [{"label": "a (b", "blocks of 32)": None}]}, r"\['blocks of 32\)'\] are not config keys"),
        ({"plot": [{"x": "nfe"}]}, "needs x and y"),
        ({"plot": [{"x": "nfe", "y": "gen_ppl_mean", "colour": "red"}]}, "unknown plot key.*'colour'"),
        ({"plot": [{"x": "nfe", "y": "gen_ppl_mean"}, {"x": "nfe", "y": "entropy_mean"}]}, "same file .*plot.png"),
        ({"plot": ["nfe"]}, "plot must be a mapping"),
    ],
)
def test_bad_grids_and_plots_are_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_grids_sweep(tmp_path, **fields))


def test_sweep_arguments():
    assert sweep_arguments(["s.yaml"]) == ("s.yaml", True, False, [])
    assert sweep_arguments(["--print", "s.yaml", "--skip-done"]) == ("s.yaml", False, True, [])
    assert sweep_arguments(["s.yaml", "judge=j", "out=o"]) == ("s.yaml", True, False, ["judge=j", "out=o"])
    with pytest.raises(ConfigError, match="unknown flag"):
        sweep_arguments(["s.yaml", "--dry-run"])
    with pytest.raises(ConfigError, match="takes one sweep file"):
        sweep_arguments(["a.yaml", "b.yaml"])


def test_settings_override_base_and_out_for_every_point(tmp_path, capsys):
    path = write_sweep(tmp_path)
    moved = tmp_path / "moved"
    rows = run_sweep(path, runner=fake_eval, settings=["path=runs/y/final", "judge=runs/j/final", f"out={moved}"])
    assert len(rows) == 4 and (moved / "results.csv").is_file() and not (tmp_path / "sweep").exists()
    api.sweep(path, execute=False, settings=["n=8", "judge=runs/j/final"])
    lines = capsys.readouterr().out.strip().splitlines()[-4:]
    assert all(line.startswith("cdlm eval path=runs/x/final n=8 judge=runs/j/final sampler.steps=") for line in lines)
    assert all(line.count(" n=") == 1 for line in lines)
    assert yaml.safe_load(path.read_text())["out"] == str(tmp_path / "sweep")  # the file is not changed


@pytest.mark.parametrize(
    ("setting", "message"),
    [("sampler.steps=4", "set by the sweep's grid"), ("judge=", "is not key=value"), ("a b=1", "is not key=value")],
)
def test_bad_settings_are_refused_before_any_point(tmp_path, setting, message):
    def never(command: str, args: list[str]) -> None:
        raise AssertionError("a point ran")

    with pytest.raises(ConfigError, match=message):
        run_sweep(write_sweep(tmp_path), runner=never, settings=[setting])


def test_running_needs_a_runner(tmp_path):
    with pytest.raises(ValueError, match="needs a runner"):
        run_sweep(write_sweep(tmp_path))


def test_a_failing_point_stops_the_sweep_with_its_error(tmp_path, capsys):
    def refusing(command: str, args: list[str]) -> None:
        raise ConfigError("sampler.top_p=5 is not in (0, 1]")

    with pytest.raises(SweepError, match=r"sweep point sampler.steps-8_sampler.top_p-0.9 failed \(exit status 2\)"):
        run_sweep(write_sweep(tmp_path), runner=refusing)
    assert "cdlm: error: sampler.top_p=5 is not in (0, 1]" in capsys.readouterr().err


def test_a_bug_in_a_point_keeps_its_traceback(tmp_path):
    def broken(command: str, args: list[str]) -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError, match="bug"):
        run_sweep(write_sweep(tmp_path), runner=broken)


def test_eval_sweep_through_the_api(tiny_run, tmp_path, capsys):
    final = tiny_run[0] / "final"
    path = write_sweep(
        tmp_path,
        base=[f"path={final}", "n=2", "seeds=1", "length=16", "val_batches=1", "device=cpu"],
        grid={"sampler.steps": [4, 8]},
        columns=["sampler.steps", "nfe", "val_bpc"],
        plot={"x": "sampler.steps", "y": "val_bpc"},
    )
    rows = api.sweep(path)
    assert [r["sampler.steps"] for r in rows] == [4, 8] and all(r["val_bpc"] > 0 for r in rows)
    assert all(1 <= r["nfe"] <= r["sampler.steps"] + 1 for r in rows)
    out = capsys.readouterr().out
    assert out.count("validation bound:") == 2 and out.count("cdlm: wrote") == 2
    assert (tmp_path / "sweep" / "results.md").is_file()


def test_a_sampler_preset_is_checked_as_the_sampler_it_names():
    from cdlm.sweep import check_sampler_options

    check_sampler_options("remdm", {"steps": 64})  # presets of `ancestral` and `parallel`, as `cdlm eval` takes them
    check_sampler_options("semiar", {"kv_cache": "window", "steps": 64})
    with pytest.raises(ValueError, match="kv_cache"):
        check_sampler_options("semiar", {"kv_cache": "nonesuch"})

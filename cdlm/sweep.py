"""Sweeps: run ``cdlm eval`` or ``cdlm train`` over a grid from one YAML file, then tabulate and plot the results.

A sweep file names ``command`` (eval or train), ``base`` arguments for every point, a ``grid`` (the cartesian
product of its keys' values), table ``columns``, a ``plot`` spec and an ``out`` folder; see
``cdlm/configs/sweep/masked_steps.yaml``. ``cdlm sweep FILE --print`` prints one command per point for a
cluster scheduler instead of running them.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cdlm.config import ConfigError

KEYS = {"command", "base", "grid", "columns", "plot", "out"}
PLOT_KEYS = {"x", "y", "annotate", "logx", "logy", "title", "lines"}
COMMANDS = ("eval", "train")
CONFIG_EXAMPLE = Path(__file__).parent / "configs" / "sweep" / "masked_steps.yaml"
Runner = Callable[[str, list[str]], Any]


def load_sweep(path: str | Path) -> dict:
    """Read and validate a sweep YAML file (unknown keys raise ``ConfigError``, a ``ValueError``)."""
    sweep = yaml.safe_load(Path(path).read_text())
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping with keys {sorted(KEYS)}")
    if unknown := sorted(set(sweep) - KEYS):
        raise ConfigError(f"unknown sweep key(s) {unknown} in {path}; valid keys: {sorted(KEYS)}")
    if sweep.get("command") not in COMMANDS:
        raise ConfigError(f"sweep command must be one of {list(COMMANDS)}, got {sweep.get('command')!r}")
    if not sweep.get("out"):
        raise ConfigError("a sweep needs out: the folder for point results, results.csv, results.md and plot.png")
    if unknown := sorted(set(sweep.get("plot") or {}) - PLOT_KEYS):
        raise ConfigError(f"unknown plot key(s) {unknown}; valid plot keys: {sorted(PLOT_KEYS)}")
    if sweep.get("plot") and not {"x", "y"} <= set(sweep["plot"]):
        raise ConfigError("a sweep plot needs x and y (a grid key or a metric name each)")
    if not isinstance(sweep.get("grid") or {}, dict):
        raise ConfigError("sweep grid must map config keys to lists of values")
    return sweep


def grid_points(sweep: dict) -> list[dict[str, Any]]:
    """The grid's points in order, each ``{key: value}`` (a scalar grid value counts as a one-value list)."""
    grid = sweep.get("grid") or {}
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    return [dict(zip(grid, combo)) for combo in itertools.product(*values)]


def format_value(value: Any) -> str:
    """A grid value as a command-line override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def point_name(point: dict[str, Any]) -> str:
    """A file-name-safe name for a grid point, e.g. ``sampler.steps-8_sampler.top_p-0.9``."""
    name = "_".join(f"{k}-{format_value(v)}" for k, v in point.items()) or "point"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def base_args(sweep: dict) -> list[str]:
    base = sweep.get("base") or []
    return shlex.split(base) if isinstance(base, str) else [str(a) for a in base]


def point_result(sweep: dict, point: dict[str, Any]) -> Path:
    """Where a point's results land: the eval JSON, or the train run's ``metrics.json``."""
    folder = Path(sweep["out"]) / "points"
    if sweep["command"] == "train":
        return folder / point_name(point) / "metrics.json"
    return folder / f"{point_name(point)}.json"


def expand(sweep: dict) -> list[list[str]]:
    """One argument list per grid point: base args, the point's ``key=value`` overrides and its output path."""
    out, argv = Path(sweep["out"]) / "points", []
    for point in grid_points(sweep):
        name = point_name(point)
        target = f"run_dir={out / name}" if sweep["command"] == "train" else f"out={out / name}.json"
        argv.append([*base_args(sweep), *(f"{k}={format_value(v)}" for k, v in point.items()), target])
    return argv


def _flatten(prefix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flatten(f"{prefix}{key}.", sub).items()}
    return {prefix[:-1]: node} if isinstance(node, (int, float, str, bool)) or node is None else {}


def read_point(sweep: dict, point: dict[str, Any]) -> dict[str, Any]:
    """One result row: the grid values, the point's flat metrics and (eval) its ``reference.*`` scalars."""
    path = point_result(sweep, point)
    if not path.is_file():
        raise FileNotFoundError(f"sweep point {point_name(point)} left no results at {path}")
    data = json.loads(path.read_text())
    row = dict(point)
    if sweep["command"] == "eval":
        row.update(_flatten("", data.get("metrics", {})))
        row.update(_flatten("reference.", data.get("reference") or {}))
    else:
        row.update(_flatten("", data))
    return row


def default_runner(command: str, args: list[str]) -> None:
    """Run one point in-process through the ``cdlm`` command line."""
    from cdlm.cli import main  # lazy: the CLI imports Lightning and wires ``cdlm sweep`` to this module

    main([command, *args])


def run_sweep(
    path: str | Path, execute: bool = True, runner: Runner | None = None, skip_done: bool = False
) -> list[dict[str, Any]]:
    """Run (or with ``execute=False`` print) every point of the sweep at ``path``; write and return the rows.

    ``skip_done``: keep the points whose result file already exists (a sweep cut short, or points run elsewhere
    from the printed commands) and run only the others.
    """
    sweep = load_sweep(path)
    points, argvs = grid_points(sweep), expand(sweep)
    if not execute:
        for args in argvs:
            print(shlex.join(["cdlm", sweep["command"], *args]))
        return []
    runner = runner or default_runner
    out = Path(sweep["out"])
    (out / "points").mkdir(parents=True, exist_ok=True)
    for point, args in zip(points, argvs):
        if skip_done and point_result(sweep, point).is_file():
            print(f"cdlm sweep: point {point_name(point)}: done, kept {point_result(sweep, point)}")
            continue
        print(f"cdlm sweep: point {point_name(point)}: {shlex.join(['cdlm', sweep['command'], *args])}")
        try:
            runner(sweep["command"], args)
        except SystemExit as err:
            if err.code not in (0, None):
                raise RuntimeError(f"sweep point {point_name(point)} failed (exit status {err.code})") from err
    rows = [read_point(sweep, point) for point in points]
    write_csv(rows, out / "results.csv")
    write_markdown(rows, sweep, out / "results.md")
    if sweep.get("plot"):
        write_plot(rows, sweep, out / "plot.png")
    print(f"cdlm sweep: {len(rows)} points; results in {out}")
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """All columns of all rows (in order of first appearance) as CSV."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_number(value: Any) -> str:
    """Integers as they are, floats with 3 decimals (3 significant digits below 1), anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    if not math.isfinite(value) or abs(value) >= 1:
        return f"{value:.3f}"
    return f"{value:.3g}"


def write_markdown(rows: list[dict[str, Any]], sweep: dict, path: Path) -> Path:
    """A Markdown table of the sweep's ``columns`` (default: all but ``reference.*``), plus a reference row."""
    every = dict.fromkeys(k for row in rows for k in row)
    columns = sweep.get("columns") or [k for k in every if not k.startswith("reference.")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_number(row.get(c)) for c in columns) + " |" for row in rows]
    first = rows[0] if rows else {}
    reference = {k.removeprefix("reference."): v for k, v in first.items() if k.startswith("reference.")}
    if any(c in reference for c in columns):
        cells = [format_number(reference[c]) if c in reference else "" for c in columns]
        label = next((i for i, c in enumerate(columns) if c not in reference), None)
        if label is not None:
            cells[label] = "reference"
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text(f"# sweep results: {path.parent}\n\n" + "\n".join(lines) + "\n")
    return path


def line_keys(sweep: dict) -> list[str]:
    """Grid keys that split the plot into lines: ``plot.lines``, else every grid key but the one behind x.

    When x is a metric (e.g. ``nfe``), the grid key with the most values is taken to drive it.
    """
    plot, grid = sweep["plot"], sweep.get("grid") or {}
    if "lines" in plot:
        return list(plot["lines"] or [])
    if not grid:
        return []
    sizes = {k: len(v) if isinstance(v, list) else 1 for k, v in grid.items()}
    driver = plot["x"] if plot["x"] in grid else max(grid, key=sizes.__getitem__)
    return [k for k in grid if k != driver]


def write_plot(rows: list[dict[str, Any]], sweep: dict, path: Path) -> Path:
    """``plot.y`` against ``plot.x``, one line per combination of the other grid keys, annotated points."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting a sweep needs matplotlib: pip install 'cdlm[plot]'") from err
    plot = sweep["plot"]
    x, y, annotate = plot["x"], plot["y"], plot.get("annotate")
    keys = line_keys(sweep)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if isinstance(row.get(x), (int, float)) and isinstance(row.get(y), (int, float)):
            groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    for group, members in groups.items():
        members.sort(key=lambda r: r[x])
        label = ", ".join(f"{k}={format_value(v)}" for k, v in zip(keys, group)) or None
        ax.plot([r[x] for r in members], [r[y] for r in members], marker="o", label=label)
        for r in members:
            if annotate and r.get(annotate) is not None:
                ax.annotate(
                    format_number(r[annotate]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    reference = rows[0].get(f"reference.{y}") if rows else None
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=f"reference {y}")
    ax.set_xscale("log" if plot.get("logx") else "linear")
    ax.set_yscale("log" if plot.get("logy") else "linear")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    title = plot.get("title") or f"{y} vs {x}"
    ax.set_title(f"{title}\n(points labelled with {annotate})" if annotate else title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def main_sweep(argv: list[str]) -> list[dict[str, Any]]:
    """``cdlm sweep <sweep.yaml> [--print] [--skip-done]``: run the sweep or print its commands; returns the rows."""
    parser = argparse.ArgumentParser(prog="cdlm sweep", description="Run cdlm eval/train over a grid.")
    parser.add_argument("sweep", help="sweep YAML file (see cdlm/configs/sweep/)")
    parser.add_argument("--print", action="store_true", help="print one command per point instead of running")
    parser.add_argument("--skip-done", action="store_true", help="keep points whose result file exists")
    opts = parser.parse_args(argv)
    return run_sweep(opts.sweep, execute=not opts.print, skip_done=opts.skip_done)

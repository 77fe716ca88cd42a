"""Sweeps: run ``cdlm eval`` or ``cdlm train`` over a grid from one YAML file, then tabulate and plot the results.

A sweep file names ``command`` (eval or train), ``base`` arguments for every point, a ``grid`` (the cartesian
product of its keys' values: a list expands, a scalar is fixed), table ``columns``, a ``plot`` spec and an ``out``
folder; see ``cdlm/configs/sweep/masked_steps.yaml``. Instead of ``grid``, ``grids`` is a list of such mappings,
each expanded on its own and the points concatenated in order, so that different models and samplers share one
sweep; a grid's reserved key ``label`` is stored in its rows (a column, and a ``plot.lines`` key) but is not passed
on the command line; see ``cdlm/configs/sweep/frontier.yaml``. ``plot`` is one spec or a list of specs, each
written to its ``file`` in ``out`` (default ``plot.png``). ``cdlm sweep FILE --print`` prints one command per
point for a cluster scheduler instead of running them. ``key=value`` arguments after the file override the sweep
for one invocation: ``out=DIR`` moves its results, any other key replaces that key in ``base`` for every point, e.g.
``cdlm sweep configs/sweep/frontier.yaml judge=runs/ar_judge/final out=bench/results/sweeps/frontier_ar_judge``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cdlm.config import ConfigError
from cdlm.errors import RunFailure, error_message, exit_status

KEYS = {"command", "base", "grid", "grids", "columns", "plot", "out"}
PLOT_KEYS = {"x", "y", "annotate", "logx", "logy", "title", "lines", "file"}
LABEL = "label"  # reserved grid key: stored in the rows, never passed as an override
MARKERS = "os^vD<>ph*Xd"
LINESTYLES = ("-", "--", ":")
COMMANDS = ("eval", "train")
CONFIG_EXAMPLE = Path(__file__).parent / "configs" / "sweep" / "masked_steps.yaml"
Runner = Callable[[str, list[str]], Any]
FLAGS = {"--print", "--skip-done"}
CONFIG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")  # a grid key: a dotted config path
# ``cdlm eval``'s reference rows (docs/math.md §8): result key, table label, plot line style
REFERENCES = (
    ("reference", "reference", "--"),  # real validation text under the judge
    ("unigram_draws", "unigram draws", ":"),  # independent draws of the train split's unigram model, same judge
    ("unigram", "unigram (train split)", "-."),  # the unigram's bound on the model's validation tokens
)


class SweepError(RunFailure):
    """A sweep point that failed while running (its own error was printed above)."""


def load_sweep(path: str | Path) -> dict:
    """Read and validate a sweep YAML file (unknown keys raise ``ConfigError``, a ``ValueError``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found; shipped sweeps are in {CONFIG_EXAMPLE.parent}")
    try:
        sweep = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"sweep file {path} is not valid YAML: {err}") from err
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping with keys {sorted(KEYS)}")
    if unknown := sorted(set(sweep) - KEYS):
        raise ConfigError(f"unknown sweep key(s) {unknown} in {path}; valid keys: {sorted(KEYS)}")
    if sweep.get("command") not in COMMANDS:
        raise ConfigError(f"sweep command must be one of {list(COMMANDS)}, got {sweep.get('command')!r}")
    if not sweep.get("out"):
        raise ConfigError("a sweep needs out: the folder for point results, results.csv, results.md and plot.png")
    check_grids(sweep)
    check_plots(plot_specs(sweep))
    return sweep


def check_grids(sweep: dict) -> None:
    """``grid`` xor ``grids`` (a list of mappings), scalar labels, and one file name per point."""
    if "grid" in sweep and "grids" in sweep:
        raise ConfigError("a sweep has either grid (one mapping) or grids (a list of mappings), not both")
    if "grids" in sweep and (not isinstance(sweep["grids"], list) or not sweep["grids"]):
        raise ConfigError("sweep grids must be a non-empty list of mappings, each from config keys to values")
    for i, grid in enumerate(grids(sweep)):
        where = f"grids[{i}]" if "grids" in sweep else "grid"
        if not isinstance(grid, dict):
            raise ConfigError(f"sweep {where} must map config keys to values (a list expands), got {grid!r}")
        if isinstance(grid.get(LABEL), (list, dict)):
            raise ConfigError(f"sweep {where}: {LABEL} names the whole grid and must be one scalar value")
        if bad := [key for key in grid if not (isinstance(key, str) and CONFIG_KEY.fullmatch(key))]:
            raise ConfigError(
                f"sweep {where}: {bad} are not config keys (letters, digits, _ and dots); a comma inside a label of "
                "a {...} mapping splits it: quote the label"
            )
    names = [point_name(p) for p in grid_points(sweep)]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"sweep points share result names {repeated}; give each grid its own {LABEL}")


def plot_specs(sweep: dict) -> list[dict]:
    """The sweep's plots: ``plot`` as one spec or a list of specs (none when ``plot`` is absent)."""
    plot = sweep.get("plot")
    return [] if not plot else plot if isinstance(plot, list) else [plot]


def check_plots(specs: list[dict]) -> None:
    """Each spec a mapping with x and y and only known keys; one output file per spec."""
    for spec in specs:
        if not isinstance(spec, dict):
            raise ConfigError(f"a sweep plot must be a mapping with keys {sorted(PLOT_KEYS)}, got {spec!r}")
        if unknown := sorted(set(spec) - PLOT_KEYS):
            raise ConfigError(f"unknown plot key(s) {unknown}; valid plot keys: {sorted(PLOT_KEYS)}")
        if not {"x", "y"} <= set(spec):
            raise ConfigError("a sweep plot needs x and y (a grid key or a metric name each)")
    files = [spec.get("file", "plot.png") for spec in specs]
    if repeated := sorted({f for f in files if files.count(f) > 1}):
        raise ConfigError(f"sweep plots write the same file {repeated}; give each plot its own file")


def grids(sweep: dict) -> list[dict]:
    """The sweep's grids: ``grids``, else the one ``grid`` (an absent grid is one empty point)."""
    return sweep["grids"] if "grids" in sweep else [sweep.get("grid") or {}]


def grid_points(sweep: dict) -> list[dict[str, Any]]:
    """The points of every grid in order, each ``{key: value}`` (a scalar grid value counts as a one-value list)."""
    points = []
    for grid in grids(sweep):
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        points += [dict(zip(grid, combo)) for combo in itertools.product(*values)]
    return points


def format_value(value: Any) -> str:
    """A grid value as a command-line override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def overrides(point: dict[str, Any]) -> list[str]:
    """A point's ``key=value`` command-line overrides (every key but ``label``)."""
    return [f"{k}={format_value(v)}" for k, v in point.items() if k != LABEL]


def point_name(point: dict[str, Any]) -> str:
    """A file-name-safe name for a grid point, e.g. ``sampler.steps-8_sampler.top_p-0.9``."""
    name = "_".join(f"{k}-{format_value(v)}" for k, v in point.items()) or "point"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def base_args(sweep: dict) -> list[str]:
    """The ``base`` arguments, given as a list or as one shell-quoted string."""
    base = sweep.get("base") or []
    return shlex.split(base) if isinstance(base, str) else [str(a) for a in base]


def point_result(sweep: dict, point: dict[str, Any]) -> Path:
    """Where a point's results land: the eval JSON, or the train run's ``metrics.json``."""
    folder = Path(sweep["out"]) / "points"
    if sweep["command"] == "train":
        return folder / point_name(point) / "metrics.json"
    return folder / f"{point_name(point)}.json"


def expand(sweep: dict) -> list[list[str]]:
    """One argument list per point: base args, the point's ``key=value`` overrides (not its label), its output
    (a train point resumes its own run directory, so a sweep cut short continues where it stopped)."""
    out, argv = Path(sweep["out"]) / "points", []
    for point in grid_points(sweep):
        name = point_name(point)
        targets = (
            [f"run_dir={out / name}", "resume=auto"] if sweep["command"] == "train" else [f"out={out / name}.json"]
        )
        argv.append([*base_args(sweep), *overrides(point), *targets])
    return argv


def _flatten(prefix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flatten(f"{prefix}{key}.", sub).items()}
    return {prefix[:-1]: node} if isinstance(node, (int, float, str, bool)) or node is None else {}


def read_point(sweep: dict, point: dict[str, Any]) -> dict[str, Any]:
    """One result row: the grid values, the point's flat metrics and (eval) its reference rows' scalars
    (``reference.*``, ``unigram_draws.*``, ``unigram.*``)."""
    path = point_result(sweep, point)
    if not path.is_file():
        raise FileNotFoundError(f"sweep point {point_name(point)} left no results at {path}")
    data = json.loads(path.read_text())
    row = dict(point)
    if sweep["command"] == "eval":
        row.update(_flatten("", data.get("metrics", {})))
        for key, _, _ in REFERENCES:
            row.update(_flatten(f"{key}.", data.get(key) or {}))
    else:
        row.update(_flatten("", data))
    return row


def check_points(command: str, argvs: list[list[str]]) -> None:
    """Check every point's arguments before the first point runs: a bad value fails the sweep before any work."""
    from cdlm import rundir
    from cdlm.config import compose
    from cdlm.options import EvalOptions, parse_options

    for args in argvs:
        if command == "train":
            cfg = compose(args)
            rundir.plan(Path(cfg.run_dir), cfg.resume, cfg.overwrite)
        else:
            opts, chosen, knobs = parse_options(args, EvalOptions, "eval")
            check_sampler_options(chosen or stored_sampler(Path(opts.path)), knobs)


def stored_sampler(path: Path) -> str:
    """The sampler name stored with a model (a ``save_pretrained`` folder or a ``.ckpt``), read without building it."""
    from cdlm.checkpoint import read_ckpt

    if path.is_dir():
        config = (
            yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
            if (path / "config.yaml").is_file()
            else {}
        )
    else:
        config = read_ckpt(path)["cdlm"]["config"]
    return str((config.get("sampler") or {}).get("name", "ancestral"))


def check_sampler_options(name: str, knobs: dict) -> None:
    """``sampler.KEY=value`` options of one point, against the sampler they will reach."""
    from cdlm.config import load_group
    from cdlm.samplers import SAMPLERS, check_knobs, check_steps, get_sampler

    if name not in SAMPLERS:  # a preset (sampler=remdm, threshold, ...): the sampler its config names
        name = str(load_group("sampler", name).name)
    spec = get_sampler(name)
    if "steps" in knobs:
        check_steps(spec, knobs["steps"])
    check_knobs(spec, {k: v for k, v in knobs.items() if k != "steps"})


def run_sweep(
    path: str | Path,
    execute: bool = True,
    runner: Runner | None = None,
    skip_done: bool = False,
    check: bool = False,
    settings: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run (or with ``execute=False`` print) every point of the sweep at ``path``; write and return the rows.

    ``runner(command, args)`` runs one point (``cdlm.api.run_point``: through the typed API; ``cdlm.api.sweep``
    passes it). ``check``: check every point's arguments before the first point runs. ``skip_done``: keep the points
    whose result file already exists (a sweep cut short, or points run elsewhere from the printed commands) and run
    only the others. ``settings``: ``key=value`` overrides of ``base`` and ``out`` (``apply_settings``). A point
    whose runner raises a user error or a failed run is reported as ``cdlm: error: ...`` and stops the sweep with a
    ``SweepError``.
    """
    sweep = apply_settings(load_sweep(path), settings or [])
    points, argvs = grid_points(sweep), expand(sweep)
    if not execute:
        for args in argvs:
            print(shlex.join(["cdlm", sweep["command"], *args]))
        return []
    if runner is None:
        raise ValueError("run_sweep needs a runner to run points; cdlm.api.sweep runs them through cdlm.api")
    if check:
        check_points(sweep["command"], argvs)
    out = Path(sweep["out"])
    (out / "points").mkdir(parents=True, exist_ok=True)
    for point, args in zip(points, argvs):
        if skip_done and point_result(sweep, point).is_file():
            print(f"cdlm sweep: point {point_name(point)}: done, kept {point_result(sweep, point)}")
            continue
        print(f"cdlm sweep: point {point_name(point)}: {shlex.join(['cdlm', sweep['command'], *args])}")
        execute_point(runner, sweep["command"], args, point_name(point))
    rows = [read_point(sweep, point) for point in points]
    write_csv(rows, out / "results.csv")
    write_markdown(rows, sweep, out / "results.md")
    for plot in plot_specs(sweep):
        write_plot(rows, plot, line_keys(sweep, plot), out / plot.get("file", "plot.png"))
    print(f"cdlm sweep: {len(rows)} points; results in {out}")
    return rows


def execute_point(runner: Runner, command: str, args: list[str], name: str) -> None:
    """``runner(command, args)``; a user error or a failed run is printed as ``cdlm: error: ...`` and raised again
    as a ``SweepError`` that names the point and the exit status ``cdlm COMMAND`` would have had."""
    try:
        runner(command, args)
    except Exception as err:
        status = exit_status(err)
        if status is None:  # a bug, not a failed point: its traceback is the report
            raise
        print(f"cdlm: error: {error_message(err)}", file=sys.stderr)
        raise SweepError(f"sweep point {name} failed (exit status {status})") from err


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


def is_reference_column(column: str) -> bool:
    """A reference row's scalar (``reference.C``, ``unigram_draws.C``, ``unigram.C``), not a point's own."""
    return any(column.startswith(f"{key}.") for key, _, _ in REFERENCES)


def write_markdown(rows: list[dict[str, Any]], sweep: dict, path: Path) -> Path:
    """A Markdown table of the sweep's ``columns`` (default: all but the reference rows' scalars), plus the reference
    rows: real text, unigram draws and the unigram bound (docs/math.md §8)."""
    every = dict.fromkeys(k for row in rows for k in row)
    columns = sweep.get("columns") or [k for k in every if not is_reference_column(k)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_number(row.get(c)) for c in columns) + " |" for row in rows]
    for key, name, _ in REFERENCES:
        lines += reference_lines(rows, columns, key, name)
    path.write_text(f"# sweep results: {path.parent}\n\n" + "\n".join(lines) + "\n")
    return path


def reference_lines(rows: list[dict[str, Any]], columns: list[str], key: str, name: str) -> list[str]:
    """The table rows of reference ``key``: one per distinct set of values over the points (one for a sweep of one
    model), labelled ``name`` in the first empty cell (with the point's label or path when there are several)."""
    found: list[tuple[list[Any], dict[str, Any]]] = []
    for row in rows:
        values = [reference_value([row], c, key) for c in columns]
        if any(v is not None for v in values) and all(values != seen for seen, _ in found):
            found.append((values, row))
    lines = []
    for values, row in found:
        cells = [format_number(v) for v in values]
        label = next((i for i, v in enumerate(values) if v is None), None)
        if label is not None:
            owner = row.get(LABEL, row.get("path"))
            cells[label] = name if len(found) == 1 or owner is None else f"{name}: {format_value(owner)}"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reference_value(rows: list[dict[str, Any]], column: str, key: str = "reference") -> Any:
    """Reference ``key``'s value for a column (first row): ``key.C``, else ``key.C`` less ``_mean``.

    ``cdlm eval`` writes one reference figure per metric (``reference.gen_ppl``, ``unigram_draws.gen_ppl``,
    ``unigram.val_bpc``) beside the generated samples' mean over seeds (``gen_ppl_mean``); a ``*_std`` column has no
    reference value.
    """
    first = rows[0] if rows else {}
    return first.get(f"{key}.{column}", first.get(f"{key}.{column.removesuffix('_mean')}"))


def line_keys(sweep: dict, plot: dict) -> list[str]:
    """Point keys that split a plot into lines: ``plot.lines``, else every grid key but the one behind x.

    When x is a metric (e.g. ``nfe``), the grid key with the most values (over all grids) is taken to drive it.
    """
    if "lines" in plot:
        return list(plot["lines"] or [])
    sizes: dict[str, int] = {}
    for grid in grids(sweep):
        for k, v in grid.items():
            sizes[k] = max(sizes.get(k, 1), len(v) if isinstance(v, list) else 1)
    if not sizes:
        return []
    driver = plot["x"] if plot["x"] in sizes else max(sizes, key=sizes.__getitem__)
    return [k for k in sizes if k != driver]


def line_label(keys: list[str], group: tuple) -> str | None:
    """A legend entry: ``key=value`` pairs, a label by its value alone."""
    parts = [format_value(v) if k == LABEL else f"{k}={format_value(v)}" for k, v in zip(keys, group)]
    return ", ".join(parts) or None


def write_plot(rows: list[dict[str, Any]], plot: dict, keys: list[str], path: Path) -> Path:
    """``plot.y`` against ``plot.x``, one line per combination of the ``keys`` values, annotated points."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting a sweep needs matplotlib: pip install 'cdlm[plot]'") from err
    x, y, annotate = plot["x"], plot["y"], plot.get("annotate")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if isinstance(row.get(x), (int, float)) and isinstance(row.get(y), (int, float)):
            groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    many = len(groups) > 6  # a long legend goes beside the axes
    fig = Figure(figsize=(9.6 if many else 6.4, 5.4 if many else 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (group, members) in enumerate(groups.items()):
        members.sort(key=lambda r: r[x])
        xs, ys = [r[x] for r in members], [r[y] for r in members]
        style = {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i // 10 % len(LINESTYLES)]}
        ax.plot(xs, ys, **style, label=line_label(keys, group))  # past 10 lines the colours repeat, dashed
        for r in members:
            if annotate and r.get(annotate) is not None:
                ax.annotate(
                    format_number(r[annotate]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    draw_reference(ax, rows, y, annotate)
    ax.set_xscale("log" if plot.get("logx") else "linear")
    ax.set_yscale("log" if plot.get("logy") else "linear")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    title = plot.get("title") or f"{y} vs {x}"
    ax.set_title(f"{title}\n(points labelled with {annotate})" if annotate else title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    fig.savefig(path, dpi=120)
    return path


def draw_reference(ax: Any, rows: list[dict[str, Any]], y: str, annotate: str | None) -> None:
    """A grey line at each reference row's ``y`` (real text, unigram draws, unigram bound), its ``annotate`` value in
    the legend."""
    for key, name, style in REFERENCES:
        reference = reference_value(rows, y, key)
        if not isinstance(reference, (int, float)) or isinstance(reference, bool):
            continue
        label = f"{name} {y} {format_number(reference)}"
        beside = reference_value(rows, annotate, key) if annotate else None
        if isinstance(beside, (int, float)) and not isinstance(beside, bool):
            label += f" ({annotate} {format_number(beside)})"
        ax.axhline(reference, color="grey", linestyle=style, linewidth=1, label=label)


def sweep_arguments(argv: list[str]) -> tuple[str, bool, bool, list[str]]:
    """``cdlm sweep <sweep.yaml> [key=value ...] [--print] [--skip-done]`` as ``(file, execute, skip_done,
    settings)``; ``settings`` are the ``key=value`` overrides (``apply_settings``)."""
    flags = {a for a in argv if a.startswith("-")}
    settings = [a for a in argv if not a.startswith("-") and "=" in a]
    files = [a for a in argv if not a.startswith("-") and "=" not in a]
    if unknown := sorted(flags - FLAGS):
        raise ConfigError(f"cdlm sweep: unknown flag(s) {unknown}; valid: {sorted(FLAGS)} (see cdlm sweep --help)")
    if len(files) != 1:
        raise ConfigError(f"cdlm sweep takes one sweep file (e.g. {CONFIG_EXAMPLE.name}), got {files or 'none'}")
    return files[0], "--print" not in flags, "--skip-done" in flags, settings


def apply_settings(sweep: dict, settings: list[str]) -> dict:
    """The sweep with command-line ``key=value`` settings: ``out=DIR`` replaces its output folder; any other key
    replaces that key's ``base`` argument (or is added to ``base``) for every point. A key that a grid sets is
    refused: the grid's values are the sweep."""
    sweep = {**sweep, "base": base_args(sweep)}
    grid_keys = {key for grid in grids(sweep) for key in grid}
    for setting in settings:
        key, _, value = setting.partition("=")
        if not CONFIG_KEY.fullmatch(key) or not value:
            raise ConfigError(f"cdlm sweep: {setting!r} is not key=value with a config key (e.g. judge=runs/x/final)")
        if key in grid_keys:
            raise ConfigError(f"cdlm sweep: {key} is set by the sweep's grid ({sorted(grid_keys)}); edit the file")
        if key == "out":
            sweep["out"] = value
            continue
        sweep["base"] = [a for a in sweep["base"] if a.partition("=")[0] != key] + [setting]
    return sweep

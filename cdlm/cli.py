"""Command line: ``cdlm train|prepare|sample|eval|sweep|schedule``; ``--help`` on each; one error path
(docs/runs.md)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

from cdlm import api
from cdlm.config import ConfigError
from cdlm.errors import error_message, exit_status
from cdlm.eval_report import summary
from cdlm.help import command_help, main_help
from cdlm.options import EvalOptions, SampleOptions, ScheduleOptions, parse_options, sample_length
from cdlm.prompt_canvas import canvas
from cdlm.sweep import sweep_arguments
from cdlm.trace import render_html, trace_recorder

for _pattern in (
    "'set_vital' is deprecated",
    ".*LeafSpec.*is deprecated",
    r".*limit_val_batches=1.0\) was configured.*",
):
    warnings.filterwarnings("ignore", message=_pattern)


def sample(argv: list[str]) -> list[dict]:
    """Load a checkpoint, draw samples (sharded over ``devices``), print them and write JSONL / an HTML trace."""
    opts, chosen, overrides = parse_options(argv, SampleOptions, "sample")
    module = api.load_model(opts.path, opts.device)
    node = api.sampler_config(module, chosen, overrides)
    length = sample_length(module.config, opts.length, opts.max_length)
    recorder = None
    if opts.trace is not None:  # the first sample's steps, shown as the objective's display decode (cdlm.trace)
        if opts.devices > 1:
            raise ConfigError("trace= records the sampler steps of one process: use devices=1 with trace=")
        recorder = trace_recorder(module.objective, length, sampler=node.name, steps=node.steps)
        conditioning = opts.conditioning()
        if any(value is not None for value in conditioning.values()):  # the prompt shown as kept at every step
            n = opts.n if conditioning["prompt"] is None else len(conditioning["prompt"])
            try:
                recorder.keep(canvas(module.tokens, n=n, length=length, **conditioning))
            except ValueError as err:
                raise ConfigError(f"{'infill' if opts.infill is not None else 'prompt'}: {err}") from err
    samples = api.draw_samples(module, opts, node, length, callback=recorder)
    if samples_is_rank_zero():
        for i, text in enumerate(samples.texts):
            print(f"===== sample {i} (seed {samples.seeds[i]}) =====\n{text}")
        nfe, seconds = samples.nfe, samples.seconds_per_sample
        print(f"cdlm: {opts.n} samples, sampler={node.name}, NFE {nfe}, {seconds:.3f} s/sample")
        if opts.out is not None:
            write_new(opts.out, "".join(json.dumps(r) + "\n" for r in samples.rows()), opts.overwrite)
        if recorder is not None:
            title = f"{type(module.objective).__name__} sampling trace"
            write_new(opts.trace, render_html(recorder, module.tokenizer, title), opts.overwrite)
    return samples.rows()


def write_new(path: str | Path, text: str, overwrite: bool) -> Path:
    """Write ``text`` to ``path`` whole or not at all: through a temporary file in the same folder, linked into
    place only if ``path`` does not exist yet (or replacing it with ``overwrite``), so two processes writing one
    file never interleave their rows and neither silently replaces the other's file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as err:
                raise ConfigError(f"{path} was written by another process meanwhile; nothing was replaced") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def samples_is_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def train_cmd(argv: list[str]) -> dict:
    """``cdlm train [key=value ...]``: train a run (``cdlm.api.train``); returns the final validation metrics."""
    return api.train(argv).metrics


def evaluate_cmd(argv: list[str]) -> dict:
    """``cdlm eval``: validation bound, Gen PPL + entropy over seeds, the reference row; one JSON file."""
    opts, chosen, overrides = parse_options(argv, EvalOptions, "eval")
    evaluation = api.evaluate_options(opts, chosen, overrides)
    print(summary(evaluation.result))
    print(f"cdlm: wrote {evaluation.path}")
    return evaluation.result


def sweep(argv: list[str]) -> list[dict]:
    """``cdlm sweep configs/sweep/NAME.yaml [key=value ...] [--print] [--skip-done]``: run a grid of train or eval
    points (``key=value``: override the file's base arguments or ``out``)."""
    path, execute, skip_done, settings = sweep_arguments(argv)
    return api.sweep(path, execute=execute, skip_done=skip_done, settings=settings)


def schedule_cmd(argv: list[str]) -> Path:
    """``cdlm schedule path=CKPT [out=FILE.png]``: plot the learned noise schedule of a model that has one."""
    opts, _, _ = parse_options(argv, ScheduleOptions, "schedule")
    out = api.schedule(opts.path, opts.out)
    print(f"cdlm: wrote {out}")
    return out


def prepare_cmd(argv: list[str]) -> Path:
    """``cdlm prepare [experiment=NAME] [data=NAME] [data.KEY=value ...]``: tokenise the run's source into its token
    cache (what training would do on its first launch), and print what it holds."""
    path = api.prepare(argv)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"cdlm: token cache {path} ({manifest['dtype']}, tokenizer {manifest['tokenizer']['name']})")
    for split, sizes in manifest["splits"].items():
        bytes_per_token = sum(f.stat().st_size for f in path.glob(f"{split}.*")) / max(sizes["tokens"], 1)
        print(
            f"cdlm:   {split}: {sizes['tokens']:,} tokens, {sizes['documents']:,} documents, {sizes['chars']:,} "
            f"characters, {bytes_per_token:.3f} bytes/token"
        )
    return path


COMMANDS = {
    "train": train_cmd,
    "prepare": prepare_cmd,
    "sample": sample,
    "eval": evaluate_cmd,
    "sweep": sweep,
    "schedule": schedule_cmd,
}


def main(argv: list[str] | None = None) -> None:
    """``cdlm COMMAND [key=value ...]``; ``--help`` on any command. A user error prints ``cdlm: error: ...`` and
    exits 2 before any work is done; a run that fails (a diverged loss, a failed sweep point) exits 1."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"cdlm: error: unknown command {command!r}; valid: {list(COMMANDS)}\n\n{main_help()}", file=sys.stderr)
        raise SystemExit(2)
    if "-h" in rest or "--help" in rest:
        print(command_help(command))
        raise SystemExit(0)
    try:
        COMMANDS[command](rest)
    except Exception as err:  # cdlm.errors: user errors exit 2, failed runs 1, anything else keeps its traceback
        status = exit_status(err)
        if status is None:
            raise
        fail(error_message(err), status)


def fail(err: BaseException | str, status: int) -> None:
    print(f"cdlm: error: {err}", file=sys.stderr)
    raise SystemExit(status)

"""Command line: ``cdlm train|prepare|sample|eval|sweep|schedule``; ``--help`` on each; one error path
(docs/runs.md)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cdlm.checkpoint import load
from cdlm.config import ConfigError, compose, instantiate, load_group, sampler_knobs
from cdlm.help import command_help, main_help
from cdlm.module import NonFiniteLoss
from cdlm.options import EvalOptions, SampleOptions, ScheduleOptions, parse_options, resolve_device
from cdlm.samplers import check_knobs, check_steps, get_sampler
from cdlm.sampling import draw, draw_sharded
from cdlm.sweep import SweepError
from cdlm.trace import render_html
from cdlm.training import train

for _pattern in (
    "'set_vital' is deprecated",
    ".*LeafSpec.*is deprecated",
    r".*limit_val_batches=1.0\) was configured.*",
):
    warnings.filterwarnings("ignore", message=_pattern)

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""Errors in what the user asked for (ConfigError, CheckpointError, RunDirError, data errors are ValueErrors):
``cdlm: error: ...`` and exit status 2."""


def sampler_config(module, chosen: str | None, overrides: dict | None) -> DictConfig:
    """The run's sampler config, or the named sampler's defaults, with ``sampler.KEY`` overrides; validated."""
    node = OmegaConf.create(module.config["sampler"])
    if chosen is not None and chosen != node.name:
        node = load_group("sampler", chosen)
    for key, value in (overrides or {}).items():
        if key not in node:
            raise ConfigError(f"unknown sampler option {key!r}; valid keys under sampler: {sorted(node)}")
        node[key] = value
    spec = get_sampler(node.name, module.objective)
    node.steps = check_steps(spec, node.steps)
    node.merge_with(check_knobs(spec, sampler_knobs(node)))
    return node


def check_length(module, length: int) -> int:
    """``length`` within what the model's positions cover."""
    max_len = module.config["model"].get("max_len")
    if max_len is not None and length > max_len:
        raise ConfigError(f"length={length} exceeds the model's max_len={max_len} positions; use length <= {max_len}")
    return length


def sample(argv: list[str]) -> list[dict]:
    """Load a checkpoint, draw samples (sharded over ``devices``), print them and write JSONL / an HTML trace."""
    opts, chosen, overrides = parse_options(argv, SampleOptions, "sample")
    device = resolve_device(opts.device)
    module = load(opts.path, device=device)
    node = sampler_config(module, chosen, overrides)
    length = check_length(module, opts.length or module.config["data"]["seq_len"])
    kwargs = dict(sampler=node.name, steps=node.steps, seed=opts.seed, **sampler_knobs(node))
    recorder = None
    if opts.trace is not None:
        from cdlm.trace import TraceRecorder

        recorder = TraceRecorder(getattr(module.objective, "mask_id", None), sampler=node.name, steps=node.steps)
    if opts.devices > 1:
        accelerator = torch.device(device).type
        samples = draw_sharded(module, opts.n, length, opts.devices, accelerator, batch_size=opts.batch_size, **kwargs)
    else:
        samples = draw(module, opts.n, length, callback=recorder, batch_size=opts.batch_size, **kwargs)
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


def evaluate_cmd(argv: list[str]) -> dict:
    """``cdlm eval``: validation bound, Gen PPL + entropy over seeds, the reference row; one JSON file."""
    from cdlm.evaluate import evaluate, summary, write_result

    opts, chosen, overrides = parse_options(argv, EvalOptions, "eval")
    module = load(opts.path, device=resolve_device(opts.device))
    node = sampler_config(module, chosen, overrides)
    length = check_length(module, opts.length) if opts.length is not None else None
    result = evaluate(
        module,
        opts.judge,
        OmegaConf.to_container(node),
        n=opts.n,
        length=length,
        seeds=opts.seeds,
        val_batches=opts.val_batches,
        reference=opts.reference,
        zero_shot=opts.zero_shot,
        zero_shot_tokens=opts.zero_shot_tokens,
        batch_size=opts.batch_size,
    )
    result["model"] = str(opts.path)
    out = opts.out or str(Path(opts.path).parent / f"eval_{node.name}_{node.steps}.json")
    print(summary(result))
    print(f"cdlm: wrote {write_result(result, out)}")
    return result


def sweep(argv: list[str]) -> list[dict]:
    """``cdlm sweep configs/sweep/NAME.yaml [--print] [--skip-done]``: run a grid of train or eval points."""
    from cdlm.sweep import main_sweep

    return main_sweep(argv)


def schedule_cmd(argv: list[str]) -> Path:
    """``cdlm schedule path=CKPT [out=FILE.png]``: plot the learned noise schedule of a model that has one."""
    opts, _, _ = parse_options(argv, ScheduleOptions, "schedule")
    module = load(opts.path)
    schedule = getattr(module.objective, "schedule", None)
    if not hasattr(schedule, "plot"):
        raise ConfigError(
            f"{type(module.objective).__name__} has no learned table schedule to plot; "
            "`cdlm schedule` plots a bitstream model's entropy-rate schedule"
        )
    out = schedule.plot(opts.out or str(Path(opts.path).parent / "schedule.png"))
    print(f"cdlm: wrote {out}")
    return out


def prepare_cmd(argv: list[str]) -> Path:
    """``cdlm prepare [experiment=NAME] [data=NAME] [data.KEY=value ...]``: tokenise the run's source into its token
    cache (what training would do on its first launch), and print what it holds."""
    datamodule = instantiate(compose(argv).data, "data")
    path = datamodule.token_cache()
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
    "train": train,
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
    except USER_ERRORS as err:  # ConfigError, CheckpointError, RunDirError, data errors are ValueErrors
        fail(err, 2)
    except ModuleNotFoundError as err:
        fail(f"{err}; this needs an optional dependency (pip install 'cdlm[hf,plot]')", 2)
    except (NonFiniteLoss, SweepError) as err:
        fail(err, 1)


def fail(err: BaseException | str, status: int) -> None:
    print(f"cdlm: error: {err}", file=sys.stderr)
    raise SystemExit(status)

"""Command line: ``cdlm train [overrides]`` and ``cdlm sample path=<ckpt|dir> [options]``."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from cdlm.callbacks import ThroughputLogger
from cdlm.checkpoint import CheckpointError, build_module, load, tokenizer_from_state
from cdlm.config import ConfigError, compose, instantiate, load_group, save_config, to_dict
from cdlm.samplers import check_knobs, get_sampler
from cdlm.sampling import draw, draw_sharded

for _pattern in (
    "'set_vital' is deprecated",
    ".*LeafSpec.*is deprecated",
    ".*was called without a model.*",
    ".*there is no last checkpoint available.*",
    r".*limit_val_batches=1.0\) was configured.*",
):
    warnings.filterwarnings("ignore", message=_pattern)

USAGE = """usage:
  cdlm train [experiment=NAME] [GROUP=NAME ...] [key.sub=value ...]
  cdlm sample path=RUN_DIR/final|FILE.ckpt [n=4] [length=L] [seed=0] [sampler=NAME] [sampler.KEY=value]
              [out=FILE.jsonl] [trace=FILE.html] [devices=2] [device=cpu|cuda]
  cdlm eval path=CKPT [judge=AR_CKPT|HF_NAME_OR_PATH] [n=16] [seeds=3] [sampler=NAME] [sampler.KEY=value]
            [out=FILE.json] [val_batches=N]
  cdlm sweep configs/sweep/NAME.yaml [--print] [--skip-done]
  cdlm schedule path=CKPT [out=FILE.png]   (plot a bitstream model's learned entropy-rate schedule)
groups: data model objective sampler trainer; see configs/ and the README's config reference."""


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """``None``: fresh run; ``auto``: ``run_dir/checkpoints/last.ckpt`` if it exists; else an existing path."""
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise CheckpointError(f"resume={resume!r}: no such checkpoint file (use a .ckpt path, 'auto' or null)")
    return str(resume)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    callbacks = [
        instantiate(cfg.checkpoint, dirpath=str(run_dir / "checkpoints")),
        OnExceptionCheckpoint(str(run_dir / "checkpoints"), filename="on_exception"),
        ThroughputLogger(),
    ]
    if cfg.ema is not None:
        callbacks.append(instantiate(cfg.ema))
    logger = CSVLogger(str(run_dir), name="logs")
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir))


def prepare(cfg: DictConfig):
    """Data module, module and trainer for a run config (the tokenizer comes from the checkpoint on resume)."""
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    if ckpt_path is not None:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["cdlm"]["tokenizer"]
        datamodule.set_tokenizer(tokenizer_from_state(state))
    tokenizer = datamodule.prepare_tokenizer()
    module = build_module(to_dict(cfg), tokenizer)
    check_knobs(get_sampler(cfg.sampler.name, module.objective), sampler_knobs(cfg.sampler))
    return datamodule, module, build_trainer(cfg, run_dir), ckpt_path


def sampler_knobs(node: DictConfig | dict) -> dict:
    return {k: v for k, v in dict(node).items() if k not in ("name", "steps")}


def train(argv: list[str]) -> dict:
    """Train a run; print validation BPC and samples; return the final validation metrics."""
    cfg = compose(argv)
    run_dir = Path(cfg.run_dir)
    datamodule, module, trainer, ckpt_path = prepare(cfg)
    if trainer.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
        params = sum(p.numel() for p in module.parameters())
        print(f"cdlm: {type(module.objective).__name__}, {params / 1e6:.2f} M parameters, run dir {run_dir}")
        if ckpt_path:
            print(f"cdlm: resuming from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = final_validation(module, trainer, datamodule)
    if trainer.is_global_zero:
        module.save_pretrained(run_dir / "final")
        print(
            f"cdlm: validation bound {metrics['val/bpc']:.4f} bits/char, PPL {metrics['val/ppl']:.2f} "
            f"(NLL {metrics['val/nll']:.4f} nats/token); saved {run_dir / 'final'}"
        )
        print_samples(module, cfg)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def final_validation(module, trainer: L.Trainer, datamodule) -> dict[str, float]:
    """The validation metrics of the final (EMA) weights: those of a validation that ran at the last step, if one
    did (the same weights: EMA is updated before validation), else a fresh ``trainer.validate``."""
    values, step = getattr(module, "validated_at", (None, None))
    if values is not None and step == trainer.global_step:
        return {f"val/{k}": v for k, v in values.items()}
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=None, verbose=False)
    return {k: float(v) for k, v in results[0].items()}


def print_samples(module, cfg: DictConfig) -> None:
    s, node = cfg.sample, cfg.sampler
    samples = draw(module, s.n, s.length, node.name, node.steps, s.seed, **sampler_knobs(node))
    print(f"cdlm: {s.n} samples, sampler={node.name}, NFE {samples.nfe}, {samples.seconds_per_sample:.2f} s/sample")
    for i, text in enumerate(samples.texts):
        print(f"===== sample {i} =====\n{text}")


SAMPLE_OPTIONS = {"path", "n", "length", "seed", "out", "device", "devices", "trace", "batch_size"}
EVAL_OPTIONS = {"path", "judge", "n", "length", "seeds", "out", "device", "val_batches", "reference"}


def parse_options(argv: list[str], valid: set[str], command: str) -> tuple[DictConfig, str | None]:
    """``key=value`` options plus ``sampler=NAME`` and ``sampler.KEY=value``; unknown keys fail listing the valid."""
    pairs = [_pair(a) for a in argv]
    chosen = next((v for k, v in pairs if k == "sampler"), None)
    opts = OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs if k != "sampler"])
    if unknown := sorted(set(opts) - valid - {"sampler"}):
        raise ConfigError(f"unknown {command} option(s) {unknown}; valid: {sorted(valid)}, sampler=NAME, sampler.K=v")
    if "path" not in opts:
        raise ConfigError(f"{command} needs path=<save_pretrained folder or .ckpt file>")
    return opts, chosen


def _pair(arg: str) -> tuple[str, str]:
    if "=" not in arg:
        raise ConfigError(f"option {arg!r} is not of the form key=value")
    key, value = arg.split("=", 1)
    return key, value


def sampler_config(module, chosen: str | None, overrides: DictConfig | None) -> DictConfig:
    """The run's sampler config, or the named sampler's defaults, with ``sampler.KEY`` overrides; validated."""
    node = OmegaConf.create(module.config["sampler"])
    if chosen is not None and chosen != node.name:
        node = load_group("sampler", chosen)
    for key, value in (overrides or {}).items():
        if key not in node:
            raise ConfigError(f"unknown sampler option {key!r}; valid keys under sampler: {sorted(node)}")
        node[key] = value
    check_knobs(get_sampler(node.name, module.objective), sampler_knobs(node))
    return node


def sample(argv: list[str]) -> list[dict]:
    """Load a checkpoint, draw samples (sharded over ``devices``), print them and write JSONL / an HTML trace."""
    opts, chosen = parse_options(argv, SAMPLE_OPTIONS, "sample")
    module = load(opts.path, device=opts.get("device", "cpu"))
    node = sampler_config(module, chosen, opts.get("sampler"))
    kwargs = dict(sampler=node.name, steps=node.steps, seed=opts.get("seed", 0), **sampler_knobs(node))
    n, length, devices = opts.get("n", 4), opts.get("length", module.config["data"]["seq_len"]), opts.get("devices", 1)
    recorder = None
    if "trace" in opts:
        from cdlm.trace import TraceRecorder, write_html

        recorder = TraceRecorder(getattr(module.objective, "mask_id", None), sampler=node.name, steps=node.steps)
    if devices > 1:
        samples = draw_sharded(module, n, length, devices, opts.get("device", "cpu"), **kwargs)
    else:
        samples = draw(module, n, length, callback=recorder, batch_size=opts.get("batch_size"), **kwargs)
    if samples_is_rank_zero():
        for i, text in enumerate(samples.texts):
            print(f"===== sample {i} (seed {samples.seeds[i]}) =====\n{text}")
        print(f"cdlm: {n} samples, sampler={node.name}, NFE {samples.nfe}, {samples.seconds_per_sample:.3f} s/sample")
        if "out" in opts:
            Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.out).write_text("".join(json.dumps(r) + "\n" for r in samples.rows()))
        if recorder is not None:
            title = f"{type(module.objective).__name__} sampling trace"
            write_html(recorder, module.tokenizer, opts.trace, title=title)
    return samples.rows()


def samples_is_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def evaluate_cmd(argv: list[str]) -> dict:
    """``cdlm eval``: validation bound, Gen PPL + entropy over seeds, the reference row; one JSON file."""
    from cdlm.evaluate import evaluate, summary, write_result

    opts, chosen = parse_options(argv, EVAL_OPTIONS, "eval")
    module = load(opts.path, device=opts.get("device", "cpu"))
    node = sampler_config(module, chosen, opts.get("sampler"))
    result = evaluate(
        module,
        opts.get("judge"),
        OmegaConf.to_container(node),
        n=opts.get("n", 16),
        length=opts.get("length"),
        seeds=opts.get("seeds", 3),
        val_batches=opts.get("val_batches"),
        reference=opts.get("reference", True),
    )
    result["model"] = str(opts.path)
    out = opts.get("out", str(Path(opts.path).parent / f"eval_{node.name}_{node.steps}.json"))
    print(summary(result))
    print(f"cdlm: wrote {write_result(result, out)}")
    return result


def sweep(argv: list[str]) -> list[dict]:
    """``cdlm sweep configs/sweep/NAME.yaml [--print]``: run a grid of train or eval points and tabulate them."""
    from cdlm.sweep import main_sweep

    return main_sweep(argv)


def schedule_cmd(argv: list[str]) -> Path:
    """``cdlm schedule path=CKPT [out=FILE.png]``: plot the learned noise schedule of a model that has one."""
    opts, _ = parse_options(argv, {"path", "out"}, "schedule")
    module = load(opts.path)
    schedule = getattr(module.objective, "schedule", None)
    if not hasattr(schedule, "plot"):
        raise ConfigError(
            f"{type(module.objective).__name__} has no learned table schedule to plot; "
            "`cdlm schedule` plots a bitstream model's entropy-rate schedule"
        )
    out = schedule.plot(opts.get("out", str(Path(opts.path).parent / "schedule.png")))
    print(f"cdlm: wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train, "sample": sample, "eval": evaluate_cmd, "sweep": sweep, "schedule": schedule_cmd}
    if not argv or argv[0] not in commands:
        print(USAGE)
        raise SystemExit(2)
    try:
        commands[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError) as err:  # ConfigError and CheckpointError are ValueErrors
        print(f"cdlm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err

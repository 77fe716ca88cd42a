"""Command line: ``cdlm train [overrides]`` and ``cdlm sample path=<ckpt|dir> [options]``."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from cdlm.callbacks import ThroughputLogger
from cdlm.checkpoint import CheckpointError, build_module, load, tokenizer_from_state
from cdlm.config import ConfigError, compose, instantiate, save_config, to_dict
from cdlm.samplers import check_knobs, get_sampler

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
  cdlm sample path=RUN_DIR/final|FILE.ckpt [n=4] [length=256] [seed=0] [sampler=NAME] [sampler.KEY=value] [out=FILE]
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
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=None, verbose=False)
    metrics = {k: float(v) for k, v in results[0].items()}
    if trainer.is_global_zero:
        module.save_pretrained(run_dir / "final")
        print(
            f"cdlm: validation bound {metrics['val/bpc']:.4f} bits/char, PPL {metrics['val/ppl']:.2f} "
            f"(NLL {metrics['val/nll']:.4f} nats/token); saved {run_dir / 'final'}"
        )
        print_samples(module, cfg)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def print_samples(module, cfg: DictConfig) -> None:
    s = cfg.sample
    start = time.perf_counter()
    _, texts = module.generate(
        s.n, s.length, cfg.sampler.name, cfg.sampler.steps, seed=s.seed, **sampler_knobs(cfg.sampler)
    )
    seconds = (time.perf_counter() - start) / max(1, s.n)
    print(f"cdlm: {s.n} samples, sampler={cfg.sampler.name}, steps={cfg.sampler.steps}, {seconds:.2f} s/sample")
    for i, text in enumerate(texts):
        print(f"===== sample {i} =====\n{text}")


def sample(argv: list[str]) -> list[dict]:
    """Load a checkpoint and print (and optionally write as JSONL) samples."""
    opts = OmegaConf.from_dotlist([a for a in argv if not a.startswith("sampler=")])
    valid = {"path", "n", "length", "seed", "sampler", "out", "device"}
    if unknown := sorted(set(opts) - valid):
        raise ConfigError(f"unknown sample option(s) {unknown}; valid: {sorted(valid)} and sampler=NAME")
    if "path" not in opts:
        raise ConfigError("sample needs path=<save_pretrained folder or .ckpt file>")
    module = load(opts.path, device=opts.get("device", "cpu"))
    chosen = next((a.split("=", 1)[1] for a in argv if a.startswith("sampler=")), module.config["sampler"]["name"])
    cfg = OmegaConf.create(module.config)
    if chosen != cfg.sampler.name:
        cfg.sampler = OmegaConf.load(Path(__file__).parent / "configs" / "sampler" / f"{chosen}.yaml")
    cfg.sampler = OmegaConf.merge(cfg.sampler, opts.get("sampler", {}))
    n, length, seed = opts.get("n", 4), opts.get("length", 256), opts.get("seed", 0)
    start = time.perf_counter()
    ids, texts = module.generate(n, length, cfg.sampler.name, cfg.sampler.steps, seed, **sampler_knobs(cfg.sampler))
    seconds = (time.perf_counter() - start) / n
    rows = [{"text": t, "ids": i.tolist(), "seed": seed, "seconds": seconds} for t, i in zip(texts, ids)]
    for i, text in enumerate(texts):
        print(f"===== sample {i} =====\n{text}")
    if "out" in opts:
        Path(opts.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train, "sample": sample}
    if not argv or argv[0] not in commands:
        print(USAGE)
        raise SystemExit(2)
    try:
        commands[argv[0]](argv[1:])
    except (ConfigError, CheckpointError) as err:
        print(f"cdlm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err

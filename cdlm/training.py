"""Training a run: build and check everything without writing (``prepare``), then lock the run directory, write,
fit, validate the final weights, save ``final/`` (docs/runs.md)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig

from cdlm import rundir
from cdlm.allocator import release_freed_memory
from cdlm.callbacks import FlopsPerBatch, InterruptCheckpoint, throughput_monitor
from cdlm.checkpoint import (
    CheckpointError,
    build_module,
    check_weights,
    checked_config,
    read_ckpt,
    tokenizer_from_state,
)
from cdlm.components import injected
from cdlm.config import compose, instantiate, sampler_knobs, save_config, to_dict
from cdlm.data.datamodule import TextDataModule
from cdlm.module import DiffusionLM
from cdlm.rundir import Plan
from cdlm.samplers import check_knobs, get_sampler
from cdlm.sampling import draw
from cdlm.strategies import build_strategy, check_sharded_run, full_state_dict, is_sharded


class Run(NamedTuple):
    """Everything a training needs, built and checked before anything is written into the run directory."""

    datamodule: TextDataModule
    module: DiffusionLM
    trainer: L.Trainer
    ckpt_path: str | None
    plan: Plan


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """The Lightning trainer of a run: checkpoints and logs inside ``run_dir`` (the ``logger`` group writes into
    ``run_dir/logs/version_N``, wandb into ``run_dir/wandb``), Lightning's throughput monitor with cdlm's FLOPs,
    cdlm's own distributed sampler (docs/runs.md, "Logs")."""
    callbacks = [
        instantiate(cfg.checkpoint, "checkpoint", dirpath=str(run_dir / "checkpoints")),
        InterruptCheckpoint(run_dir / "checkpoints"),
        FlopsPerBatch(),
        throughput_monitor(cfg.trainer.get("log_every_n_steps") or 50, cfg.trainer.get("accumulate_grad_batches", 1)),
    ]
    if cfg.ema is not None:
        callbacks.append(instantiate(cfg.ema, "ema"))
    paths = {"save_dir": str(run_dir), "dir": str(run_dir), "name": "logs", "version": None, "experiment": None}
    choice = cfg.get("choices", {}).get("logger")
    logger = instantiate(
        cfg.logger,
        f"logger={choice}" if choice else "logger",
        **{k: v for k, v in paths.items() if k in injected(str(cfg.logger._target_))},
    )
    return instantiate(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
        strategy=build_strategy(cfg.trainer.strategy, cfg.sharded_checkpoints),
    )


def prepare(cfg: DictConfig) -> Run:
    """Build and check a run without writing anything: the run-directory plan, the data (tokenised now, so a corpus
    too short fails here), the module, the resume checkpoint's compatibility, the sampler, the trainer."""
    run_dir = Path(cfg.run_dir)
    plan = rundir.plan(run_dir, cfg.resume, cfg.overwrite)
    check_sharded_run(cfg.trainer.strategy, cfg.sharded_checkpoints)
    if cfg.tf32 and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # float32 matmuls on TF32 tensor cores (docs/runs.md, "Speed")
    if cfg.release_freed_memory:
        release_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, "data")
    stored = read_ckpt(Path(plan.ckpt)) if plan.ckpt else None
    if stored is not None:
        check_compatible(checked_config(stored["cdlm"]["config"], Path(plan.ckpt)), to_dict(cfg), plan.ckpt)
        datamodule.set_tokenizer(tokenizer_from_state(stored["cdlm"]["tokenizer"]))
    tokenizer = datamodule.prepare_tokenizer()
    for split in ("train", "validation"):
        datamodule.dataset(split)
    module = build_module(to_dict(cfg), tokenizer)
    if stored is not None:
        check_state(module, stored["state_dict"], Path(plan.ckpt))
    check_knobs(get_sampler(cfg.sampler.name, module.objective), sampler_knobs(cfg.sampler))
    return Run(datamodule, module, build_trainer(cfg, run_dir), plan.ckpt, plan)


def check_compatible(stored: dict, config: dict, ckpt: str) -> None:
    """Refuse to resume a checkpoint whose model, objective or tokenizer differ from this run's, naming the keys."""

    def flat(node: dict, prefix: str) -> dict:
        return {f"{prefix}.{k}": v for k, v in node.items()} if isinstance(node, dict) else {prefix: node}

    keys = ("tokenizer", "tokenizer_name", "vocab_size")
    mine, theirs = {}, {}
    for section in ("model", "objective"):
        mine.update(flat(config.get(section), section))
        theirs.update(flat(stored.get(section), section))
    mine.update({f"data.{k}": config["data"].get(k) for k in keys})
    theirs.update({f"data.{k}": (stored.get("data") or {}).get(k) for k in keys})
    if diffs := [
        f"{k}: checkpoint {theirs.get(k)!r}, this run {mine.get(k)!r}"
        for k in sorted(mine.keys() | theirs.keys())
        if mine.get(k) != theirs.get(k)
    ]:
        raise CheckpointError(
            f"cannot resume {ckpt}: it was trained with other settings ({'; '.join(diffs[:8])}); resume with the "
            "checkpoint's settings, or start a new run with another run_dir"
        )


def check_state(module: DiffusionLM, state: dict, source: Path) -> None:
    """The checkpoint's tensors have this module's names and shapes."""
    try:
        check_weights(module, state, source)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {err}") from err


def train(argv: list[str]) -> dict:
    """Train a run; print validation BPC and samples; return the final validation metrics."""
    cfg = compose(argv)
    run_dir = Path(cfg.run_dir)
    run = prepare(cfg)
    lead = rundir.is_launcher_rank()
    with rundir.RunLock(run_dir) if lead else nullcontext():
        if lead:
            if rundir.plan(run_dir, cfg.resume, cfg.overwrite) != run.plan:  # another process changed the dir
                raise rundir.RunDirError(f"run_dir={str(run_dir)!r} changed while this run was being built; retry")
            if run.plan.discard:
                rundir.discard(run_dir)
            save_config(cfg, run_dir / "config.yaml")
            params = sum(p.numel() for p in run.module.parameters())
            print(f"cdlm: {type(run.module.objective).__name__}, {params / 1e6:.2f} M parameters, run dir {run_dir}")
            print(f"cdlm: {run.plan.message}")
        return fit_and_finish(cfg, run)


def slow_bf16_warning(trainer: L.Trainer) -> str | None:
    """A warning when bf16 autocast runs on a CPU without native bf16 matmuls (no AVX512-BF16 / AMX), where it is
    two to three orders of magnitude slower than float32."""
    if "bf16" not in str(trainer.precision) or not isinstance(trainer.accelerator, CPUAccelerator):
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None
    if native:
        return None
    return (
        f"cdlm: warning: trainer.precision={trainer.precision} on a CPU without native bf16 matmuls "
        f"({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 / AMX): bf16 runs far slower than float32 "
        "here; pass trainer.precision=32-true (figures then differ slightly from bf16 runs)"
    )


def fit_and_finish(cfg: DictConfig, run: Run) -> dict:
    """Fit, validate the final weights, save ``final/`` and ``metrics.json``, print samples."""
    run_dir, module, trainer = Path(cfg.run_dir), run.module, run.trainer
    if trainer.is_global_zero and (warning := slow_bf16_warning(trainer)):
        print(warning)
    trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    metrics = final_validation(module, trainer, run.datamodule)
    sharded = is_sharded(trainer)
    state = full_state_dict(module, sharded)  # sharded weights: a collective on every rank
    if trainer.is_global_zero:
        module.save_pretrained(run_dir / "final", state)
        print(
            f"cdlm: validation bound {metrics['val/bpc']:.4f} bits/char, PPL {metrics['val/ppl']:.2f} "
            f"(NLL {metrics['val/nll']:.4f} nats/token); saved {run_dir / 'final'}"
        )
    if trainer.is_global_zero or sharded:  # a sharded network runs its forward on every rank together
        print_samples(module, cfg, show=trainer.is_global_zero)
    if trainer.is_global_zero:
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


def print_samples(module, cfg: DictConfig, show: bool = True) -> None:
    """Print (with ``show``) ``sample.n`` samples drawn in the training precision (bf16 autocast for bf16 runs,
    else float32)."""
    s, node = cfg.sample, cfg.sampler
    dtype = torch.bfloat16 if "bf16" in str(cfg.trainer.precision) else None
    samples = draw(module, s.n, s.length, node.name, node.steps, s.seed, dtype=dtype, **sampler_knobs(node))
    if not show:
        return
    print(f"cdlm: {s.n} samples, sampler={node.name}, NFE {samples.nfe}, {samples.seconds_per_sample:.2f} s/sample")
    for i, text in enumerate(samples.texts):
        print(f"===== sample {i} =====\n{text}")

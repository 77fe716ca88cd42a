"""``--help`` texts of every entry point, built from the configs and registries (so they list what exists)."""

from __future__ import annotations

from omegaconf import OmegaConf

from cdlm.config import CONFIG_DIR, GROUPS, SAMPLE_LENGTH, SAMPLE_N, group_options, load_group, locate
from cdlm.options import EvalOptions, SampleOptions, ScheduleOptions, describe_options

COMMANDS = {
    "train": "train a model (python train.py ... is the same)",
    "prepare": "tokenise a run's source once into its memory-mapped token cache",
    "sample": "draw samples from a trained model (python sample.py ... is the same)",
    "eval": "validation bound, Gen PPL and entropy over seeds, as one JSON",
    "sweep": "run cdlm eval or cdlm train over a grid from a YAML file; tabulate and plot",
    "schedule": "plot a bitstream model's learned entropy-rate schedule",
}


def main_help() -> str:
    lines = [f"  cdlm {name:<9} {text}" for name, text in COMMANDS.items()]
    return "usage: cdlm COMMAND [key=value ...]   (cdlm COMMAND --help for its options)\n\ncommands:\n" + "\n".join(
        lines
    )


def fitting_samplers(target: str) -> list[str]:
    """The samplers whose space (and required protocol) the objective class ``target`` has."""
    from cdlm.samplers import SAMPLERS

    cls = locate(target)

    def has_methods(protocol: type | None) -> bool:  # a class, not an instance: compare the protocol's methods
        names = [n for n in dir(protocol) if not n.startswith("_") and callable(getattr(protocol, n))]
        return protocol is None or all(callable(getattr(cls, n, None)) for n in names)

    return sorted(n for n, spec in SAMPLERS.items() if spec.space == cls.space and has_methods(spec.requires))


def group_lines(group: str, default: str) -> list[str]:
    """One line per file of ``group`` (``*`` marks the default); objectives and samplers say more."""
    lines = []
    for name in group_options(group):
        node = load_group(group, name)
        mark = "*" if name == default else " "
        if group == "objective":
            target = str(node._target_)
            extra = f"{target.rsplit('.', 1)[-1]:<22} samplers: {', '.join(fitting_samplers(target))}"
        elif group == "sampler":
            options = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("name", "steps")}
            extra = f"{node.name}, steps={node.steps} " + " ".join(f"{k}={v}" for k, v in options.items())
        else:
            extra = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        lines.append(f"    {name + mark:<20} {extra}")
    return lines


def train_help() -> str:
    defaults = dict(OmegaConf.load(CONFIG_DIR / "config.yaml").defaults)
    lines = [
        "usage: python train.py [experiment=NAME|FILE.yaml] [GROUP=NAME ...] [key.sub=value ...]   (or cdlm train)",
        "",
        "Train a diffusion LM; every option is key=value (see the README's configuration reference).",
        "",
        "run settings (default):",
        "  run_dir=runs/default     where checkpoints/, logs/, final/, config.yaml and metrics.json go",
        "  resume=null              null: a fresh run (refused if run_dir holds a run); auto: resume",
        "                           run_dir/checkpoints/last.ckpt if present; or a path/to/file.ckpt",
        "  overwrite=false          true: discard run_dir's previous run (checkpoints, logs, final/) first",
        "  seed=0                   the run's seed (data order, noise, initial weights)",
        "  release_freed_memory=true  freed CPU tensors of 4 MB or more go back to the system: flat resident",
        "                           memory; false: faster CPU steps, a growing heap (docs/runs.md)",
        "  tf32=true                on CUDA, float32 matmuls run on TF32 tensor cores; false: full float32",
        "  sharded_checkpoints=false  trainer=fsdp: true writes each checkpoint as per-rank shards (a directory)",
        f"  sample.n={SAMPLE_N} sample.length={SAMPLE_LENGTH} sample.seed=0   the samples printed after training",
        "",
        f"experiments (experiment=NAME): {', '.join(group_options('experiment'))}",
        "",
        "config groups (GROUP=NAME; * marks the default):",
    ]
    for group in GROUPS:
        lines += [f"  {group}:", *group_lines(group, str(defaults[group]))]
    lines += [
        "",
        "any key of a group or section: GROUP.KEY=value, e.g. model.depth=6 trainer.max_steps=1000",
        "  objective.schedule=cosine data.source=my.txt module.lr=1e-3 ema=null trainer.devices=2",
        "logger=tensorboard / logger=wandb need pip install 'cdlm[tensorboard]' / 'cdlm[wandb]' (docs/runs.md, Logs)",
    ]
    return "\n".join(lines)


def sampler_help() -> str:
    from cdlm.samplers import SAMPLERS

    lines = ["samplers (sampler=NAME, then sampler.KEY=value; the run's own sampler is the default):"]
    for name, spec in sorted(SAMPLERS.items()):
        lines.append(f"  {name} ({spec.space} objectives):")
        lines += [f"    {line}" for line in spec.describe().splitlines()]
    return "\n".join(lines)


def command_help(command: str) -> str:
    """The ``--help`` text of ``command``."""
    if command == "train":
        return train_help()
    if command == "prepare":
        return (
            "usage: cdlm prepare [experiment=NAME] [data=NAME] [data.KEY=value ...]\n\n"
            "Tokenise the source of a run's data config into its token cache (docs/data.md), as the first launch of\n"
            "`train` would, and print its splits. Keys are those of `train` (see cdlm train --help), e.g.\n"
            "  cdlm prepare data=owt data.prepare_workers=16\n"
            "  cdlm prepare data=shakespeare_bpe data.source=my_corpus/ data.cache_dir=/scratch/cdlm\n"
            f"\ndata configs: {', '.join(group_options('data'))}"
        )
    if command == "sweep":
        return (
            "usage: cdlm sweep FILE.yaml [key=value ...] [--print] [--skip-done]\n\n"
            "Run cdlm eval or cdlm train at every point of the sweep file's grid, then write results.csv,\n"
            "results.md and plots into its out folder (example files: cdlm/configs/sweep/).\n\n"
            "  key=value     for this run only: out=DIR moves the results; any other key replaces that key of\n"
            "                the file's base arguments for every point, e.g. judge=runs/ar_judge/final\n"
            "  --print       print one command per point (for a cluster scheduler) instead of running them\n"
            "  --skip-done   keep points whose result file exists; run only the others\n"
            f"\nsweep files shipped: {', '.join(group_options('sweep'))}"
        )
    cls, usage = {
        "sample": (SampleOptions, "python sample.py path=RUN_DIR/final [key=value ...]   (or cdlm sample)"),
        "eval": (EvalOptions, "cdlm eval path=RUN_DIR/final [judge=AR_RUN|HF_NAME] [key=value ...]"),
        "schedule": (ScheduleOptions, "cdlm schedule path=RUN_DIR/final [out=FILE.png]"),
    }[command]
    about = cls.__doc__.split(": ", 1)[-1]
    text = f"usage: {usage}\n\n{about[0].upper()}{about[1:]}\n\noptions (default):\n{describe_options(cls)}"
    return text + ("\n\n" + sampler_help() if command in ("sample", "eval") else "")

"""The typed API: every ``cdlm`` command as a function that returns its result and raises instead of exiting.

Bad input raises a ``ValueError`` (``ConfigError``, ``CheckpointError``, ``RunDirError``, data errors), with the
message the command line prints after ``cdlm: error:``; a run that fails raises its own error (``NonFiniteLoss``,
``SweepError``). Nothing here calls ``sys.exit``: ``cdlm.cli`` parses arguments, calls these functions, prints, and
maps errors to exit statuses (``cdlm.errors``); ``cdlm sweep`` runs its points through ``run_point``.

    import cdlm
    run = cdlm.api.train({"experiment": "quickstart", "trainer.max_steps": 200})
    samples = cdlm.api.sample(run.final, n=4, length=128, sampler_options={"steps": 64})
    scores = cdlm.api.evaluate(run.final, judge="gpt2", seeds=1).metrics
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cdlm import training
from cdlm.checkpoint import load
from cdlm.config import SAMPLE_N, ConfigError, compose, instantiate, load_group, sampler_knobs
from cdlm.eval_report import summary, write_result
from cdlm.evaluate import evaluate as evaluation
from cdlm.module import DiffusionLM
from cdlm.objectives.entropy_rate import EntropyRateSchedule
from cdlm.options import (
    DEFAULT_EVAL_N,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_SEEDS,
    EvalOptions,
    SampleOptions,
    ScheduleOptions,
    as_arguments,
    checked,
    parse_options,
    resolve_device,
    sample_length,
)
from cdlm.plots import plot_entropy_rate
from cdlm.samplers import check_knobs, check_steps, get_sampler
from cdlm.sampling import Samples, draw, draw_sharded
from cdlm.sweep import run_sweep
from cdlm.types import SamplerStep

Overrides = Sequence[str] | Mapping[str, Any]
"""Config overrides: ``["model=tiny", "trainer.max_steps=8"]`` or ``{"model": "tiny", "trainer.max_steps": 8}``."""


@dataclass(frozen=True)
class TrainResult:
    """A finished training: its run directory and the final validation metrics (``val/bpc``, ``val/ppl``, ...)."""

    run_dir: Path
    metrics: dict[str, float]

    @property
    def final(self) -> Path:
        """The ``save_pretrained`` folder of the final weights (``RUN_DIR/final``)."""
        return self.run_dir / "final"


@dataclass(frozen=True)
class Evaluation:
    """A ``cdlm eval`` result (metrics, per-seed rows, reference, protocol, model) and the JSON file it went to."""

    result: dict[str, Any]
    path: Path | None

    @property
    def metrics(self) -> dict[str, float]:
        """The flat metrics: ``val_bpc``, ``gen_ppl_mean``, ``entropy_mean``, ``nfe``, ..."""
        return self.result["metrics"]


def train(overrides: Overrides = ()) -> TrainResult:
    """Train the run the overrides describe (``cdlm train``); returns its directory and final validation metrics."""
    argv = as_arguments(overrides)
    run_dir = Path(compose(argv).run_dir)  # a bad override fails here, before anything is built
    return TrainResult(run_dir, training.train(argv))


def prepare(overrides: Overrides = ()) -> Path:
    """Tokenise the run's source into its token cache (``cdlm prepare``); returns the cache folder."""
    return instantiate(compose(as_arguments(overrides)).data, "data").token_cache()


def load_model(path: str | Path, device: str = "auto") -> DiffusionLM:
    """A ``save_pretrained`` folder or ``.ckpt`` on ``device`` (``auto``: cuda where there is one, else cpu)."""
    return load(path, device=resolve_device(device))


def sampler_config(module: DiffusionLM, chosen: str | None, overrides: Mapping[str, Any] | None) -> DictConfig:
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


def sample(
    path: str | Path,
    n: int = SAMPLE_N,
    length: int | str | None = None,
    *,
    max_length: int | None = None,
    sampler: str | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
    devices: int = 1,
    callback: Callable[[SamplerStep], None] | None = None,
    prompt: str | None = None,
    prompt_file: str | Path | None = None,
    suffix: str | None = None,
    infill: str | None = None,
    stop_at_eos: bool = True,
    rope_scale: float = 1.0,
) -> Samples:
    """``n`` samples of ``length`` tokens (default: the run's ``data.seq_len``) from a trained model (``cdlm
    sample``): ``sampler`` (default: the run's) with ``sampler_options`` (``{"steps": 64, "top_p": 0.9}``);
    ``prompt``: a text every sample starts with, or ``prompt_file``: ``n`` samples for each of its prompts;
    ``suffix``: a text every sample ends with; ``infill``: a template of kept text and ``[MASK:k]`` spans
    (docs/sampling.md, "Prompts"); ``stop_at_eos``: each sample ends at its first generated EOS (padding after
    it); ``length="auto"``: up to ``max_length`` (default: the run's ``data.seq_len``), each sample ending at its
    EOS; ``rope_scale``:
    NTK-aware rotary scaling, to sample that many times the trained length (docs/sampling.md)."""
    opts = checked(
        SampleOptions,
        path=str(path),
        n=n,
        length=length,
        max_length=max_length,
        seed=seed,
        batch_size=batch_size,
        device=device,
        devices=devices,
        prompt=prompt,
        prompt_file=None if prompt_file is None else str(prompt_file),
        suffix=suffix,
        infill=infill,
        stop_at_eos=stop_at_eos,
        rope_scale=rope_scale,
    )
    module = load_model(opts.path, opts.device)
    node = sampler_config(module, sampler, sampler_options)
    return draw_samples(module, opts, node, sample_length(module.config, opts.length, opts.max_length), callback)


def draw_samples(
    module: DiffusionLM,
    opts: SampleOptions,
    node: DictConfig,
    length: int,
    callback: Callable[[SamplerStep], None] | None = None,
) -> Samples:
    """Draw ``opts.n`` samples of ``length`` tokens (``sample_length``) from a loaded model with a checked sampler
    config (``sampler_config``), sharded over ``opts.devices`` processes when more than one (``callback`` unused)."""
    kwargs = dict(sampler=node.name, steps=node.steps, seed=opts.seed, **sampler_knobs(node))
    kwargs["stop_at_eos"] = opts.stop_at_eos
    if opts.rope_scale != 1:
        module.rescale_rotary(opts.rope_scale)
    if opts.devices > 1:
        accelerator = torch.device(resolve_device(opts.device)).type
        return draw_sharded(module, opts.n, length, opts.devices, accelerator, batch_size=opts.batch_size, **kwargs)
    conditioning = opts.conditioning()
    n = opts.n if conditioning["prompt"] is None else len(conditioning["prompt"])
    try:
        return draw(module, n, length, callback=callback, batch_size=opts.batch_size, **conditioning, **kwargs)
    except ValueError as err:  # a prompt the sampler cannot keep, or that leaves nothing to generate
        if not any(value is not None for value in conditioning.values()):
            raise
        name = "infill" if opts.infill is not None else "prompt"
        raise ConfigError(f"{name}: {err}") from err


def evaluate(
    path: str | Path,
    *,
    judge: str | None = None,
    n: int = DEFAULT_EVAL_N,
    length: int | None = None,
    seeds: int = DEFAULT_SEEDS,
    val_batches: int | None = None,
    reference: bool = True,
    zero_shot: list[str] | None = None,
    zero_shot_tokens: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    sampler: str | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    write: bool = True,
    prompts: str | None = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    mauve: bool = False,
    infill_span: int | None = None,
) -> Evaluation:
    """The evaluation protocol of ``cdlm eval`` (docs/math.md §8): validation bound, Gen PPL under ``judge`` and
    entropy over ``seeds``, the reference row, zero-shot bounds; ``prompts="val"``: the conditional protocol
    (continuations of ``prompt_tokens``-token validation prompts, judged given them; ``mauve``: with MAUVE);
    ``infill_span``: infilling accuracy of the middle ``infill_span`` tokens of validation windows. With
    ``write``, the result goes to ``out`` (default: ``eval_<sampler>_<steps>.json`` beside the model)."""
    opts = checked(
        EvalOptions,
        path=str(path),
        judge=judge,
        n=n,
        length=length,
        seeds=seeds,
        val_batches=val_batches,
        reference=reference,
        zero_shot=zero_shot,
        zero_shot_tokens=zero_shot_tokens,
        out=None if out is None else str(out),
        batch_size=batch_size,
        device=device,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        mauve=mauve,
        infill_span=infill_span,
    )
    return evaluate_options(opts, sampler, sampler_options, write=write)


def evaluate_options(
    opts: EvalOptions,
    sampler: str | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    write: bool = True,
) -> Evaluation:
    """``evaluate`` with checked options (``parse_options(argv, EvalOptions, "eval")`` or ``checked``)."""
    module = load_model(opts.path, opts.device)
    node = sampler_config(module, sampler, sampler_options)
    result = evaluation(
        module,
        opts.judge,
        OmegaConf.to_container(node),
        n=opts.n,
        length=opts.length,
        seeds=opts.seeds,
        val_batches=opts.val_batches,
        reference=opts.reference,
        zero_shot=opts.zero_shot,
        zero_shot_tokens=opts.zero_shot_tokens,
        batch_size=opts.batch_size,
        prompts=opts.prompts,
        prompt_tokens=opts.prompt_tokens,
        mauve=opts.mauve,
        infill_span=opts.infill_span,
    )
    result["model"] = str(opts.path)
    out = opts.out or str(Path(opts.path).parent / f"eval_{node.name}_{node.steps}.json")
    return Evaluation(result, write_result(result, out) if write else None)


def schedule(path: str | Path, out: str | Path | None = None) -> Path:
    """Plot the learned noise schedule of a model that has one (``cdlm schedule``); returns the PNG file."""
    opts = checked(ScheduleOptions, path=str(path), out=None if out is None else str(out))
    module = load(opts.path)
    table = getattr(module.objective, "schedule", None)
    if not isinstance(table, EntropyRateSchedule):
        raise ConfigError(
            f"{type(module.objective).__name__} has no learned table schedule to plot; "
            "`cdlm schedule` plots a bitstream model's entropy-rate schedule"
        )
    return plot_entropy_rate(table, opts.out or str(Path(opts.path).parent / "schedule.png"))


def sweep(
    path: str | Path, *, execute: bool = True, skip_done: bool = False, settings: list[str] | None = None
) -> list[dict[str, Any]]:
    """Run the sweep file at ``path`` (``cdlm sweep``): every point's arguments checked first, then each point
    through ``run_point``; returns the result rows (``execute=False``: prints one command per point instead).
    ``settings``: ``key=value`` overrides of the file's ``base`` arguments and ``out`` folder."""
    return run_sweep(path, execute=execute, runner=run_point, skip_done=skip_done, check=True, settings=settings)


def run_point(command: str, args: list[str]) -> None:
    """One sweep point: ``train`` or ``eval`` with its ``key=value`` arguments, printing what the command prints."""
    if command == "train":
        train(args)
    elif command == "eval":
        result = evaluate_options(*parse_options(args, EvalOptions, "eval"))
        print(summary(result.result))
        print(f"cdlm: wrote {result.path}")
    else:
        raise ConfigError(f"a sweep point runs train or eval, not {command!r}")

"""Drawing samples from a trained model: timing, NFE counting, optional traces, sharding over devices."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cdlm.module import DiffusionLM
from cdlm.prompt_canvas import canvas
from cdlm.prompts import Prompt
from cdlm.types import SamplerStep


@dataclass
class Samples:
    """``n`` samples: ids ``[n, L]``, decoded texts, network evaluations per sample and wall seconds per sample."""

    ids: torch.Tensor
    texts: list[str]
    nfe: int
    seconds_per_sample: float
    seeds: list[int] = field(default_factory=list)
    conditions: list[dict] | None = None  # each sample's prompt (text or ids) / suffix / infill, if any
    stops: list[int | None] | None = None  # each sample's first generated EOS (None: ran to its length), if cut

    def rows(self) -> list[dict]:
        """One JSON-ready dict per sample (the JSONL format of ``cdlm sample``; with its ``prompt`` and ``suffix``
        or ``infill`` template when conditioned, and ``stop``, the position of its first generated EOS or null, when
        the samples stop at EOS)."""
        rows = [
            {"text": t, "ids": i.tolist(), "seed": s, "nfe": self.nfe, "seconds": self.seconds_per_sample}
            for t, i, s in zip(self.texts, self.ids, self.seeds)
        ]
        for row, condition in zip(rows, self.conditions or []):
            row.update(condition)
        for row, stop in zip(rows, self.stops or []):
            row["stop"] = stop
        return rows


class NFECounter:
    """A sampler callback that remembers the network evaluations of the last sampler call (and forwards steps)."""

    def __init__(self, forward=None) -> None:
        self.nfe, self.forward = 0, forward

    def __call__(self, step: SamplerStep) -> None:
        self.nfe = step.nfe
        if self.forward is not None:
            self.forward(step)


def draw(
    module: DiffusionLM,
    n: int,
    length: int,
    sampler: str,
    steps: int,
    seed: int,
    callback=None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    prompt: list[str] | list[list[int]] | Prompt | None = None,
    suffix: str | None = None,
    template: list[str] | None = None,
    **knobs,
) -> Samples:
    """Generate ``n`` samples in batches of ``batch_size`` (default: all at once) and time them; ``dtype`` is the
    network's autocast dtype (None = full precision); ``prompt``: one text per sample that it starts with (or a
    ``cdlm.prompts.Prompt`` of fixed positions);
    ``suffix``: a text every sample ends with; ``template``: one infilling template per sample (``generate``)."""
    counter = NFECounter(callback)
    start = time.perf_counter()
    kept = canvas(module.tokens, prompt, template, suffix, n, length)  # the fixed positions, or None
    ids, texts = module.generate(
        n, length, sampler, steps, seed, batch_size=batch_size, dtype=dtype, callback=counter, prompt=kept, **knobs
    )
    seconds = (time.perf_counter() - start) / max(n, 1)
    cut = knobs.get("stop_at_eos")
    cut = module.tokenizer is not None if cut is None else cut  # generate's default
    ends = module.stops(ids, None if kept is None else kept.fixed) if cut else None
    return Samples(ids, texts, counter.nfe, seconds, [seed] * n, conditions(n, prompt, suffix, template), ends)


def conditions(
    n: int, prompt: list[str] | list[list[int]] | Prompt | None, suffix: str | None, template: list[str] | None
) -> list[dict] | None:
    """Each sample's conditioning texts for its JSONL row (``prompt``, ``suffix``, ``infill``), or None."""
    if isinstance(prompt, Prompt):  # fixed positions on a canvas (cdlm eval infill_span=): no texts to record
        prompt = None
    if prompt is None and suffix is None and template is None:
        return None
    rows: list[dict] = [{} for _ in range(n)]
    for row, text in zip(rows, prompt or []):
        row["prompt"] = text
    for row, text in zip(rows, template or []):
        row["infill"] = text
    for row in rows if suffix is not None else []:
        row["suffix"] = suffix
    return rows


def draw_sharded(
    module: DiffusionLM,
    n: int,
    length: int,
    devices: int,
    accelerator: str,
    batch_size: int | None = None,
    **kwargs,
) -> Samples:
    """Shard ``n`` samples over ``devices`` processes (Lightning Fabric, DDP) and gather them on every rank.

    Rank ``r`` draws ``ceil(n / devices)`` samples with seed ``seed + r`` (so samples differ across ranks), in
    batches of ``batch_size`` per sampler call as ``draw`` (default: all of the rank's samples at once); the
    gathered result keeps the first ``n``. Launching re-runs the current command in the other processes.
    """
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, strategy="ddp")
    fabric.launch()
    module = module.to(fabric.device)
    per_rank = -(-n // fabric.world_size)
    seed = kwargs.pop("seed") + fabric.global_rank
    local = draw(module, per_rank, length, seed=seed, batch_size=batch_size, **kwargs)
    ids = fabric.all_gather(local.ids)  # [W, per_rank, L]
    seconds = fabric.all_gather(torch.tensor(local.seconds_per_sample, device=fabric.device)).float().mean()
    ids = ids.reshape(-1, ids.shape[-1])[:n].cpu()
    seeds = [seed - fabric.global_rank + r for r in range(fabric.world_size) for _ in range(per_rank)][:n]
    cut = kwargs.get("stop_at_eos")
    texts = module.decode(ids, module.tokenizer is not None if cut is None else cut)
    return Samples(ids, texts, local.nfe, float(seconds), seeds)

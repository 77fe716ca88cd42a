"""Running one sampler over block after block (the block-causal latent prior, Cola DLM; docs/math.md §5).

The objective's ``sample_blocks`` calls a runner once per block; the runner calls the sampler with the run's grid,
generator and options, and renumbers the steps it reports so that ``nfe`` counts network evaluations over all the
blocks so far (what a sweep's NFE column means), not within the current block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from cdlm.samplers.registry import SamplerSpec
from cdlm.types import SamplerStep


class BlockRunner:
    """``runner(view, x_block) -> sampler output``: ``spec.fn`` on one block with NFE counted across blocks."""

    def __init__(
        self,
        spec: SamplerSpec,
        ts: torch.Tensor,
        generator: torch.Generator | None,
        callback: Callable[[SamplerStep], None] | None,
        knobs: dict,
    ) -> None:
        self.spec, self.ts, self.generator, self.callback, self.knobs = spec, ts, generator, callback, knobs
        self.done, self.last = 0, 0  # evaluations of the finished blocks; of the current block so far

    def __call__(self, objective, x: torch.Tensor) -> torch.Tensor:
        self.last = 0
        callback = None if self.callback is None else self.step
        out = self.spec.fn(objective, x, self.ts, generator=self.generator, callback=callback, **self.knobs)
        self.done += self.last
        return out

    def step(self, step: SamplerStep) -> None:
        self.last = step.nfe
        self.callback(replace(step, nfe=self.done + step.nfe))

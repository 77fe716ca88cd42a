"""What a continuous objective's noise schedule provides (docs/math.md §0, §3, §4).

Two kinds of object are called a schedule in cdlm, and they answer different questions:

- a masked objective's ``schedule`` (``cdlm.objectives.schedules.Schedule``, ``cdlm.types.MaskSchedule``) gives
  ``alpha(t)``, the probability that a token is still visible at time ``t`` (docs/math.md §1); the discrete samplers
  read it to know how many positions a step unmasks;
- a continuous objective's noise schedule (``NoiseSchedule``) gives the VE noise level ``sigma(t)``: LangFlow's
  learned Gumbel law of ``gamma = 2 log sigma`` (``GumbelSchedule``, docs/math.md §3) and bitstream's learned
  entropy-rate law (``EntropyRateSchedule``, §4). The samplers never read it directly: they call the objective's
  ``sigma(t)`` (``cdlm.types.ContinuousObjective``), which delegates to it; the objective draws its training noise
  from the same law.

Both continuous objectives keep their noise schedule under the attribute ``schedule`` because it is a submodule whose
parameters and buffers are saved under ``objective.schedule.*``: renaming the attribute would rename those keys in
every saved checkpoint (``.ckpt``, ``model.safetensors``, sharded shards, EMA state).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class NoiseSchedule(Protocol):
    """A continuous objective's law of noise levels.

    - ``sigma_of_t(t)``: sampler time ``t`` in [0, 1] (1 = noise, any shape) -> the VE noise level ``sigma``, float64,
      same shape, increasing in ``t``; ``sigma_of_t(0)`` and ``sigma_of_t(1)`` are the objective's ``sigma_min`` and
      ``sigma_max``. Uniform ``t`` is the schedule's training law, so a uniform sampler grid spends equal
      information per step (docs/math.md §0).
    - ``logs()``: scalars describing the current law, for the training log.
    """

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor: ...

    def logs(self) -> dict[str, torch.Tensor]: ...

"""The flow-map sampler of FMLM (Lee et al. 2026, "Flow map language models"), docs/math.md §2.

``K`` jumps (1 to 32) of a learned flow map over a grid uniform in the objective's sampler time (where FLM's
information-uniform warp lives). A jump from ``sigma_s`` to ``sigma_t`` is one call of the two-time denoiser
``D = objective.flow_denoise(x, sigma_s, sigma_t)`` and the DDIM step ``x <- D + (sigma_t / sigma_s)(x - D)``, which
is the flow map ``X_{s->t}`` written in VE coordinates (``cdlm.objectives.flow_map``); NFE = K.

Optional renoising between jumps, the gamma-sampling of CTM (Kim et al. 2024, "Consistency trajectory models"): jump
to ``sigma' = max(sqrt(1 - gamma^2) sigma_next, sigma_min)`` instead of ``sigma_next``, then add fresh noise of
variance ``sigma_next^2 - sigma'^2``, which lands on ``sigma_next`` again. ``gamma = 0`` is the deterministic flow map,
``gamma = 1`` jumps to the data end and renoises fully (consistency-model multistep sampling). The last jump never
renoises, so one jump ignores ``gamma``. The result is the argmax of the last ``D`` (docs/math.md §2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from cdlm.prompts import Prompt
from cdlm.samplers.continuous import continuous_grid
from cdlm.samplers.coordinates import StateCoordinates
from cdlm.samplers.registry import SAMPLERS, Range, register_sampler, unfit_message
from cdlm.samplers.state import NetworkInputs, StateNoise, euler_
from cdlm.types import FlowMapObjective, SamplerStep

MAX_JUMPS = 32  # docs/math.md §2: the flow map is for 1-32 jumps; more steps is the ODE (euler/heun on the diagonal)


@register_sampler(
    "flowmap",
    space="continuous",
    grid=continuous_grid,
    requires=FlowMapObjective,
    knobs={"gamma": Range(0, 1, note="0 = deterministic")},
    steps=Range(1, MAX_JUMPS, note="for more steps use euler or heun"),
)
@torch.no_grad()
def sample_flowmap(
    objective: FlowMapObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    fixed: Prompt | None = None,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Flow-map jumps from ``x`` ``[B, L, D]`` (a prior draw) over ``ts`` ``[K + 1]`` (1 = noise down to 0), ``K`` in
    1..32; ``gamma`` in [0, 1] renoises between jumps. Returns ids ``[B, L]``; NFE = K."""
    if not isinstance(objective, FlowMapObjective):
        raise ValueError(unfit_message(SAMPLERS["flowmap"], objective))
    steps = len(ts) - 1
    if not 1 <= steps <= MAX_JUMPS:
        raise ValueError(f"flowmap takes 1 to {MAX_JUMPS} jumps, got {steps}; for more steps use euler or heun")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (0 = deterministic), got {gamma}")
    coordinates = StateCoordinates(objective, x, fixed)  # x itself, or x @ P (cdlm.samplers.coordinates)
    x = coordinates.initial.to(torch.float64, copy=True)  # [B, L, D|K], owned: updated in place (cdlm.samplers.state)
    sigmas = objective.sigma(ts.double())  # [K + 1] float64, decreasing along the grid
    noise = StateNoise(x, generator, steps - 1) if gamma > 0 and steps > 1 else None
    inputs = NetworkInputs(x)
    x_in = inputs.next().copy_(x)  # [B, L, D] float32: the next jump's network input
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        renoise = gamma > 0 and i < steps - 1
        target = sigma_next * math.sqrt(1 - gamma**2) if renoise else sigma_next
        target = target.clamp_min(objective.sigma_min) if renoise else target
        rows = x.shape[0]
        d, d_state = coordinates.flow_denoise(x_in, sigma.float().expand(rows), target.float().expand(rows))
        x_in = inputs.next() if i < steps - 1 else None
        # the flow map X_{s->t}(x) = euler_step(x, d, sigma, target), then (renoise) x + sqrt(..) eps, in one pass
        eps, scale = (
            (coordinates.noise(noise.take()), (sigma_next**2 - target**2).clamp_min(0).sqrt())
            if renoise
            else (None, None)
        )
        with noise.overlap() if renoise else nullcontext():  # the next draw is made meanwhile
            euler_(x, d_state, target / sigma, x_in, eps, scale)
        if callback is not None:
            callback(SamplerStep(index=i, t=float(ts[i + 1]), x=x, x0=d, nfe=i + 1))
    ids = objective.decode(d)
    return ids if fixed is None else fixed.apply(ids)

"""Samplers shared by every continuous objective, in VE coordinates ``x~ = x0 + sigma eps`` (docs/math.md §0).

- ``euler``: the probability-flow ODE ``dx/dsigma = (x - x0_hat) / sigma`` (Song et al. 2021) by Euler steps, which
  is deterministic DDIM on any of the paths of docs/math.md §0 (``euler_step``).
- ``heun``: Karras et al. 2022 ("EDM"), Algorithm 1's second evaluation on every step but the last, combined as
  docs/math.md §0 says: the DDIM step with the mean of the two clean estimates (equal to EDM's trapezoid to second
  order, and bounded where the trapezoid in ``sigma`` is not: on intervals spanning a large noise ratio).
- ``churn``: EDM Algorithm 2 (stochastic "churn") as the entropy-gated corrector of docs/math.md §4, made
  generic: noise is added only while the grid time lies in the window ``[t_lo, t_hi]`` of the objective's
  information-uniform sampler time.

Each sampler keeps its state in float64, in the coordinates ``cdlm.samplers.coordinates`` picks (``x`` itself, or
``x @ P`` where the network reads only that: FLM), and calls the network in float32; the last step takes the clean
estimate, which ``objective.decode`` turns into token ids (docs/math.md §2), or, for an objective whose final decode
is one more self-conditioned pass (``FinalPass``: LangFlow), the final state and the last estimate go to that pass.

The state and its updates are ``cdlm.samplers.state``'s: one float64 buffer updated in place, chunk by chunk, with
the values of the formulas written here; the callback therefore sees the sampler's buffer (``SamplerStep``: valid
until the callback returns) and the network's own clean estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from cdlm.prompts import Prompt
from cdlm.samplers.coordinates import StateCoordinates
from cdlm.samplers.registry import Ordered, Range, register_sampler
from cdlm.samplers.state import NetworkInputs, StateNoise, euler_, heun_correct_, heun_predict_, perturb_
from cdlm.types import ContinuousObjective, FinalPass, SamplerStep

MAX_CHURN = math.sqrt(2.0) - 1.0  # EDM Alg. 2: gamma_i <= sqrt(2) - 1 keeps sigma_hat <= sqrt(2) sigma_i


def continuous_grid(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``linspace(1, 0, steps + 1)`` float64: uniform in sampler time; ``objective.sigma(t)`` holds the warp."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)


def _per_row(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """A ``[B]`` tensor reshaped to broadcast against ``x`` ``[B, ...]``; scalars pass through."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and x.dim() > 1:
        return value.reshape(-1, *([1] * (x.dim() - 1)))
    return value


def euler_step(
    x: torch.Tensor, x0_hat: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step of ``dx/dsigma = (x - x0_hat) / sigma`` from ``sigma`` to ``sigma_next`` (docs/math.md §0).

    ``x0_hat + (sigma_next / sigma) (x - x0_hat)``: exactly deterministic DDIM (Song et al. 2021) on the linear, VP
    and VE paths. ``sigma`` and ``sigma_next`` are scalars, 0-d tensors or ``[B]``; ``x``, ``x0_hat`` ``[B, ...]``.
    """
    ratio = _per_row(sigma_next, x) / _per_row(sigma, x)
    return torch.sub(x, x0_hat).mul_(ratio).add_(x0_hat)  # one new tensor in x's dtype


class _Denoiser:
    """Calls the network through the state's coordinates on the float32 input, counts calls and carries
    self-conditioning."""

    def __init__(self, coordinates: StateCoordinates, self_cond: bool) -> None:
        self.coordinates, self.self_cond = coordinates, self_cond
        self.nfe, self.last = 0, None  # last: the previous full estimate, the self-conditioning input

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, D|K]`` float32 (the state rounded once), ``sigma`` 0-d float64 -> ``x0_hat`` in the state's
        coordinates, as the objective returns it (the updates convert it to float64 a chunk at a time); the full
        estimate is kept in ``last``."""
        sigma_b = sigma.float().expand(x.shape[0])  # [B]
        x0, x0_state = self.coordinates.denoise(x, sigma_b, self.last if self.self_cond else None)
        self.nfe, self.last = self.nfe + 1, x0
        return x0_state


def _continuous_loop(
    objective: ContinuousObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    generator: torch.Generator | None,
    callback: Callable[[SamplerStep], None] | None,
    gammas: list[float],
    s_noise: float,
    heun: bool,
    self_cond: bool,
    fixed: Prompt | None = None,
) -> torch.Tensor:
    """EDM Algorithm 2 over the grid ``ts`` ``[T + 1]`` with per-step churn ``gammas`` (all 0 = Algorithm 1).

    Returns token ids ``[B, L]``: ``final_ids`` of the last state and estimate. The float64 state is updated in
    place by ``cdlm.samplers.state``'s fused passes, each noted with the formula whose values it computes; every
    pass that precedes a network call also writes that call's float32 input (``x.float()``).
    """
    coordinates = StateCoordinates(objective, x, fixed)  # x itself, or x @ P (cdlm.samplers.coordinates)
    # float64 state: over hundreds of steps the update x0 + r (x - x0) with r -> 1 accumulates float32 rounding.
    x = coordinates.initial.to(torch.float64, copy=True)  # [B, L, D|K], owned: updated in place below
    sigmas = objective.sigma(ts.double())  # [T + 1] float64, decreasing along the grid
    sigma_hats = [sigmas[i] * (1.0 + gamma) for i, gamma in enumerate(gammas)]
    denoise = _Denoiser(coordinates, self_cond)
    draws = sum(g > 0 for g in gammas)
    noise = StateNoise(x, generator, draws) if draws else None

    def churn(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM Alg. 2 lines 5-6 at step ``i``: fresh draws and their scale ``sqrt(sigma_hat^2 - sigma^2) s_noise``."""
        return coordinates.noise(noise.take()), (sigma_hats[i] ** 2 - sigmas[i] ** 2).sqrt() * s_noise

    steps = len(ts) - 1
    inputs = NetworkInputs(x)
    x_in, churned = inputs.next().copy_(x), False  # x_in: float32(x), the next call's input; churned: noise added
    for i in range(steps):
        sigma_hat, sigma_next = sigma_hats[i], sigmas[i + 1]
        if gammas[i] > 0 and not churned:  # raise the noise level from sigma to sigma_hat: x + scale eps
            x_in, (eps, scale) = inputs.next(), churn(i)
            with noise.overlap():  # the next draw is made meanwhile
                perturb_(x, eps, scale, x_in)
        x0 = denoise(x_in, sigma_hat)
        ratio = sigma_next / sigma_hat
        # The next step's churn is added in this step's pass, unless a callback is to see the state between them.
        churned = i < steps - 1 and gammas[i + 1] > 0 and callback is None
        needs_input = i < steps - 1 and (gammas[i + 1] == 0 or churned)  # else the next step's perturb_ writes it
        if heun and i < steps - 1:  # the second-order correction (docs/math.md §0); the last step stays Euler
            corrector_in = inputs.next()
            heun_predict_(x, x0, ratio, corrector_in)  # float32(x_next), x_next = euler_step(x, x0, ..)
            x0_hat, x0 = x0, denoise(corrector_in, sigma_next)
        x_in = inputs.next() if needs_input else None
        eps, scale = churn(i + 1) if churned else (None, None)  # taken right before the pass that adds it
        with noise.overlap() if churned else nullcontext():  # (the draw after it is made during the pass)
            if heun and i < steps - 1:  # euler_step(x, (x0_hat + x0) / 2, sigma_hat, sigma_next)
                heun_correct_(x, x0_hat, x0, ratio, x_in, eps, scale)
            else:
                euler_(x, x0, ratio, x_in, eps, scale)  # euler_step(x, x0, sigma_hat, sigma_next)
        ids = final_ids(objective, x, denoise, fixed) if i == steps - 1 else None  # before the callback: NFE counts
        if callback is not None:
            callback(SamplerStep(index=i, t=float(ts[i + 1]), x=x, x0=denoise.last, nfe=denoise.nfe))
    return ids


def final_ids(
    objective: ContinuousObjective, x: torch.Tensor, denoise: _Denoiser, fixed: Prompt | None = None
) -> torch.Tensor:
    """Token ids ``[B, L]`` at the end of a sampler: ``decode`` of the last clean estimate, or, for a ``FinalPass``
    objective, its last pass on the final state ``x`` (at ``sigma_min``) self-conditioned on that estimate (one more
    network evaluation, counted in ``denoise.nfe``); the prompt's tokens at its ``fixed`` positions."""
    if isinstance(objective, FinalPass):
        denoise.nfe += 1
        ids = objective.decode_final(x, denoise.last if denoise.self_cond else None)
    else:
        ids = objective.decode(denoise.last)
    return ids if fixed is None else fixed.apply(ids)


@register_sampler("euler", space="continuous", grid=continuous_grid)
@torch.no_grad()
def sample_euler(
    objective: ContinuousObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    fixed: Prompt | None = None,
    self_cond: bool = True,
) -> torch.Tensor:
    """Euler on the probability-flow ODE (= deterministic DDIM) from ``x`` ``[B, L, D]`` over ``ts`` ``[T + 1]``.

    NFE = T. ``self_cond``: feed the previous clean estimate back to the denoiser. Returns ids ``[B, L]``.
    """
    gammas = [0.0] * (len(ts) - 1)
    return _continuous_loop(objective, x, ts, generator, callback, gammas, 1.0, False, self_cond, fixed)


@register_sampler("heun", space="continuous", grid=continuous_grid)
@torch.no_grad()
def sample_heun(
    objective: ContinuousObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    fixed: Prompt | None = None,
    self_cond: bool = True,
) -> torch.Tensor:
    """EDM Heun (Karras et al. 2022, Algorithm 1) over ``ts`` ``[T + 1]``, its two clean estimates combined by
    ``heun_correct_`` (docs/math.md §0); the last step is Euler, NFE = 2T - 1.

    Returns ids ``[B, L]``.
    """
    gammas = [0.0] * (len(ts) - 1)
    return _continuous_loop(objective, x, ts, generator, callback, gammas, 1.0, True, self_cond, fixed)


@register_sampler(
    "churn",
    space="continuous",
    grid=continuous_grid,
    knobs={
        "gamma": Range(0, note="0 = no churn; capped at sqrt(2) - 1"),
        "t_lo": Range(0, 1),
        "t_hi": Range(0, 1),
        "s_noise": Range(0, low_open=True),
    },
    rules=(Ordered("t_lo", "t_hi"),),
)
@torch.no_grad()
def sample_churn(
    objective: ContinuousObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    gamma: float = 0.13,
    t_lo: float = 0.1,
    t_hi: float = 0.9,
    s_noise: float = 1.003,
    fixed: Prompt | None = None,
    heun: bool = False,
    self_cond: bool = True,
) -> torch.Tensor:
    """The entropy-gated churn corrector (docs/math.md §4; Karras et al. 2022, Algorithm 2) over ``ts`` ``[T + 1]``.

    At grid time ``t_i`` in ``[t_lo, t_hi]`` (the objective's information-uniform sampler time, so the window is a
    range of the entropy CDF), ``gamma_i = min(gamma, sqrt(2) - 1)``, else 0; ``sigma_hat = sigma_i (1 + gamma_i)``,
    ``x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) s_noise eps``, then an Euler (``heun=False``) or Heun step from
    ``sigma_hat`` to ``sigma_{i+1}``. ``gamma = 0`` is exactly ``sample_euler`` (or ``sample_heun``). Published
    (CoBit): ``gamma`` 0.13-0.2, ``s_noise`` 1.003. Returns ids ``[B, L]``.
    """
    if gamma < 0 or s_noise <= 0:
        raise ValueError(f"need gamma >= 0 and s_noise > 0, got gamma={gamma}, s_noise={s_noise}")
    churn = min(gamma, MAX_CHURN)
    gammas = [churn if t_lo <= t <= t_hi else 0.0 for t in ts[:-1].tolist()]
    return _continuous_loop(objective, x, ts, generator, callback, gammas, s_noise, heun, self_cond, fixed)

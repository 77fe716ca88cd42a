"""One likelihood bound for every continuous objective (docs/math.md §6).

Variational dequantisation with ``q(x~0 | x) = N(x0, sigma_min^2 I)`` plus the probability-flow ODE (Song et al.
2021) in VE coordinates:

    -log P(x) <= E_q[ -log p(x | x~0) - log p_{sigma_min}(x~0) + log q(x~0 | x) ],

with ``log p_{sigma_min}`` from the instantaneous change of variables along ``dx/dsigma = f = (x - x0_hat) / sigma``
(Chen et al. 2018; Grathwohl et al. 2019, FFJORD). ``div f = (n D - tr dD/dx) / sigma``: the identity part is
integrated exactly (``n D log(sigma_max / sigma_min)``, n valid positions of width D) and only the denoiser's
Jacobian trace is estimated, with Hutchinson's ``u^T (dD/dx) u`` and ``probes`` Rademacher probes per sequence (one
by default). Estimating the identity part too would add noise and quadrature bias that grow with D (2,048 per token
for a one-hot flow).

The trajectory does not depend on the probe, only the divergence integral does: ``R = probes`` probes share one solve
(one network forward per evaluation, ``R`` vector-Jacobian products through it), each gives its own bound, the
reported bound is their mean and, with ``R >= 2``, ``ode_nll`` reports the Hutchinson standard error
``std_r(bound_r) / sqrt(R)`` (nats/token, ``logs["nll_se"]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cdlm import checks
from cdlm.types import Batch, ContinuousObjective, LossOutput, SelfConditionedBound

LOG_2PI = math.log(2 * math.pi)


def log_sigma_grid(sigma_min: float, sigma_max: float, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[steps + 1]`` float64 noise levels from ``sigma_min`` up to ``sigma_max``, uniform in ``log sigma``.

    The drift ``f = (x - x0_hat) / sigma`` varies on the scale of ``sigma`` itself, so equal steps in ``log sigma``
    give every octave the same number of Heun steps (sigma spans 3-5 decades for the objectives in cdlm).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.logspace(math.log10(sigma_min), math.log10(sigma_max), steps + 1, dtype=torch.float64, device=device)


def float32_leaf(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of the state ``x`` that autograd may use as a leaf: a normal tensor even under Lightning's
    ``inference_mode`` (where validation runs and ``enable_grad`` alone records nothing)."""
    with torch.inference_mode(False):
        return x.to(torch.float32, copy=True)


def rademacher_probes(
    shape: torch.Size, probes: int, padding: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``probes`` Rademacher probes ``[R, B, L, D]`` for states of ``shape`` ``[B, L, D]``: +-1, zero at padding
    (``padding`` ``[B, L]``, True on real tokens).

    Drawn one after another, each as one ``randint`` of ``shape`` from ``generator``: probe ``r`` is the probe a
    one-probe solve draws after ``r`` earlier ones, and ``probes = 1`` draws exactly what it always did. One probe is
    held in float32 (as before); several in int8 (1 byte a coordinate each; ``denoise_and_trace`` converts one at a
    time), so that ``R`` probes cost ``R`` bytes a coordinate beside the float64 state and drift.
    """
    out = torch.empty((probes, *shape), dtype=torch.float32 if probes == 1 else torch.int8, device=padding.device)
    for r in range(probes):
        coin = torch.randint(0, 2, shape, generator=generator, device=padding.device)  # [B, L, D] int64
        out[r] = coin.mul_(2).sub_(1).mul_(padding[..., None])  # +-1, zero at padding (exact in any dtype)
        del coin
    return out


def bound_denoise(objective: ContinuousObjective, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The denoiser the bound integrates, ``[B, L, D]`` from the state ``x`` ``[B, L, D]`` at ``sigma`` ``[B]``: the
    one-pass ``D(x, sigma)`` (``x0_prev = None``), or, for an objective whose ``ode_self_condition`` is set
    (``cdlm.types.SelfConditionedBound``), the self-conditioned ``D(x, sigma, D(x, sigma))`` the samplers use. The
    inner pass stays in the autograd graph: the Jacobian trace is that of the composed map (docs/math.md §6)."""
    x0 = objective.denoise(x, sigma, None)
    if isinstance(objective, SelfConditionedBound) and objective.ode_self_condition:
        x0 = objective.denoise(x, sigma, x0)
    return x0


def denoise_and_trace(
    objective: ContinuousObjective, x32: torch.Tensor, sigma: torch.Tensor, probes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser ``D(x, sigma)`` ``[B, L, D]`` (detached) and the Jacobian parts ``-u_r^T (dD/dx) u_r / sigma``
    ``[R, B]`` float64, one per probe.

    ``x32`` ``[B, L, D]`` is the float32 state (from ``float32_leaf``; the denoiser runs in float32), ``sigma`` 0-d
    float64, ``probes`` ``u_r`` ``[R, B, L, D]`` (``rademacher_probes``: +-1, zero at padding). The drift is
    ``f = (x - D) / sigma``; with ``df/dx = (I - dD/dx) / sigma``, ``div f = (n D - tr dD/dx) / sigma``; the
    ``n D / sigma`` part is integrated exactly by the caller, and each ``u_r^T dD/dx`` is one vector-Jacobian product
    (reverse mode works through every network op; Grathwohl et al. 2019) through the ONE forward pass: the graph is
    kept (``retain_graph``) for all but the last probe, so ``R`` probes cost one forward and ``R`` backwards and hold
    one backward's buffers at a time. A batched vjp (``is_grads_batched``) holds ``R`` of them, was no faster on CPU
    (an MLP: equal at R = 2, 4, 20% slower at R = 8) and fails through ``OneHotFlow``'s float64 row scaling, whose
    backward writes in place, which vmap refuses. The denoiser is ``bound_denoise``'s: either way a deterministic
    function of ``(x, sigma)``, so that the ODE is well defined.
    """
    n_probes = probes.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        u_j_u = torch.empty((n_probes, x32.shape[0]), dtype=torch.float64, device=x32.device)  # [R, B], a normal tensor
        x32.requires_grad_(True)
        x0 = bound_denoise(objective, x32, sigma.float().expand(x32.shape[0]))  # [B, L, D]
        for r in range(n_probes):
            probe = probes[r].to(x0.dtype)  # u_r [B, L, D] (the stored tensor itself for one float32 probe)
            last = r == n_probes - 1
            (vjp,) = torch.autograd.grad(x0, x32, grad_outputs=probe, retain_graph=not last)  # u_r^T dD/dx [B, L, D]
            u_j_u[r] = vjp.mul_(probe).double().flatten(1).sum(1)  # [B]; u is +-1 or 0, so the products are exact
            del vjp, probe
    x0 = x0.detach()  # frees the graph
    del x32
    return x0, -u_j_u / sigma


def gaussian_log_density(x: torch.Tensor, mean: float, var: float, padding: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, var I)`` ``[B]`` summed over the valid positions of ``x`` ``[B, L, D]`` (float64)."""
    sq = ((x - mean) ** 2).sum(-1)  # [B, L]
    dims = x.shape[-1]
    return (-0.5 * (sq / var + dims * (LOG_2PI + math.log(var))) * padding).sum(-1)


@torch.no_grad()
def ode_log_densities(
    objective: ContinuousObjective,
    x: torch.Tensor,
    steps: int = 128,
    generator: torch.Generator | None = None,
    padding: torch.Tensor | None = None,
    overwrite: bool = False,
    probes: int = 1,
) -> torch.Tensor:
    """``log p_{sigma_min}(x)`` ``[R, B]`` float64 of states ``x`` ``[B, L, D]`` over the valid positions, one
    estimate per Hutchinson probe (``R = probes``), all from ONE solve.

    Integrates ``dx/dsigma = f`` from ``sigma_min`` up to ``sigma_max`` with ``steps`` Heun steps (2 * steps denoiser
    calls) on ``log_sigma_grid``, together with ``div f``: its identity part exactly, the denoiser's Jacobian trace with
    ``R`` Rademacher probes ``u_r`` per sequence, each held fixed along the path (FFJORD) and zero at padding
    (``padding`` ``[B, L]``, True on real tokens), then

        log p_{sigma_min}(x) = log N(x(sigma_max); data_mean, (sigma_max^2 + data_scale^2) I)
                               + integral_{sigma_min}^{sigma_max} div f dsigma.

    Sign: along ``dx/dsigma = f``, ``d log p_sigma(x(sigma)) / dsigma = -div f``; integrating from ``sigma_min`` to
    ``sigma_max`` gives the PLUS sign above (docs/math.md §6 prints a minus). Check in 1-D: ``p_sigma =
    N(0, s^2 + sigma^2)``, ``x0_hat = s^2 x / (s^2 + sigma^2)``, ``div f = sigma / (s^2 + sigma^2) > 0``, and the
    plus sign recovers ``log N(x; 0, s^2 + sigma_min^2)`` exactly. Integration in float64, the denoiser in float32
    with autocast disabled. The trajectory does not depend on the probes (only the integral does), so the ``R``
    estimates differ only in their Jacobian terms; ``probes = 1`` gives, bit for bit, the one-probe solve.

    Memory: through the denoiser's forward and backward only the state ``x`` and the drift ``f`` (float64) and the
    probes (one float32, or ``R`` int8, ``rademacher_probes``) are held beside it; the Heun predictor ``x + h f`` is
    formed again after the network call rather than kept (docs/runs.md, "Memory"). ``overwrite``: the caller hands
    ``x`` over (a float64 ``x`` then becomes the state, updated in place); otherwise ``x`` is not modified.
    """
    checks.positive_ints(probes=probes)
    padding = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if padding is None else padding.bool()
    sigmas = log_sigma_grid(objective.sigma_min, objective.sigma_max, steps, x.device)  # [steps + 1]
    u = rademacher_probes(x.shape, probes, padding, generator)  # [R, B, L, D] int8 (float32 for one probe)
    x = x.double()  # [B, L, D]
    n_dims = padding.sum(-1).double() * x.shape[-1]  # [B] valid coordinates
    integral = n_dims * math.log(objective.sigma_max / objective.sigma_min)  # [B] exact: integral of n D / sigma
    with torch.autocast(x.device.type, enabled=False):
        for k in range(steps):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            h = sigma_next - sigma
            x0, div = denoise_and_trace(objective, float32_leaf(x), sigma, u)  # D(x, sigma)
            f = torch.sub(x, x0).div_(sigma)  # the drift (x - D) / sigma [B, L, D] float64
            del x0
            x0, div_next = denoise_and_trace(objective, float32_leaf((h * f).add_(x)), sigma_next, u)  # at x + h f
            # the drift there, with x + h f formed again (the same values) rather than held through the network call
            step = (h * f).add_(x).sub_(x0).div_(sigma_next)
            del x0
            step = step.add_(f).mul_(0.5 * h)  # Heun (trapezoid) on the augmented state (x, log-density)
            del f
            x = x.add_(step) if overwrite or k > 0 else step.add_(x)  # x + step; the caller's x is left alone
            del step
            integral = integral + 0.5 * h * (div + div_next)  # [R, B]
    var_max = objective.sigma_max**2 + objective.data_scale**2
    return gaussian_log_density(x, objective.data_mean, var_max, padding) + integral  # [R, B]


def ode_log_density(objective: ContinuousObjective, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``log p_{sigma_min}(x)`` ``[B]`` float64: ``ode_log_densities`` (same arguments) averaged over its ``probes``
    Hutchinson probes (the same expectation, less variance)."""
    return ode_log_densities(objective, x, *args, **kwargs).mean(0)


def sequence_terms(
    objective: ContinuousObjective,
    ids: torch.Tensor,
    padding: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    probes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bound's three terms per sequence, float64: ``sum decoder_nll`` ``[B]``, ``log p_{sigma_min}(x~0)`` ``[R, B]``
    (one per probe, ``ode_log_densities``) and ``log q(x~0 | ids)`` ``[B]`` over the valid positions (``padding``
    ``[B, L]``, bool) of ``ids`` ``[B, L]``.

    ``x~0 = x0 + sigma_min eps`` is formed in the buffer of ``eps`` and handed over to the ODE as its state, so the
    solve holds no float64 ``[B, L, D]`` beside its own (``ode_log_density``).
    """
    valid = padding.double()
    with torch.autocast(ids.device.type, enabled=False):
        x0 = objective.clean_state(ids)  # [B, L, D]
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)  # [B, L, D]
        # log q(x~0 | ids) = log N(sigma_min eps; 0, sigma_min^2 I) over the valid positions
        dims = x0.shape[-1]
        log_q = (-0.5 * ((eps**2).sum(-1) + dims * (LOG_2PI + 2 * math.log(objective.sigma_min))) * valid).sum(-1)
        x_tilde = eps.mul_(objective.sigma_min).add_(x0)  # x~0 = x0 + sigma_min eps ~ q(. | ids), float64
        del x0, eps
        decoder = (objective.decoder_nll(x_tilde.float(), ids).double() * valid).sum(-1)  # [B]
        log_p = ode_log_densities(objective, x_tilde, steps, generator, padding, True, probes)  # [R, B]; x~0 given
    return decoder, log_p, log_q


def probe_standard_error(bounds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The Hutchinson standard error of a bound, 0-d float64 nats/token: ``std_r(bound_r) / sqrt(R)`` over the ``R``
    per-probe bounds, each the sum of ``bounds`` ``[R, B]`` (nats per sequence) over ``tokens`` (docs/math.md §6)."""
    per_probe = bounds.sum(-1) / tokens  # [R] each probe's bound, nats/token
    return per_probe.std(0) / math.sqrt(bounds.shape[0])


@torch.no_grad()
def ode_nll(
    objective: ContinuousObjective,
    batch: Batch,
    steps: int = 128,
    generator: torch.Generator | None = None,
    rows: int | None = None,
    probes: int = 1,
) -> LossOutput:
    """The bound of docs/math.md §6 for any continuous objective, as a per-token ``nll`` ``[B, L]`` in nats.

    One dequantisation draw ``x~0 = clean_state(ids) + sigma_min eps`` per sequence; per sequence the bound is
    ``sum decoder_nll(x~0, ids) - log p_{sigma_min}(x~0) + log q(x~0 | ids)`` over valid tokens, with
    ``log q = log N(x~0; x0, sigma_min^2 I)``. Each valid token carries the sequence total divided by the number of
    valid tokens, so sums over tokens are exact; ``loss`` is the mean per valid token. ``logs`` holds the three
    terms per valid token. ``rows``: sequences per solve (None = all at once); the memory of the solve is
    proportional to it, and the noise is drawn solve by solve.

    ``probes``: Hutchinson probes ``R`` per sequence, all on the one trajectory of each solve (``ode_log_densities``);
    the bound uses the mean of their ``log p``. With ``R >= 2``, ``logs["nll_se"]`` (float64, nats/token) is the
    Hutchinson standard error of ``loss``: ``std_r(bound_r) / sqrt(R)`` over the ``R`` per-probe bounds, each the
    full bound per token over the same tokens (the spread of the dequantisation draw, shared by all probes, is not in
    it). With ``R = 1`` the results are those of the one-probe solve, bit for bit, and there is no ``nll_se``.
    """
    ids = batch["input_ids"]  # [B, L]
    padding = batch.get("attention_mask", torch.ones_like(ids)).bool()  # [B, L]
    n_tokens = padding.double().sum(-1)  # [B]
    rows = rows or max(ids.shape[0], 1)
    chunks = zip(ids.split(rows), padding.split(rows))
    parts = [sequence_terms(objective, i, m, steps, generator, probes) for i, m in chunks]
    decoder, log_p_probes, log_q = (torch.cat(terms, dim=-1) for terms in zip(*parts))  # [B], [R, B], [B]
    log_p = log_p_probes.mean(0)  # [B]; the mean over probes (exact for R = 1)
    total = decoder - log_p + log_q  # [B] nats per sequence
    per_token = n_tokens.clamp_min(1)
    nll = torch.where(padding, (total / per_token)[:, None], 0.0)  # [B, L]
    all_tokens = n_tokens.sum().clamp_min(1)
    terms = {
        "decoder_nll": decoder.sum() / all_tokens,
        "ode_nll": -log_p.sum() / all_tokens,
        "log_q": log_q.sum() / all_tokens,
    }
    logs = {k: v.float() for k, v in terms.items()}
    if probes >= 2:
        logs["nll_se"] = probe_standard_error(decoder + log_q - log_p_probes, all_tokens)
    return LossOutput(loss=(nll.sum() / all_tokens).float(), nll=nll.float(), mask=padding, logs=logs)

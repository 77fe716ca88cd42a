"""One likelihood bound for every continuous objective (docs/math.md §6).

Variational dequantisation with ``q(x~0 | x) = N(x0, sigma_min^2 I)`` plus the probability-flow ODE (Song et al.
2021) in VE coordinates:

    -log P(x) <= E_q[ -log p(x | x~0) - log p_{sigma_min}(x~0) + log q(x~0 | x) ],

with ``log p_{sigma_min}`` from the instantaneous change of variables along ``dx/dsigma = f = (x - x0_hat) / sigma``
(Chen et al. 2018; Grathwohl et al. 2019, FFJORD). ``div f = (n D - tr dD/dx) / sigma``: the identity part is
integrated exactly (``n D log(sigma_max / sigma_min)``, n valid positions of width D) and only the denoiser's
Jacobian trace is estimated, with Hutchinson's ``u^T (dD/dx) u`` and one Rademacher probe per sequence. Estimating
the identity part too would add noise and quadrature bias that grow with D (2,048 per token for a one-hot flow).
"""

from __future__ import annotations

import math

import torch

from cdlm.types import Batch, ContinuousObjective, LossOutput

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


def denoise_and_trace(
    objective: ContinuousObjective, x32: torch.Tensor, sigma: torch.Tensor, probe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser ``D(x, sigma)`` ``[B, L, D]`` (detached) and the Jacobian part ``-u^T (dD/dx) u / sigma`` ``[B]``.

    ``x32`` ``[B, L, D]`` is the float32 state (from ``float32_leaf``; the denoiser runs in float32), ``sigma`` 0-d
    float64, ``probe`` ``u`` ``[B, L, D]`` (+-1, zero at padding). The drift is ``f = (x - D) / sigma``; with
    ``df/dx = (I - dD/dx) / sigma``, ``div f = (n D - tr dD/dx) / sigma``; the ``n D / sigma`` part is integrated
    exactly by the caller, and ``u^T dD/dx`` is one vector-Jacobian product (reverse mode works through every network
    op; Grathwohl et al. 2019). The denoiser is called without self-conditioning (``x0_prev = None``): the bound
    scores the one-pass model, a deterministic function of ``(x, sigma)``, so that the ODE is well defined.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x32.requires_grad_(True)
        x0 = objective.denoise(x32, sigma.float().expand(x32.shape[0]), None)  # [B, L, D]
        (vjp,) = torch.autograd.grad(x0, x32, grad_outputs=probe.to(x0.dtype))  # u^T dD/dx [B, L, D]
    x0 = x0.detach()  # frees the graph
    del x32
    u_j_u = vjp.mul_(probe).double().flatten(1).sum(1)  # [B]; u is +-1 or 0, so the products are exact
    return x0, -u_j_u / sigma


def gaussian_log_density(x: torch.Tensor, mean: float, var: float, padding: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, var I)`` ``[B]`` summed over the valid positions of ``x`` ``[B, L, D]`` (float64)."""
    sq = ((x - mean) ** 2).sum(-1)  # [B, L]
    dims = x.shape[-1]
    return (-0.5 * (sq / var + dims * (LOG_2PI + math.log(var))) * padding).sum(-1)


@torch.no_grad()
def ode_log_density(
    objective: ContinuousObjective,
    x: torch.Tensor,
    steps: int = 128,
    generator: torch.Generator | None = None,
    padding: torch.Tensor | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """``log p_{sigma_min}(x)`` ``[B]`` float64 of states ``x`` ``[B, L, D]`` over the valid positions.

    Integrates ``dx/dsigma = f`` from ``sigma_min`` up to ``sigma_max`` with ``steps`` Heun steps (2 * steps denoiser
    calls) on ``log_sigma_grid``, together with ``div f``: its identity part exactly, the denoiser's Jacobian trace with
    ONE Rademacher probe ``u`` per sequence, held fixed along the path (FFJORD) and zero at padding (``padding``
    ``[B, L]``, True on real tokens), then

        log p_{sigma_min}(x) = log N(x(sigma_max); data_mean, (sigma_max^2 + data_scale^2) I)
                               + integral_{sigma_min}^{sigma_max} div f dsigma.

    Sign: along ``dx/dsigma = f``, ``d log p_sigma(x(sigma)) / dsigma = -div f``; integrating from ``sigma_min`` to
    ``sigma_max`` gives the PLUS sign above (docs/math.md §6 prints a minus). Check in 1-D: ``p_sigma =
    N(0, s^2 + sigma^2)``, ``x0_hat = s^2 x / (s^2 + sigma^2)``, ``div f = sigma / (s^2 + sigma^2) > 0``, and the
    plus sign recovers ``log N(x; 0, s^2 + sigma_min^2)`` exactly. Integration in float64, the denoiser in float32
    with autocast disabled.

    Memory: through the denoiser's forward and backward only the state ``x`` and the drift ``f`` (float64) and the
    probe (float32) are held beside it; the Heun predictor ``x + h f`` is formed again after the network call rather
    than kept (docs/runs.md, "Memory"). ``overwrite``: the caller hands ``x`` over (a float64 ``x`` then becomes the
    state, updated in place); otherwise ``x`` is not modified.
    """
    padding = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if padding is None else padding.bool()
    sigmas = log_sigma_grid(objective.sigma_min, objective.sigma_max, steps, x.device)  # [steps + 1]
    coin = torch.randint(0, 2, x.shape, generator=generator, device=x.device)  # [B, L, D] int64
    probe = coin.to(torch.float32).mul_(2).sub_(1).mul_(padding[..., None])  # [B, L, D] Rademacher, zero at padding
    del coin
    x = x.double()  # [B, L, D]
    n_dims = padding.sum(-1).double() * x.shape[-1]  # [B] valid coordinates
    integral = n_dims * math.log(objective.sigma_max / objective.sigma_min)  # [B] exact: integral of n D / sigma
    with torch.autocast(x.device.type, enabled=False):
        for k in range(steps):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            h = sigma_next - sigma
            x0, div = denoise_and_trace(objective, float32_leaf(x), sigma, probe)  # D(x, sigma)
            f = torch.sub(x, x0).div_(sigma)  # the drift (x - D) / sigma [B, L, D] float64
            del x0
            x0, div_next = denoise_and_trace(objective, float32_leaf((h * f).add_(x)), sigma_next, probe)  # at x + h f
            # the drift there, with x + h f formed again (the same values) rather than held through the network call
            step = (h * f).add_(x).sub_(x0).div_(sigma_next)
            del x0
            step = step.add_(f).mul_(0.5 * h)  # Heun (trapezoid) on the augmented state (x, log-density)
            del f
            x = x.add_(step) if overwrite or k > 0 else step.add_(x)  # x + step; the caller's x is left alone
            del step
            integral = integral + 0.5 * h * (div + div_next)
    var_max = objective.sigma_max**2 + objective.data_scale**2
    return gaussian_log_density(x, objective.data_mean, var_max, padding) + integral


def sequence_terms(
    objective: ContinuousObjective,
    ids: torch.Tensor,
    padding: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bound's three terms per sequence, float64 ``[B]`` each: ``sum decoder_nll``, ``log p_{sigma_min}(x~0)`` and
    ``log q(x~0 | ids)`` over the valid positions (``padding`` ``[B, L]``, bool) of ``ids`` ``[B, L]``.

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
        log_p = ode_log_density(objective, x_tilde, steps, generator, padding, overwrite=True)  # [B]
    return decoder, log_p, log_q


@torch.no_grad()
def ode_nll(
    objective: ContinuousObjective,
    batch: Batch,
    steps: int = 128,
    generator: torch.Generator | None = None,
    rows: int | None = None,
) -> LossOutput:
    """The bound of docs/math.md §6 for any continuous objective, as a per-token ``nll`` ``[B, L]`` in nats.

    One dequantisation draw ``x~0 = clean_state(ids) + sigma_min eps`` per sequence; per sequence the bound is
    ``sum decoder_nll(x~0, ids) - log p_{sigma_min}(x~0) + log q(x~0 | ids)`` over valid tokens, with
    ``log q = log N(x~0; x0, sigma_min^2 I)``. Each valid token carries the sequence total divided by the number of
    valid tokens, so sums over tokens are exact; ``loss`` is the mean per valid token. ``logs`` holds the three
    terms per valid token. ``rows``: sequences per solve (None = all at once); the memory of the solve is
    proportional to it, and the noise is drawn solve by solve.
    """
    ids = batch["input_ids"]  # [B, L]
    padding = batch.get("attention_mask", torch.ones_like(ids)).bool()  # [B, L]
    n_tokens = padding.double().sum(-1)  # [B]
    rows = rows or max(ids.shape[0], 1)
    parts = [sequence_terms(objective, i, m, steps, generator) for i, m in zip(ids.split(rows), padding.split(rows))]
    decoder, log_p, log_q = (torch.cat(terms) for terms in zip(*parts))  # [B] each
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
    return LossOutput(loss=(nll.sum() / all_tokens).float(), nll=nll.float(), mask=padding, logs=logs)

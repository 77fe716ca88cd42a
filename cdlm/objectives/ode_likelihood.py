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


def drift_and_divergence(
    objective: ContinuousObjective, x: torch.Tensor, sigma: torch.Tensor, probe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ODE drift ``f = (x - D(x, sigma)) / sigma`` ``[B, L, D]`` and the Jacobian part ``-u^T (dD/dx) u / sigma``.

    ``x`` ``[B, L, D]`` float64, ``sigma`` 0-d float64, ``probe`` ``u`` ``[B, L, D]`` float64 (zero at padding). With
    ``df/dx = (I - dD/dx) / sigma``, ``div f = (n D - tr dD/dx) / sigma``; the ``n D / sigma`` part is integrated
    exactly by the caller, and ``u^T dD/dx`` is one vector-Jacobian product (reverse mode works through every network
    op; Grathwohl et al. 2019). The denoiser is
    called without self-conditioning (``x0_prev = None``): the bound scores the one-pass model, a deterministic
    function of ``(x, sigma)``, so that the ODE is well defined.
    """
    # Lightning validates under inference_mode, where enable_grad alone records nothing: leave it, and clone the
    # state so that it is a normal (not an inference) tensor that autograd may save.
    with torch.inference_mode(False), torch.enable_grad():
        x32 = x.float().clone().requires_grad_(True)  # [B, L, D]; the denoiser runs in float32
        x0 = objective.denoise(x32, sigma.float().expand(x.shape[0]), None)  # [B, L, D]
        (vjp,) = torch.autograd.grad(x0, x32, grad_outputs=probe.to(x0.dtype))  # u^T dD/dx [B, L, D]
    f = (x - x0.detach().double()) / sigma  # [B, L, D] float64
    u_j_u = (vjp.double() * probe).flatten(1).sum(1)  # [B]
    return f, -u_j_u / sigma


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
    """
    padding = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if padding is None else padding.bool()
    valid = padding[..., None].double()  # [B, L, 1]
    sigmas = log_sigma_grid(objective.sigma_min, objective.sigma_max, steps, x.device)  # [steps + 1]
    coin = torch.randint(0, 2, x.shape, generator=generator, device=x.device).double()
    probe = (2 * coin - 1) * valid  # [B, L, D] Rademacher, zero at padding
    x = x.double()  # [B, L, D]
    n_dims = padding.sum(-1).double() * x.shape[-1]  # [B] valid coordinates
    integral = n_dims * math.log(objective.sigma_max / objective.sigma_min)  # [B] exact: integral of n D / sigma
    with torch.autocast(x.device.type, enabled=False):
        for k in range(steps):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            h = sigma_next - sigma
            f, div = drift_and_divergence(objective, x, sigma, probe)
            x_pred = x + h * f
            f_next, div_next = drift_and_divergence(objective, x_pred, sigma_next, probe)
            x = x + 0.5 * h * (f + f_next)  # Heun (trapezoid) on the augmented state (x, log-density)
            integral = integral + 0.5 * h * (div + div_next)
    var_max = objective.sigma_max**2 + objective.data_scale**2
    return gaussian_log_density(x, objective.data_mean, var_max, padding) + integral


@torch.no_grad()
def ode_nll(
    objective: ContinuousObjective, batch: Batch, steps: int = 128, generator: torch.Generator | None = None
) -> LossOutput:
    """The bound of docs/math.md §6 for any continuous objective, as a per-token ``nll`` ``[B, L]`` in nats.

    One dequantisation draw ``x~0 = clean_state(ids) + sigma_min eps`` per sequence; per sequence the bound is
    ``sum decoder_nll(x~0, ids) - log p_{sigma_min}(x~0) + log q(x~0 | ids)`` over valid tokens, with
    ``log q = log N(x~0; x0, sigma_min^2 I)``. Each valid token carries the sequence total divided by the number of
    valid tokens, so sums over tokens are exact; ``loss`` is the mean per valid token. ``logs`` holds the three
    terms per valid token.
    """
    ids = batch["input_ids"]  # [B, L]
    padding = batch.get("attention_mask", torch.ones_like(ids)).bool()  # [B, L]
    valid = padding.double()
    n_tokens = valid.sum(-1)  # [B]
    with torch.autocast(ids.device.type, enabled=False):
        x0 = objective.clean_state(ids).double()  # [B, L, D]
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)  # [B, L, D]
        x_tilde = x0 + objective.sigma_min * eps  # x~0 ~ q(. | ids)
        decoder = (objective.decoder_nll(x_tilde.float(), ids).double() * valid).sum(-1)  # [B]
        log_p = ode_log_density(objective, x_tilde, steps, generator, padding)  # [B]
    dims = x0.shape[-1]
    # log q(x~0 | ids) = log N(sigma_min eps; 0, sigma_min^2 I) over the valid positions
    log_q = (-0.5 * ((eps**2).sum(-1) + dims * (LOG_2PI + 2 * math.log(objective.sigma_min))) * valid).sum(-1)
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

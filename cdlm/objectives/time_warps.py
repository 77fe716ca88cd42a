"""The discrete-equivalent time of the one-hot linear flow: FLM (Lee et al. 2026, "Flow map language models").

On the path ``z = c e_x + (1 - c) eps`` over ``K`` tokens (docs/math.md §2), ``argmax z`` is the true token
with probability ``P(c) = E_zeta[Phi(zeta + c/(1-c))^(K-1)]``; above chance, rescaled to [0, 1],

    alpha(c) = K/(K-1) * (P(c) - 1/K)                                                  (FLM, discrete-equivalent time)

is the fraction of tokens the flow has revealed, the analogue of the masked schedule's keep probability.
Sampler time is ``c(t) = alpha^{-1}(1 - t)``: a uniform grid in ``t`` reveals tokens at a uniform rate.

The expectation uses ``GH_NODES`` probabilists' Gauss-Hermite nodes in float64 and log space
(``(K-1) log Phi``), written as ``E[Phi(zeta + m)^(K-1) - Phi(zeta)^(K-1)]`` so that ``alpha(0) = 0`` exactly
(``P(0) = 1/K`` analytically; the quadrature then only sees the difference). Against a dense quadrature the
relative error is below 0.3 % for ``c -> 0`` and below 1e-4 absolute everywhere for ``K <= 50257``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

GH_NODES = 100
LOG_SIGMA_RANGE = (-4.0, 14.0)  # table grid: log sigma = -logit(c), uniform; covers t in [1e-5, 1 - 1e-5], K <= 1e6


def alpha_onehot(c: torch.Tensor, K: int, nodes: int = GH_NODES) -> torch.Tensor:
    """``alpha(c)`` ``[N]`` float64 for ``c`` ``[N]`` in [0, 1] (FLM discrete-equivalent time, docs/math.md §2)."""
    if K < 2:
        raise ValueError(f"alpha(c) needs K >= 2 tokens, got K={K}")
    x, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-x^2/2), sum(w) = sqrt(2 pi)
    x = torch.as_tensor(x, dtype=torch.float64)  # [G]
    w = torch.as_tensor(w / math.sqrt(2 * math.pi), dtype=torch.float64)  # [G], a probability vector
    c = torch.as_tensor(c, dtype=torch.float64).cpu()
    m = c / (1 - c).clamp_min(1e-300)  # [N], the margin in noise units; inf at c = 1
    logphi = torch.special.log_ndtr(x[None] + m[:, None])  # [N, G]
    base = torch.exp((K - 1) * torch.special.log_ndtr(x))  # [G], Phi(zeta)^(K-1)
    gain = (torch.exp((K - 1) * logphi) - base[None]) @ w  # [N], P(c) - 1/K
    return (K / (K - 1) * gain).clamp(0.0, 1.0)


class OneHotTimeWarp(nn.Module):
    """Tabulated ``alpha(c)`` and its monotone inverse ``c(t) = alpha^{-1}(1 - t)`` for ``K`` tokens.

    The table has ``points`` nodes: ``c = 0``, ``c = 1`` and ``points - 2`` nodes uniform in ``log sigma``
    (``sigma = (1-c)/c``, i.e. uniform in ``logit c``) over ``LOG_SIGMA_RANGE``, a spacing of ~0.0044 in
    ``log sigma`` at 4096 points: the steep part (``alpha`` from 0.01 to 0.98 over ``c`` in [0.5, 0.85] for
    ``K = 2048``) gets ~400 nodes. ``alpha`` is made monotone by ``cummax``; both maps interpolate linearly in
    ``c`` with ``torch.searchsorted`` on the model's device, with no numpy and no CPU work per call.

    The tables are non-persistent float64 buffers: they follow ``.to(device)`` but stay out of checkpoints,
    because they are a deterministic function of ``(K, points)``, rebuilt in milliseconds at construction, and a
    checkpoint then loads whatever ``points`` is. (``module.double()``-style casts would also cast them; cdlm
    never casts modules, mixed precision is autocast.)
    """

    def __init__(self, K: int, points: int = 4096) -> None:
        super().__init__()
        if points < 16:
            raise ValueError(f"points must be >= 16, got {points}")
        self.K, self.points = K, points
        log_sigma = torch.linspace(LOG_SIGMA_RANGE[1], LOG_SIGMA_RANGE[0], points - 2, dtype=torch.float64)
        inner = torch.sigmoid(-log_sigma)  # [P-2], increasing c
        c = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])  # [P]
        alpha = alpha_onehot(c, K)
        alpha[0], alpha[-1] = 0.0, 1.0
        self.register_buffer("c_table", c, persistent=False)  # [P] float64
        self.register_buffer("alpha_table", alpha.cummax(0).values, persistent=False)  # [P] float64, monotone

    def alpha_of_c(self, c: torch.Tensor) -> torch.Tensor:
        """``alpha(c)``, float64, same shape as ``c`` (any shape, values in [0, 1])."""
        return interp(c, self.c_table, self.alpha_table)

    def c_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """``c(t) = alpha^{-1}(1 - t)``, float64, decreasing in ``t`` in [0, 1]: ``c(0) = 1``, ``c(1) = 0``."""
        return interp(1 - t.to(torch.float64), self.alpha_table, self.c_table)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``f(x)`` through ``(xp, fp)`` (``xp`` non-decreasing ``[P]``), clamped at the ends, float64.

    Ties in ``xp`` (flat stretches of ``alpha``) take the left node of the tie.
    """
    x = x.to(device=xp.device, dtype=torch.float64)
    flat = x.reshape(-1).contiguous()  # [N]
    hi = torch.searchsorted(xp, flat).clamp(1, xp.numel() - 1)  # [N], xp[hi - 1] < x <= xp[hi]
    x0, x1, f0, f1 = xp[hi - 1], xp[hi], fp[hi - 1], fp[hi]
    w = ((flat - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0.0, 1.0)  # [N]
    return (f0 + w * (f1 - f0)).reshape(x.shape)

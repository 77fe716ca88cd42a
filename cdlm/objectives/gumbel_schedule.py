"""LangFlow's learnable information-uniform noise schedule (Chen et al. 2026; docs/math.md §3).

The log noise-to-signal ratio ``gamma = log(s^2 / alpha^2)`` is drawn through the Gumbel inverse CDF

    gamma(u) = loc - scale * log(-log u),    u in [1e-5, 1 - 1e-5],

and ``loc, scale`` are fitted with CDCD's recipe (Dieleman et al. 2022, sec. 6.1): a monotone model of the
expected cross-entropy at noise level ``gamma``,

    F(gamma) = A * G((gamma - loc) / scale),    G(x) = exp(-exp(-x))   (the Gumbel CDF),

is regressed on the observed per-sequence CE with ``w * (F(gamma) - sg[CE])^2``, ``w ∝ sg[1 / F'(gamma)]``.
Since ``gamma`` is sampled with density ``F'(gamma) / A``, the weight turns the fit into an unweighted one over
``gamma``; at the optimum ``F = E[CE | gamma]`` and ``F(gamma(u)) = A * u``: the expected CE per unit ``u`` is
the constant ``A``, which is the information-uniform principle, and the schedule samples from exactly that law.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

U_CLAMP = 1e-5  # gamma(u) is clamped at the 1e-5 and 1 - 1e-5 quantiles (docs/math.md §3)


def global_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``softmax(scores)`` ``[B]`` over the rows of every data-parallel process (``torch.distributed``, when it is
    initialised; two scalar all-reduces, no host sync) and the number of processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return torch.softmax(scores, dim=0), 1
    top = scores.max().detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    e = torch.exp(scores - top)  # [B]
    total = e.sum().detach().clone()
    dist.all_reduce(total)
    return e / total, dist.get_world_size()


class GumbelSchedule(nn.Module):
    """Learnable Gumbel(loc, scale) law of ``gamma``, with ``scale = exp(log_scale) > 0`` and ``A = exp(log_amp)``.

    A ``cdlm.objectives.noise_schedule.NoiseSchedule`` (``sigma_of_t``, ``logs``).

    Args:
        loc, scale: initial Gumbel location and scale of ``gamma`` (published: 4.723, 0.852 for ``D = 768``).
        amplitude: initial ``A``, the modelled CE at infinite noise (``log V`` is a natural start).
    """

    def __init__(self, loc: float = 4.723, scale: float = 0.852, amplitude: float = 1.0) -> None:
        super().__init__()
        if scale <= 0 or amplitude <= 0:
            raise ValueError(f"scale and amplitude must be positive, got scale={scale}, amplitude={amplitude}")
        self.loc = nn.Parameter(torch.tensor(float(loc)))  # [] (rank 0: no weight decay)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))  # []
        self.log_amp = nn.Parameter(torch.tensor(math.log(amplitude)))  # []

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def amplitude(self) -> torch.Tensor:
        return self.log_amp.exp()

    def gamma(self, u: torch.Tensor) -> torch.Tensor:
        """``gamma(u) = loc - scale * log(-log u)`` with the CURRENT ``loc, scale`` detached; ``u`` ``[B]`` in [0, 1].

        Increasing in ``u``; computed in ``u``'s floating dtype (float64 for the sampling view).
        """
        dtype = u.dtype if u.is_floating_point() else torch.float32
        u = u.to(dtype).clamp(U_CLAMP, 1 - U_CLAMP)
        loc, scale = self.loc.detach().to(dtype), self.scale.detach().to(dtype)
        return loc - scale * torch.log(-torch.log(u))  # [B]

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """VE noise level ``sigma = s / alpha = exp(gamma(t) / 2)`` for sampler time ``t`` in [0, 1] (1 = noisiest).

        Float64 in and out; increasing in ``t``, so ``sigma(0) = sigma_min`` and ``sigma(1) = sigma_max``.
        """
        return torch.exp(self.gamma(t.to(torch.float64)) / 2)

    def log_slope(self, gamma: torch.Tensor) -> torch.Tensor:
        """``log F'(gamma) = log A - log scale - x - exp(-x)``, ``x = (gamma - loc) / scale``, stable in the tails."""
        x = (gamma - self.loc) / self.scale
        return self.log_amp - self.log_scale - x - torch.exp(-x)

    def curve(self, gamma: torch.Tensor) -> torch.Tensor:
        """The CE model ``F(gamma) = A * exp(-exp(-(gamma - loc) / scale))`` ``[B]``, differentiable in its params."""
        return self.amplitude * torch.exp(-torch.exp(-(gamma - self.loc) / self.scale))

    def fit_loss(self, gamma: torch.Tensor, ce: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """CDCD's fit of ``F`` to the per-sequence CE: ``sum_i w_i (F(gamma_i) - sg[CE_i])^2 / sg[A]^2``.

        ``gamma, ce`` ``[B]`` are detached here. ``w_i ∝ sg[1 / F'(gamma_i)]`` is self-normalised over the
        global batch (a softmax of ``-log F'`` over the rows of every data-parallel rank, so that N processes
        fit what one does; each rank's term is multiplied by N, as data parallelism averages the gradients): the
        heavy Gumbel tails of ``1 / F'`` cannot blow up the loss's magnitude, and dividing by ``sg[A]^2`` makes
        it dimensionless (at most about 1), so it barely touches the shared gradient-norm clip while Adam,
        scale-invariant per parameter, still moves ``loc, scale, A`` at full rate. Computed in float32 whatever
        the autocast dtype, since the tails need the range. ``valid`` ``[B]`` (bool) leaves out rows without
        tokens by a zero weight, not by indexing, so the shapes stay static (no host sync).
        """
        gamma, ce = gamma.detach().float(), ce.detach().float()
        with torch.autocast(gamma.device.type, enabled=False):
            scores = -self.log_slope(gamma).detach()  # [B]
            if valid is not None:
                scores = scores.masked_fill(~valid, -1e30)  # finite: a batch without tokens gives no NaN
            w, world = global_softmax(scores)  # [B], sums to 1 over the valid rows of every rank
            if valid is not None:
                w = w * valid
            residual = (self.curve(gamma) - ce) / self.amplitude.detach()  # [B]
            return world * (w * residual.square()).sum()  # x world: data parallelism averages the ranks' gradients

    def logs(self) -> dict[str, torch.Tensor]:
        """Current ``loc``, ``scale`` and ``A`` (detached scalars) for the training log."""
        return {"loc": self.loc.detach(), "scale": self.scale.detach(), "A": self.amplitude.detach()}

"""Denoising through a rectified-flow velocity, and the sampling view of a latent prior under fixed context.

The block-causal latent prior (Cola DLM; MATH.md section 5) denoises one block at a time given the clean blocks
before it. ``ConditionalPrior`` wraps that conditional velocity as a ``ContinuousObjective``, so every continuous
sampler (``euler``, ``heun``, ``churn``) and the ODE bound of section 6 run on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdlm.objectives.sigma_range import SigmaRange

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t [B, N, d], t [B]) -> v_hat [B, N, d]


def x0_from_velocity(x: torch.Tensor, sigma: torch.Tensor, velocity: Velocity) -> torch.Tensor:
    """``x0_hat`` ``[B, N, d]`` of the VE state ``x`` at ``sigma`` (scalar or ``[B]``) for a rectified flow.

    ``z_t = x / (1 + sigma)`` and ``t = sigma / (1 + sigma)`` map VE to the flow's coordinates (MATH.md section 0
    with ``a = 1 - t``, ``b = t``), and ``x0_hat = z_t - t v_hat(z_t, t)``.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])  # [B]
    t = sigma / (1 + sigma)
    z = (x.double() / (1 + sigma[:, None, None])).float()
    return (z.double() - t[:, None, None] * velocity(z, t).double()).to(x.dtype)


class ConditionalPrior(SigmaRange):
    """A ``ContinuousObjective`` whose denoiser is ``velocity`` under a context fixed by the caller.

    ``decode`` returns the clean latents themselves (the caller assembles the blocks and decodes the tokens), and
    the time map, ``data_mean`` and ``data_scale`` are those of ``objective`` (a ``LatentDiffusion``).
    """

    space = "continuous"

    def __init__(self, objective, velocity: Velocity) -> None:
        self.objective, self.velocity = objective, velocity
        self.data_mean, self.data_scale = objective.data_mean, objective.data_scale

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.objective.sigma(t)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat`` ``[B, N, d]``; ``x0_prev`` is ignored (the prior has no self-conditioning)."""
        return x0_from_velocity(x, sigma, self.velocity)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The block's clean latents ``[B, N, d]`` as they are."""
        return x

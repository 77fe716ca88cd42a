"""The block-causal latent prior (Cola DLM; docs/math.md §5): its network passes, sampling and bound view.

Latents form blocks of ``prior_block``; block ``b`` is denoised given the clean blocks before it. Training runs a
noisy and a clean copy in one pass under ``two_stream_mask`` (BD3-LM's vectorised form); sampling goes block after
block over a ``KVCache`` of the finished blocks. ``ConditionalPrior`` wraps a conditional velocity as a
``ContinuousObjective``, so every continuous sampler (``euler``, ``heun``, ``churn``) and the ODE bound of section 6
run on it unchanged; ``x0_from_velocity`` is the rectified flow's denoiser in VE form, shared with the bidirectional
prior.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdlm.models.kv_cache import KVCache
from cdlm.objectives.sigma_range import SigmaRange

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t [B, N, d], t [B]) -> v_hat [B, N, d]


def x0_from_velocity(x: torch.Tensor, sigma: torch.Tensor, velocity: Velocity) -> torch.Tensor:
    """``x0_hat`` ``[B, N, d]`` of the VE state ``x`` at ``sigma`` (scalar or ``[B]``) for a rectified flow.

    ``z_t = x / (1 + sigma)`` and ``t = sigma / (1 + sigma)`` map VE to the flow's coordinates (docs/math.md §0
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


class BlockCausalPrior:
    """Mixin for ``LatentDiffusion``: the block-causal prior's passes (needs ``backbone``, ``in_proj``,
    ``time_embed``, ``out_proj``, ``prior_block``, ``stage`` and ``decode``)."""

    @property
    def blockwise(self) -> bool:
        """Whether sampling goes block by block through ``sample_blocks`` (the block-causal prior)."""
        return self.stage == "prior" and self.prior_block is not None

    def block_velocity(
        self, z: torch.Tensor, t: torch.Tensor, clean: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Block-causal ``v_hat`` ``[B, N, d_z]`` for noisy latents ``z`` at per-latent times ``t`` ``[B, N]`` given
        the clean latents ``clean`` ``[B, N, d_z]`` (one two-stream pass; the clean copy is conditioned on t = 0)."""
        B, N, _ = z.shape
        h = self.in_proj(torch.cat([z, clean.to(z.dtype)], 1))  # [B, 2N, W]
        noisy = self.time_embed(t.flatten().float()).view(B, N, -1)  # [B, N, C]
        at_zero = self.time_embed(t.new_zeros(1, dtype=torch.float32))  # [1, C]: the clean copy's t = 0, once
        c = torch.cat([noisy, at_zero.to(noisy.dtype).expand(B, N, -1)], 1)  # [B, 2N, C]
        both = None if padding is None else torch.cat([padding, padding], 1)
        return self.out_proj(self.backbone(h, c, both, two_stream=True)[:, :N]).float()

    def cached_velocity(self, cache: KVCache, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v_hat`` ``[B, K, d_z]`` of the next block ``z`` at time ``t`` ``[B]`` over the cached clean blocks; the
        cache is left as it was."""
        offset = cache.offset
        h = self.backbone(self.in_proj(z), self.time_embed(t.float()), cache=cache)  # [B, K, W]
        cache.truncate(offset)
        return self.out_proj(h).float()

    @torch.no_grad()
    def sample_blocks(
        self, run: Callable[[ConditionalPrior, torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """Token ids ``[B, L]`` from the block-causal prior, one block after another.

        ``x`` ``[B, N, d_z]`` is the draw at ``sigma_max``; ``run(view, x_block)`` is a continuous sampler on the
        view of one block given the clean blocks before it, returning its clean latents. Each finished block is
        then fed once at ``t = 0`` to extend the KV cache.
        """
        cache = KVCache(self.backbone.depth, capacity=x.shape[1])
        view = ConditionalPrior(self, lambda z, t: self.cached_velocity(cache, z, t))
        blocks = []
        for start in range(0, x.shape[1], self.prior_block):
            clean = run(view, x[:, start : start + self.prior_block]).to(x.dtype)  # [B, K, d_z]
            zero = clean.new_zeros(clean.shape[0])
            self.backbone(self.in_proj(clean), self.time_embed(zero), cache=cache)
            blocks.append(clean)
        return self.decode(torch.cat(blocks, 1))

    def given_clean(self, clean: torch.Tensor, padding: torch.Tensor | None = None) -> ConditionalPrior:
        """The block-causal prior's view over all latents at once, each block conditioned on ``clean`` ``[B, N, d_z]``
        (the latents whose density the ODE bound measures)."""

        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.block_velocity(z, t[:, None].expand(z.shape[:2]), clean, padding)

        return ConditionalPrior(self, velocity)

"""Sampling and bound views of the block-causal latent prior (Cola DLM; docs/math.md §5).

Latents form blocks of ``block``; block ``b`` is denoised given the clean blocks before it
(``cdlm.objectives.latent_network.BlockCausalNetwork``). ``ConditionalPrior`` wraps a conditional velocity as a
``ContinuousObjective``, so every continuous sampler (``euler``, ``heun``, ``churn``) and the ODE bound of section 6
run on it unchanged; ``sample_blocks`` goes block after block over a ``KVCache`` of the finished blocks;
``x0_from_velocity`` is the rectified flow's denoiser in VE form, shared with the bidirectional prior.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from cdlm.models.kv_cache import KVCache
from cdlm.objectives.latent_network import BlockCausalNetwork
from cdlm.objectives.sigma_range import SigmaRange
from cdlm.objectives.ve import row_sigma

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t [B, N, d], t [B]) -> v_hat [B, N, d]


class TimeMap(Protocol):
    """What a view borrows from its prior: the time map and the Gaussian of the data."""

    data_mean: float
    data_scale: float

    def sigma(self, t: torch.Tensor) -> torch.Tensor: ...


def x0_from_velocity(x: torch.Tensor, sigma: torch.Tensor, velocity: Velocity) -> torch.Tensor:
    """``x0_hat`` ``[B, N, d]`` of the VE state ``x`` at ``sigma`` (scalar or ``[B]``) for a rectified flow.

    ``z_t = x / (1 + sigma)`` and ``t = sigma / (1 + sigma)`` map VE to the flow's coordinates (docs/math.md §0
    with ``a = 1 - t``, ``b = t``), and ``x0_hat = z_t - t v_hat(z_t, t)``.
    """
    sigma = row_sigma(sigma, x)  # [B] float64
    t = sigma / (1 + sigma)
    z = (x.double() / (1 + sigma[:, None, None])).float()
    return (z.double() - t[:, None, None] * velocity(z, t).double()).to(x.dtype)


class ConditionalPrior(SigmaRange):
    """A ``ContinuousObjective`` whose denoiser is ``velocity`` under a context fixed by the caller.

    ``decode`` returns the clean latents themselves (the caller assembles the blocks and decodes the tokens); the
    time map, ``data_mean`` and ``data_scale`` are those of ``prior``.
    """

    space = "continuous"

    def __init__(self, prior: TimeMap, velocity: Velocity) -> None:
        self.time_map, self.velocity = prior, velocity
        self.data_mean, self.data_scale = prior.data_mean, prior.data_scale

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_map.sigma(t)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat`` ``[B, N, d]``; ``x0_prev`` is ignored (the prior has no self-conditioning)."""
        return x0_from_velocity(x, sigma, self.velocity)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The block's clean latents ``[B, N, d]`` as they are."""
        return x


@torch.no_grad()
def sample_blocks(
    network: BlockCausalNetwork,
    prior: TimeMap,
    run: Callable[[ConditionalPrior, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Clean latents ``[B, N, d_z]`` from the block-causal prior, one block after another.

    ``x`` ``[B, N, d_z]`` is the draw at ``sigma_max``; ``run(view, x_block)`` is a continuous sampler on the view of
    one block given the clean blocks before it, returning its clean latents. Each finished block is then fed once at
    ``t = 0`` to extend the KV cache. ``given``: a prompt's ``(latents [B, N, d_z], blocks [B])``: row ``i``'s first
    ``blocks[i]`` blocks are those latents, not drawn (the sampler runs on a block only while some row draws it), and
    every later block is drawn given them.
    """
    cache = KVCache(network.backbone.depth, capacity=x.shape[1])
    view = ConditionalPrior(prior, lambda z, t: network.cached(cache, z, t))
    blocks = []
    for index, start in enumerate(range(0, x.shape[1], network.block)):
        part = slice(start, start + network.block)
        kept = None if given is None else given[1] > index  # [B]: rows whose prompt holds this block
        if kept is not None and bool(kept.all()):
            clean = given[0][:, part].to(x.dtype)
        else:
            clean = run(view, x[:, part]).to(x.dtype)  # [B, K, d_z]
            if kept is not None:
                clean = torch.where(kept[:, None, None], given[0][:, part].to(x.dtype), clean)
        network.extend(cache, clean)
        blocks.append(clean)
    return torch.cat(blocks, 1)


def given_clean(
    network: BlockCausalNetwork, prior: TimeMap, clean: torch.Tensor, padding: torch.Tensor | None = None
) -> ConditionalPrior:
    """The block-causal prior's view over all latents at once, each block conditioned on ``clean`` ``[B, N, d_z]``
    (the latents whose density the ODE bound measures)."""

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return network.two_stream(z, t[:, None].expand(z.shape[:2]), clean, padding)

    return ConditionalPrior(prior, velocity)

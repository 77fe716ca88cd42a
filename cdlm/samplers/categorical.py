"""Categorical draws in float64 and nucleus filtering (docs/math.md §0, "Categorical sampling in float64")."""

from __future__ import annotations

import torch


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of ``probs`` ``[..., V]`` by an exponential race in float64.

    ``argmax(p / E)`` with ``E ~ Exp(1)`` is a Gumbel-max draw; in float32 it loses low-probability tokens.
    """
    probs = probs.double()
    u = torch.rand(probs.shape, dtype=torch.float64, device=probs.device, generator=generator)
    race = -torch.log1p(-u)  # Exp(1), exact near u = 0
    return (probs / race).argmax(-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches ``top_p`` and renormalise (Holtzman et al., 2020)."""
    if top_p >= 1.0:
        return probs
    if not 0.0 < top_p < 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens entirely beyond the nucleus
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)

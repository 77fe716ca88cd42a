"""Categorical draws in float64 and nucleus filtering (docs/math.md §0, "Categorical sampling in float64").

Draws run over chunks of rows (``row_chunks``): the float64 buffers of a draw over ``[N, V]`` are ``[chunk, V]``,
about ``DRAW_ELEMENTS`` elements, whatever ``N``. The law is unchanged by the chunking, and so are the draws: the
generator fills the chunks' uniforms in the order it would fill one array.
"""

from __future__ import annotations

import torch

DRAW_ELEMENTS = 2**26  # float64 elements per chunk of a draw: 512 MiB per [chunk, V] buffer, 1,335 rows at V = 50,257


def row_chunks(rows: int, width: int) -> list[slice]:
    """Slices of at most ``max(1, DRAW_ELEMENTS // width)`` rows covering ``rows`` rows (one empty slice if none)."""
    step = max(1, DRAW_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)] or [slice(0, 0)]


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` ``[n, V]`` (unnormalised is fine; summed in float64): the first index whose
    cumulative mass exceeds ``u`` times the row's total, ``u ~ U[0, 1)``. A token of zero mass is never drawn (the
    cumulative mass does not rise at it); one uniform per row, where a Gumbel-max race needs ``V``."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [n, V]: float64 sums whatever the input's dtype
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device, generator=generator)  # [n, 1]
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # [n, 1]
    return index.clamp_max_(probs.shape[-1] - 1)[:, 0]  # [n]; the clamp only guards u * total rounding up


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of ``probs`` ``[..., V]`` by inverse-CDF sampling in float64, chunk by chunk.

    In float32 the cumulative mass over a large vocabulary loses low-probability tokens; in float64 its rounding is
    far below any probability a model assigns. Only a chunk of rows is in float64 at a time (``row_chunks``).
    """
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    draws = [inverse_cdf(flat[rows], generator) for rows in row_chunks(flat.shape[0], flat.shape[1])]
    return torch.cat(draws).view(probs.shape[:-1])


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool ``[..., V]``: the smallest set of tokens of ``probs`` ``[..., V]`` whose mass reaches ``top_p``."""
    if not 0.0 < top_p < 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = ~(sorted_p.cumsum(-1) - sorted_p > top_p)  # drop only the tokens entirely beyond the nucleus
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def renormalise(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``probs`` ``[..., V]`` restricted to ``keep`` (bool, same shape) and renormalised."""
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches ``top_p`` and renormalise (Holtzman et al., 2020)."""
    if top_p >= 1.0:
        return probs
    return renormalise(probs, nucleus(probs, top_p))


def draw_tokens(
    logp: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of ``log p_theta`` ``[N, V]``: argmax at ``temperature = 0``, else a float64 draw from
    ``p^(1/temperature)`` (renormalised) after nucleus filtering, over chunks of rows (``row_chunks``)."""
    if temperature == 0 or logp.shape[0] == 0:
        return logp.argmax(-1)
    draws = []
    for rows in row_chunks(*logp.shape):
        probs = (logp[rows].double() / temperature).softmax(-1)  # [n, V] float64: the draw must keep rare tokens
        draws.append(sample_categorical(top_p_filter(probs, top_p), generator))
    return torch.cat(draws)  # [N]

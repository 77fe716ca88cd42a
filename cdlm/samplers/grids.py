"""Time grids: small functions returning ``[T + 1]`` tensors from ``t = 1`` (noise) down to data (docs/math.md §0)."""

from __future__ import annotations

import torch


def linear_grid(steps: int, device: torch.device | str = "cpu", t_end: float = 1e-5) -> torch.Tensor:
    """``linspace(1, t_end, steps + 1)`` in float64 (docs/math.md §1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64, device=device)

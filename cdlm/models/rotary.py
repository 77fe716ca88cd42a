"""Rotary position embeddings (Su et al., 2021, "RoFormer", eq. 34), rotate-half form."""

from __future__ import annotations

import torch
from torch import nn


def ntk_base(base: float, head_dim: int, scale: float) -> float:
    """NTK-aware rotary base for a context ``scale`` times the trained one (bloc97's NTK scaling, used by LongLLaDA,
    Liu et al. 2025, to sample diffusion LMs beyond their trained length; docs/sampling.md, "Longer than trained"):
    ``base * scale^(Dh / (Dh - 2))``. The highest frequency is unchanged (local order stays sharp) and the lowest is
    divided by ``scale`` exactly, so position ``scale * p`` gets the angle position ``p`` had in training."""
    return base * scale ** (head_dim / (head_dim - 2)) if head_dim > 2 else base * scale


class Rotary(nn.Module):
    """Holds the inverse frequencies; returns ``(cos, sin)`` tables ``[L, Dh]`` for a length. ``scale``: NTK-aware
    scaling for ``scale`` times the trained context (``ntk_base``; 1 = none); ``rescale`` changes it in place (the
    frequencies are not saved with the weights)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10_000.0, scale: float = 1.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head dimension must be even, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self.frequencies(scale), persistent=False)
        self.max_len, self.scale = max_len, scale

    def frequencies(self, scale: float) -> torch.Tensor:
        """``1 / base'^(2i / Dh)`` ``[Dh / 2]`` float32 with ``base' = ntk_base(base, Dh, scale)``."""
        base = ntk_base(self.base, self.head_dim, scale)
        return 1.0 / base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)

    def rescale(self, scale: float) -> None:
        """Use NTK-aware scaling by ``scale`` (>= 1; 1 restores the trained frequencies)."""
        if not (isinstance(scale, (int, float)) and scale >= 1):
            raise ValueError(f"rope_scale must be a number >= 1 (1 = as trained), got {scale!r}")
        self.inv_freq = self.frequencies(float(scale)).to(self.inv_freq.device)
        self.scale = float(scale)

    def forward(self, length: int, device: torch.device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if offset + length > self.max_len:
            raise ValueError(f"sequence length {offset + length} exceeds the rotary table max_len={self.max_len}")
        pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # [L, Dh/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [L, Dh]
        return angles.cos(), angles.sin()


def rotary_at(rotary: Rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[B, 1, m, Dh]`` at per-row ``positions`` ``[B, m]`` (broadcast over heads)."""
    cos, sin = rotary(int(positions.max()) + 1, positions.device)  # [P, Dh]
    return cos[positions][:, None], sin[positions][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, L, Dh]`` by position; the tables are cast to ``x``'s dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

"""Rotary position embeddings (Su et al., 2021, "RoFormer", eq. 34), rotate-half form."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Holds the inverse frequencies; returns ``(cos, sin)`` tables ``[L, Dh]`` for a length."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10_000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head dimension must be even, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_len = max_len

    def forward(self, length: int, device: torch.device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if offset + length > self.max_len:
            raise ValueError(f"sequence length {offset + length} exceeds the rotary table max_len={self.max_len}")
        pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # [L, Dh/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [L, Dh]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, L, Dh]`` by position; the tables are cast to ``x``'s dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

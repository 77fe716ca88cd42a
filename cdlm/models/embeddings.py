"""Small embedding modules shared by objectives: the noise-level (time) embedding."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """Sinusoidal features of a scalar noise level followed by an MLP (DiT, Peebles & Xie 2023, sec. 3.2).

    ``forward(t)`` maps ``[B]`` (any real scale: ``t`` in [0, 1], ``log sigma``, ...) to ``[B, width]``.
    """

    def __init__(self, width: int, frequencies: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.frequencies, self.scale = frequencies, scale
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = self.scale * t.float()[:, None] * freqs[None]  # [B, F/2]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # [B, width]

"""The optimizer and learning-rate schedule of every run: AdamW without decay on rank < 2 weights, linear warm-up
then cosine decay (``DiffusionLM.configure_optimizers``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FUSED_ADAMW = ("cuda", "cpu")  # devices where AdamW runs its fused kernel (on 2 CPU cores 4.5x the foreach one)


def adamw(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float], fused: bool
) -> torch.optim.AdamW:
    """AdamW over the trainable ``params``: weight decay on matrices only (no decay on biases, norms and embeddings
    of rank < 2); ``fused`` picks the fused kernel (``FUSED_ADAMW`` devices, when no gradient scaler unscales before
    clipping)."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

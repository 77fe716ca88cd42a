"""The text VAE's optional alignment to a frozen sentence encoder (Cola DLM; docs/math.md §5).

The pooled posterior mean of each training text, through a linear head and L2 normalisation, regresses the frozen
encoder's unit-norm feature of the same text: ``|normalise(head(mean_n mu)) - f(text)|^2``, averaged over the batch.
The encoder is loaded when the run is built (``cdlm.objectives.teacher.load_encoder``) and checked by the
``TextVAEObjective`` it is passed to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def alignment_loss(
    encoder: nn.Module, head: nn.Linear, texts: list[str], mean: torch.Tensor, latent_padding: torch.Tensor
) -> torch.Tensor:
    """Mean over the batch of ``|normalise(head(pooled mu)) - f(text)|^2``; ``mean`` ``[B, N, d_z]``, ``latent_padding``
    ``[B, N]``, one text per row."""
    target = encoder(texts)  # [B, F]
    w = latent_padding[..., None].float()  # [B, N, 1]
    pooled = (mean * w).sum(1) / w.sum(1).clamp_min(1)  # [B, d_z]
    predicted = F.normalize(head(pooled).float(), dim=-1)
    return (predicted - target).square().sum(-1).mean()

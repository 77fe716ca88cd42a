"""Likelihood metrics accumulated in float64 and synced across ranks (docs/math.md §0, "Likelihood units")."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class LikelihoodMetric(Metric):
    """Sums a per-token bound in nats and reports NLL per token, PPL and bits per character.

    ``BPC = sum nll / (ln 2 * sum characters)``; ``PPL = exp(sum nll / sum tokens)``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("nll", "tokens", "chars"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, mask: torch.Tensor, n_chars: torch.Tensor) -> None:
        """``nll`` ``[B, L]`` nats, ``mask`` ``[B, L]`` bool (tokens scored), ``n_chars`` ``[B]`` characters."""
        self.nll += (nll.double() * mask).sum()
        self.tokens += mask.sum().double()
        self.chars += n_chars.double().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        nll = self.nll / self.tokens.clamp_min(1)
        return {"nll": nll, "ppl": nll.exp(), "bpc": self.nll / (math.log(2) * self.chars.clamp_min(1))}

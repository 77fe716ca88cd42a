"""The noise range every continuous objective exposes, read off its own ``sigma(t)`` (docs/math.md §0)."""

from __future__ import annotations

import torch


class SigmaRange:
    """Mixin for continuous objectives: ``sigma_min = sigma(0)`` and ``sigma_max = sigma(1)`` as floats."""

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.zeros(1, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.ones(1, dtype=torch.float64)))

"""Masking schedules for absorbing diffusion (MDLM, Sahoo et al. 2024, sec. 3; docs/math.md §1).

``alpha(t)`` is the probability that a token is still visible at time ``t`` in [0, 1]; ``t = 1`` is the
noisiest. ``weight(t) = -alpha'(t) / (1 - alpha(t))`` is the NELBO weight of a masked token's CE (MDLM eq. 10).
These are a masked objective's ``schedule`` (``cdlm.types.MaskSchedule``), which the discrete samplers read; the
continuous objectives' noise schedules are another kind (``cdlm.objectives.noise_schedule.NoiseSchedule``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from cdlm import checks


class Schedule(ABC):
    """Base class: subclasses give ``alpha`` and its analytic derivative ``dalpha``."""

    def __init__(self, eps: float = 1e-3) -> None:
        checks.in_interval("eps", eps, 0.0, 1.0, high_open=True)  # alpha(1) = eps: 1 would never mask a token
        self.eps = eps

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dalpha(self, t: torch.Tensor) -> torch.Tensor: ...

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return -self.dalpha(t) / (1 - self.alpha(t))


class LogLinear(Schedule):
    """``alpha_t = 1 - (1 - eps) t``: the log-linear noise ``sigma(t) = -log(1 - (1 - eps) t)`` of MDLM."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1 - self.eps))


class Cosine(Schedule):
    """``alpha_t = 1 - cos(pi/2 (1 - (1 - eps) t))`` (docs/math.md §1)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - torch.cos(math.pi / 2 * (1 - (1 - self.eps) * t))

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -(math.pi / 2) * (1 - self.eps) * torch.sin(math.pi / 2 * (1 - (1 - self.eps) * t))


SCHEDULES: dict[str, type[Schedule]] = {"loglinear": LogLinear, "cosine": Cosine}


def build_schedule(name: str, eps: float = 1e-3) -> Schedule:
    """The schedule called ``name`` (``loglinear`` or ``cosine``) with ``eps`` in [0, 1)."""
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {sorted(SCHEDULES)}")
    return SCHEDULES[name](eps)

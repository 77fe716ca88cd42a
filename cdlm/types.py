"""The contracts between objectives, samplers and the Lightning module (DESIGN.md, "The contracts")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

Space = Literal["continuous", "discrete", "autoregressive"]
Batch = dict[str, torch.Tensor]  # input_ids [B, L], attention_mask [B, L], n_chars [B], optional u [B]


@dataclass
class LossOutput:
    """What ``Objective.loss`` and ``Objective.nll`` return.

    ``loss`` is the scalar to minimise; ``nll`` ``[B, L]`` is the per-token bound in nats (zero where
    ``mask`` is False); ``logs`` holds extra scalars to log.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    mask: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """Any training objective: it owns its adapters, heads and schedule."""

    space: Space

    def loss(self, batch: Batch) -> LossOutput: ...

    def nll(self, batch: Batch) -> LossOutput: ...


@runtime_checkable
class DiscreteObjective(Objective, Protocol):
    """Discrete sampling view (MATH.md section 0): ``denoise(z_t, t) -> log p(x0 | z_t)`` ``[B, L, V]``."""

    mask_id: int
    vocab_size: int

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def prior(self, n: int, length: int, device: torch.device) -> torch.Tensor: ...


@dataclass
class SamplerStep:
    """What a sampler hands its ``callback`` after every step."""

    index: int
    t: float
    x: torch.Tensor  # the state after the step
    x0: torch.Tensor | None  # the model's current clean estimate (ids or a dense state), if any
    nfe: int  # network evaluations so far

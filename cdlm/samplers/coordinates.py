"""The coordinates a continuous sampler keeps its state in: the VE state ``x`` ``[B, L, D]`` itself, or its
projection ``y = x @ P`` ``[B, L, K]`` where the network reads ``x`` only through ``P`` (``cdlm.types.ProjectedState``;
docs/math.md §0, "Projected state").

Every update of ``euler`` / ``heun`` / ``churn`` / ``flowmap`` is ``x <- a x + b x0_hat + s eps`` with scalars
``a, b, s``, so ``y`` follows the same recursion with ``x0_hat @ P`` and ``eps @ P``, and ``eps @ P`` is drawn as
``g @ M`` with ``g ~ N(0, I_K)`` and ``M^T M = P^T P`` (``StateProjection.noise``). The network sees the same inputs for
corresponding states, and the ids are decoded from the full estimate ``x0_hat``, so the samples have the same law. For
FLM (``D = V``, ``K`` = the width: 2048 against 256 at the quickstart's size) the state, its updates and its noise
shrink by ``V / W``; the network's ``x0_hat @ E`` replaces its input map ``z @ E`` (the same matmul).
"""

from __future__ import annotations

import torch

from cdlm.prompts import Prompt
from cdlm.types import ContinuousObjective, ProjectedFlowMap, ProjectedState, StateProjection


def projection_of(objective: object) -> StateProjection | None:
    """The objective's ``StateProjection`` if it has one (``ProjectedState``), else None."""
    return objective.state_projection() if isinstance(objective, ProjectedState) else None


def initial_state(
    objective: object, space: str, n: int, length: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """The prior draw a sampler of ``space`` starts from: ``objective.prior``'s, or, for a continuous sampler of an
    objective with a ``StateProjection``, ``prior_projected``'s (the projected state directly: ``K`` draws a position
    instead of ``D``)."""
    if space == "continuous" and projection_of(objective) is not None:
        return objective.prior_projected(n, length, device, generator)
    return objective.prior(n, length, device, generator)


class StateCoordinates:
    """The state a continuous sampler updates and how it calls the network, for ``objective`` and its prior draw
    ``x``: ``[B, L, D]``, or already projected ``[B, L, K]`` (``initial_state``).

    ``initial``: the state to start from (``x``, or ``x @ P`` ``[B, L, K]`` float32). ``denoise`` / ``flow_denoise``
    return ``(x0_hat, x0_hat in these coordinates)``: the full estimate (for the decode, self-conditioning and
    callbacks) and the one the updates use. ``noise(g)`` maps a standard normal draw of the state's shape to the
    noise of these coordinates. ``projected`` says which coordinates these are.
    """

    def __init__(self, objective: ContinuousObjective, x: torch.Tensor, prompt: Prompt | None = None) -> None:
        self.objective = objective
        projection = projection_of(objective)
        self.projected, self.map = projection is not None, None
        self.fixed = self.clean = self.clean_state = None
        if prompt is not None:  # replacement: the estimate at a fixed position is the prompt token's clean state
            self.fixed = prompt.fixed[..., None]  # [B, L, 1]
            self.clean = objective.clean_state(prompt.ids).float()  # [B, L, D]
            self.clean_state = self.clean
            if projection is not None:
                with torch.autocast(x.device.type, enabled=False):
                    self.clean_state = self.clean @ projection.matrix  # [B, L, K]
        if projection is None:
            self.initial = x
            return
        self.map = projection.noise  # [K, K]
        if x.shape[-1] == projection.matrix.shape[1]:  # drawn projected (K < D: no ambiguity)
            self.initial = x
            return
        with torch.autocast(x.device.type, enabled=False):  # float32 products, as the network's input map
            self.initial = x.float() @ projection.matrix  # [B, L, K]

    def clamp(self, x0: torch.Tensor, x0_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, x0_state)`` with the prompt's clean states at its fixed positions (unchanged without a prompt)."""
        if self.fixed is None:
            return x0, x0_state
        x0 = torch.where(self.fixed, self.clean.to(x0.dtype), x0)
        return x0, x0 if not self.projected else torch.where(self.fixed, self.clean_state.to(x0_state.dtype), x0_state)

    def denoise(
        self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat [B, L, D], x0_hat in these coordinates)`` for the float32 state ``x`` at ``sigma`` ``[B]``."""
        if self.projected:
            return self.clamp(*self.objective.denoise_projected(x, sigma, x0_prev))
        x0 = self.objective.denoise(x, sigma, x0_prev)
        return self.clamp(x0, x0)

    def flow_denoise(
        self, x: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_{s,t} [B, L, D], D_{s,t} in these coordinates)`` of a two-time objective (``FlowMapObjective``)."""
        if self.projected and isinstance(self.objective, ProjectedFlowMap):
            return self.clamp(*self.objective.flow_denoise_projected(x, sigma_s, sigma_t))
        if self.projected:
            raise TypeError(f"{type(self.objective).__name__} projects its state but has no flow_denoise_projected")
        d = self.objective.flow_denoise(x, sigma_s, sigma_t)
        return self.clamp(d, d)

    def noise(self, g: torch.Tensor) -> torch.Tensor:
        """The noise ``[B, L, K|D]`` of these coordinates from a standard normal draw ``g`` of the state's shape:
        ``g`` itself, or ``g @ M`` (``StateProjection.noise``), float32."""
        if self.map is None:
            return g
        with torch.autocast(g.device.type, enabled=False):
            return g @ self.map

"""What every VE-form continuous objective shares: the Gaussian at ``sigma_max``, per-row noise levels, the
training ``u`` and the ODE likelihood bound (docs/math.md §0, §6).

A continuous objective hands its samplers the VE state ``x~ = x0 + sigma eps`` (docs/math.md §0). ``VEObjective``
gives such an objective, from the few numbers that describe it, the parts of ``cdlm.types.ContinuousObjective``
that do not depend on its network:

- ``prior(n, length, device, generator)``: a draw at ``sigma_max`` ``[n, length, D]``,
  ``N(data_mean, (sigma_max^2 + data_scale^2) I)``, the Gaussian the ODE bound scores (``ode_likelihood``);
- ``nll(batch)``: that bound, ``ode_steps`` Heun steps, ``ode_rows`` sequences per solve, ``ode_probes``
  Hutchinson probes per sequence (docs/math.md §6).

A subclass declares ``sigma_min``, ``sigma_max``, ``data_scale``, ``data_mean`` (attributes or properties),
``state_width`` (``D``) and ``ode_steps``; ``state_shape`` is the hook for a state whose length is not the token
length (a latent with ``r`` tokens per latent). The module-level ``row_sigma`` and ``training_u`` are the per-row
noise level and the training time every objective reads.
"""

from __future__ import annotations

import math

import torch

from cdlm.objectives.ode_likelihood import ode_nll
from cdlm.objectives.training_time import training_u  # noqa: F401  (re-exported)
from cdlm.types import Batch, LossOutput


def row_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as float64 ``[B]`` on ``x``'s device, for a state ``x`` ``[B, ...]``.

    ``sigma`` is a Python number, a 0-d or one-element tensor (one level for every row) or ``[B]`` (one per row);
    the result is a (possibly expanded, read-only) view, so write into a copy.
    """
    return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])


class VEObjective:
    """Mixin for VE-form continuous objectives (docs/math.md §0, §6): the prior at ``sigma_max`` and the ODE bound.

    Declared by the subclass: ``sigma_min``, ``sigma_max``, ``data_scale``, ``data_mean`` (floats; ``SigmaRange``
    reads the first two off ``sigma(t)``), ``state_width`` (``D``, the last dimension of the state) and ``ode_steps``
    (Heun steps of ``nll``); ``ode_rows`` (sequences per ODE solve, None = the whole batch) defaults to None and
    ``ode_probes`` (Hutchinson probes per sequence on the one trajectory; ``>= 2`` adds ``logs["nll_se"]``) to 1.
    """

    sigma_min: float
    sigma_max: float
    data_scale: float
    data_mean: float
    state_width: int
    ode_steps: int
    ode_rows: int | None = None
    ode_probes: int = 1

    def state_shape(self, n: int, length: int) -> tuple[int, ...]:
        """The shape ``[n, length, D]`` of ``n`` states for sequences of ``length`` tokens."""
        return (n, length, self.state_width)

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A draw at ``sigma_max`` ``[n, length, D]`` (float32): ``N(data_mean, (sigma_max^2 + data_scale^2) I)``.

        The exact state at ``sigma_max`` is ``x0 + sigma_max eps``; its moment-matched Gaussian over the data adds
        ``data_mean`` and ``data_scale^2`` per coordinate, negligible at ``sigma_max`` but kept, so that the prior is
        exactly the Gaussian the ODE bound scores (docs/math.md §6). One ``randn`` draw of the state's shape from
        ``generator``, scaled in place (no second state-sized buffer).
        """
        std = math.sqrt(self.sigma_max**2 + self.data_scale**2)
        eps = torch.randn(self.state_shape(n, length), device=device, generator=generator)  # [n, L, D]
        return eps.mul_(std).add_(self.data_mean)  # data_mean + std eps

    def nll(self, batch: Batch) -> LossOutput:
        """The ODE likelihood bound (docs/math.md §6): ``ode_steps`` Heun steps, ``ode_rows`` sequences at a time,
        ``ode_probes`` Hutchinson probes per sequence. With ``ode_probes >= 2``, ``logs["nll_se"]`` is the bound's
        Hutchinson standard error (float64, nats/token; ``ode_likelihood.ode_nll``)."""
        return ode_nll(self, batch, steps=self.ode_steps, rows=self.ode_rows, probes=self.ode_probes)

"""Likelihood metrics accumulated in float64 and synced across ranks (docs/math.md §0, "Likelihood units")."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torchmetrics import Metric

if TYPE_CHECKING:
    from cdlm.module import DiffusionLM


class LikelihoodMetric(Metric):
    """Sums a per-token bound in nats and reports NLL per token, PPL and bits per character.

    ``BPC = sum nll / (ln 2 * sum characters)``; ``PPL = exp(sum nll / sum tokens)``. Where the batches come with
    the standard error of their own per-token bound (``se``: the ODE bound's Hutchinson error with several probes,
    docs/math.md §6), the errors of independent batches add in quadrature: the summed bound's variance is
    ``sum_b (n_b se_b)^2`` for ``n_b`` tokens in batch ``b``, and ``compute`` adds ``nll_se`` and ``bpc_se``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("nll", "tokens", "chars", "nll_var", "se_batches"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, nll: torch.Tensor, mask: torch.Tensor, n_chars: torch.Tensor, se: torch.Tensor | None = None
    ) -> None:
        """``nll`` ``[B, L]`` nats, ``mask`` ``[B, L]`` bool (tokens scored), ``n_chars`` ``[B]`` characters; ``se``
        (0-d, nats/token) the standard error of this batch's per-token bound, if it has one."""
        tokens = mask.sum().double()
        self.nll += (nll.double() * mask).sum()
        self.tokens += tokens
        self.chars += n_chars.double().sum()
        if se is not None:
            self.nll_var += (tokens * se.double()).square()
            self.se_batches += 1

    def compute(self) -> dict[str, torch.Tensor]:
        nll = self.nll / self.tokens.clamp_min(1)
        out = {"nll": nll, "ppl": nll.exp(), "bpc": self.nll / (math.log(2) * self.chars.clamp_min(1))}
        if self.se_batches > 0:
            sum_se = self.nll_var.sqrt()  # the standard error of the summed bound (nats)
            out |= {"nll_se": sum_se / self.tokens.clamp_min(1), "bpc_se": sum_se / (math.log(2) * self.chars)}
        return out


@torch.no_grad()
def score_batches(
    module: DiffusionLM, batches: Iterable[dict], max_batches: int | None = None, dtype=torch.bfloat16
) -> LikelihoodMetric:
    """The objective's ``nll`` summed over ``batches`` with the module's fixed evaluation noise (batch ``i`` under
    ``module.seeded(-1, i)``, as ``DiffusionLM.validation_step``); ``dtype``: autocast dtype (None: full precision)."""
    metric = LikelihoodMetric().to(module.device)
    with torch.autocast(module.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(module.device) for k, v in batch.items()}
            with module.seeded(-1, i):
                out = module.objective.nll(batch)
            metric.update(out.nll, out.mask, batch["n_chars"], out.logs.get("nll_se"))
    return metric

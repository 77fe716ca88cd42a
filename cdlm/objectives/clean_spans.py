"""Conditional training by clean spans, for the continuous objectives (docs/math.md §3, "Conditional training").

CDCD-style conditioning (Dieleman et al. 2022): a fraction ``condition_rate`` of the training rows keeps some
positions clean -- a prefix (continuation) or scattered positions (infilling). The network reads those positions'
clean state, marked by a learned flag vector added to its input, and the loss ignores them, so it learns
``p(free | clean)``. At sampling time the prompt's fixed positions are given the same way (``cdlm.prompts.given``,
opened by the sampling loop around every prompted run), and ``conditional_nll`` is the ODE bound of the free
positions with the fixed ones given.

``CleanSpans`` is the mixin the objectives share (LangFlow, FLM and its flow map, CoBit); each decides what "the
clean state at the network's input" is in its own coordinates and calls ``flagged`` there.
"""

from __future__ import annotations

import torch
from torch import nn

from cdlm import checks, draws
from cdlm.prompts import Prompt, given, given_positions
from cdlm.types import Batch, LossOutput


def clean_spans(padding: torch.Tensor, rate: float) -> torch.Tensor:
    """Positions given clean in training ``[B, L]`` (bool).

    A row is conditioned with probability ``rate``; a conditioned row gets, with probability 1/2, a prefix of
    ``k ~ U{1, .., n - 1}`` of its ``n`` tokens (continuation), else each position with probability ``r ~ U(0, 1)``
    (infilling). Padding is never given. Drawn per row (``cdlm.draws``), static shapes.
    """
    rows, length = padding.shape
    u = draws.rand(rows, 4, device=padding.device)  # [B, 4]: conditioned, kind, prefix fraction, rate
    n = padding.sum(1)  # [B]
    k = (u[:, 2] * (n - 1).clamp_min(0)).floor() + 1  # [B] in 1..n-1
    prefix = torch.arange(length, device=padding.device)[None] < k[:, None]  # [B, L]
    scattered = draws.rand(rows, length, device=padding.device) < u[:, 3:4]  # [B, L]
    spans = torch.where((u[:, 1] < 0.5)[:, None], prefix, scattered)
    return spans & (u[:, :1] < rate) & padding


def check_condition_rate(rate: float) -> None:
    """A clear error unless ``rate`` is a probability."""
    if not (checks.is_real(rate) and 0.0 <= rate <= 1.0):
        raise checks.ArgumentError(f"condition_rate is a probability in [0, 1], got {rate}")


class CleanSpans:
    """Mixin for an ``nn.Module`` objective trained with clean spans.

    ``init_clean_spans(rate, width)`` in the constructor sets ``condition_rate`` and, when it is positive, the flag
    ``clean_flag`` ``[width]`` (zero at initialisation: the network starts as the unconditional one). ``nll`` is the
    objective's (unconditional) bound over ``attention_mask``.
    """

    condition_rate: float = 0.0
    clean_flag: nn.Parameter

    def init_clean_spans(self, rate: float, width: int) -> None:
        """Set ``condition_rate`` (checked) and, if positive, the zero flag ``clean_flag`` ``[width]``."""
        check_condition_rate(rate)
        self.condition_rate = rate
        if rate > 0:
            self.clean_flag = nn.Parameter(torch.zeros(width))

    def training_spans(self, ids: torch.Tensor, padding: torch.Tensor) -> Prompt | None:
        """The clean spans of a training batch (``clean_spans``) as a ``Prompt`` over ``ids`` ``[B, L]``, or None
        when the objective is trained unconditionally."""
        if self.condition_rate <= 0:
            return None
        return Prompt(ids, clean_spans(padding, self.condition_rate))

    def spans(self, clean: Prompt | None, rows: int, length: int) -> Prompt | None:
        """The clean positions of a network call on ``rows`` x ``length`` tokens: ``clean`` if given (training),
        else the prompt given to the sampler (``cdlm.prompts.given_positions``) when the objective was trained with
        clean spans, else None (a model trained without them is prompted by replacement only)."""
        if clean is not None or self.condition_rate <= 0:
            return clean
        return given_positions(rows, length)

    def flagged(self, h: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """``h + clean * clean_flag``: the network input ``h`` ``[B, L, width]`` with the positions ``clean``
        ``[B, L]`` (bool) marked."""
        return h + clean[..., None].to(h.dtype) * self.clean_flag.to(h.dtype)

    def conditional_nll(self, batch: Batch, fixed: torch.Tensor) -> LossOutput:
        """The bound of the tokens not in ``fixed`` ``[B, L]`` (bool) given the ``fixed`` ones clean:
        ``-log p(x_free | x_fixed)`` per free token (docs/math.md §3, "Conditional training"). The network reads the
        fixed positions clean at every evaluation, so the flow of the free coordinates is an ODE of its own; the
        probes, the prior and the decoder cover the free positions only. Needs ``condition_rate > 0``."""
        if self.condition_rate <= 0:
            raise ValueError("conditional_nll needs a model trained with clean spans (objective.condition_rate > 0)")
        padding = batch["attention_mask"].bool()  # [B, L]
        with given(Prompt(batch["input_ids"], fixed & padding)):
            return self.nll({**batch, "attention_mask": padding & ~fixed})

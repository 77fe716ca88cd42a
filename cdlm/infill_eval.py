"""Infilling accuracy (``cdlm eval infill_span=K``; docs/math.md §8, "Infilling").

The canvas is ``n`` windows of real validation text (the reference row's windows), each with the ``K`` tokens in its
middle left free and every other position kept (a ``cdlm.prompts.Prompt``). The model fills the span under each seed;
the accuracy is the fraction of span tokens equal to the true ones. Beside it: the expected accuracy of independent
unigram draws in the span (``sum p_unigram(x_true)`` over the span tokens, exact, no draws) and the unigram's NLL of
the span's true tokens, and, for an objective
with a conditional bound (masked diffusion; a continuous objective trained with clean spans), that bound of the span
given the rest, nats/token -- the likelihood side of the same task.
"""

from __future__ import annotations

import torch

from cdlm.metrics.unigram import UnigramModel
from cdlm.prompts import Prompt
from cdlm.types import AbsorbingObjective

MC_DRAWS = 8  # one-sample NELBOs per window for masked diffusion's span bound


def span_canvas(windows: torch.Tensor, span: int) -> Prompt:
    """The windows ``[n, L]`` with the ``span`` middle positions free, the rest fixed; a ``ValueError`` unless
    ``0 < span < L``."""
    n, length = windows.shape
    if not 0 < span < length:
        raise ValueError(f"infill_span must lie in [1, length - 1] = [1, {length - 1}], got {span}")
    start = (length - span) // 2
    fixed = torch.ones(n, length, dtype=torch.bool)
    fixed[:, start : start + span] = False
    return Prompt(windows, fixed)


def span_accuracy(ids: torch.Tensor, canvas: Prompt) -> float:
    """The fraction of the free positions of ``canvas`` where ``ids`` ``[n, L]`` holds the true token."""
    free = ~canvas.fixed
    return float((ids.cpu() == canvas.ids)[free].double().mean())


def unigram_accuracy(unigram: UnigramModel, canvas: Prompt) -> float:
    """The expected accuracy of independent unigram draws at the free positions: the mean of ``p(x_true)``."""
    return float(unigram.probs[canvas.ids[~canvas.fixed]].mean())


def unigram_nll(unigram: UnigramModel, canvas: Prompt) -> float:
    """The unigram's NLL of the true tokens at the free positions, nats/token: the span bound of a model that knows
    token frequencies and no context (the row the span bound is read against, issue 17's unigram row)."""
    return float(-unigram.log_probs[canvas.ids[~canvas.fixed]].mean())


def span_bound(module, canvas: Prompt, draws: int = MC_DRAWS) -> float | None:
    """The objective's bound of the free tokens given the fixed ones (``conditional_nll``), nats/token over the span
    (fixed noise, the evaluation's seed): the mean of ``draws`` one-sample NELBOs at stratified times per window for
    masked diffusion, the ODE bound for a continuous objective trained with clean spans. None for an objective
    without one: autoregressive (the span has kept tokens after it), a continuous model trained without clean spans,
    a latent model."""
    objective = module.objective
    bound = getattr(objective, "conditional_nll", None)
    if bound is None or objective.space == "autoregressive" or getattr(objective, "condition_rate", 1.0) <= 0:
        return None
    repeats = draws if isinstance(objective, AbsorbingObjective) else 1
    ids = canvas.ids.to(module.device).repeat_interleave(repeats, 0)  # [n r, L]
    fixed = canvas.fixed.to(module.device).repeat_interleave(repeats, 0)
    u = (torch.arange(repeats, dtype=torch.float64, device=ids.device) + 0.5) / repeats  # [r] stratified
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(fixed), "u": u.repeat(canvas.ids.shape[0])}
    with torch.no_grad(), module.seeded(-1, 0):
        out = bound(batch, fixed)
    return float(out.nll.double().sum() / out.mask.double().sum())


def infill_row(canvas: Prompt, unigram: UnigramModel, bound: float | None) -> dict:
    """The JSON-ready ``result["infill"]``: the span, the unigram draws' expected accuracy, the span bound, and what
    they mean (the accuracy itself is in each seed's row, ``infill_accuracy``)."""
    n, length = canvas.fixed.shape
    span = int((~canvas.fixed[0]).sum())
    return {
        "span": span,
        "unigram_accuracy": unigram_accuracy(unigram, canvas),
        "unigram_span_nll": unigram_nll(unigram, canvas),
        "span_nll": bound,
        "protocol": (
            f"{n} validation windows of {length} tokens (the reference row's), the middle {span} tokens free and the "
            "rest kept; infill_accuracy: the fraction of span tokens sampled equal to the true ones, per seed; "
            "unigram_accuracy: the expected accuracy of independent unigram draws (train split); span_nll: the "
            "objective's conditional bound of the span given the rest, nats/token (null: the objective has none); "
            "unigram_span_nll: the train split's unigram NLL of the span's true tokens, nats/token"
        ),
    }

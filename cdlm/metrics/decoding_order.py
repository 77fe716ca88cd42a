"""How left-to-right a masked-diffusion sampler decodes (NAP's diagnostic; docs/math.md §8, "Decoding order").

NAP (Non-Autoregressive Parallel decoding, "why diffusion LMs decode left to right") measures how far a masked
sampler's commits stray from the autoregressive order. Here: for each row, the Spearman rank correlation between each
generated position's index and the step at which it was committed for the last time (a token remasked and redrawn
counts at its final commit; tokens committed together share their rank). 1: strictly left to right (the
autoregressive order, or semi-autoregressive blocks of one token); about 0: an order unrelated to position (random
order); -1: right to left. The figure is the mean over rows with at least two generated positions.

NAP's own figure, Global-ARness@k, is also kept (``DecodingOrder.arness``): the fraction of commits that land
within the ``k`` leftmost positions still masked after the step (a commit left of every remaining mask counts, so
a block of tokens committed together at the left edge is autoregressive) -- 1 for the autoregressive order, about
``k H_L / L`` for a random order of ``L`` positions.

``DecodingOrder`` is a sampler callback that records the commit steps from the states the sampler hands it;
``left_to_right`` is the rank-correlation statistic itself.
"""

from __future__ import annotations

import torch

from cdlm.types import SamplerStep


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``0 .. n-1`` of ``values`` ``[n]`` (float64), ties sharing their average rank."""
    order = values.argsort(stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    unique, inverse = values.unique(return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def left_to_right(commit_step: torch.Tensor, generated: torch.Tensor) -> float | None:
    """The mean over rows of Spearman's correlation between position and ``commit_step`` ``[B, L]`` over the
    ``generated`` ``[B, L]`` (bool) positions; None when no row has two generated positions. A row whose positions all
    committed at once (no order) counts as 0."""
    values = []
    for steps, mask in zip(commit_step.cpu(), generated.cpu()):
        if int(mask.sum()) < 2:
            continue
        rank_step = average_ranks(steps[mask].double())
        rank_position = torch.arange(int(mask.sum()), dtype=torch.float64)  # positions are in order already
        a, b = rank_step - rank_step.mean(), rank_position - rank_position.mean()
        denominator = float(a.norm() * b.norm())
        values.append(float((a * b).sum()) / denominator if denominator > 0 else 0.0)
    return sum(values) / len(values) if values else None


class DecodingOrder:
    """A sampler callback recording, for a masked sampler's ids ``[B, L]``, the step of each position's last
    commit (a ``mask_id`` that became a token); forwards every step to ``forward`` if given.

    ``fixed`` ``[n, L]`` (bool, the prompt's positions over all ``n`` rows, or None) are not generated. The sampler
    may run in several calls of ``rows`` each (``generate``'s ``batch_size``): a step with index 0 starts a new
    call. ``value()`` is ``left_to_right`` over all rows seen.
    """

    def __init__(self, mask_id: int, fixed: torch.Tensor | None = None, forward=None, k: int = 1) -> None:
        self.mask_id, self.fixed, self.forward, self.k = mask_id, fixed, forward, k
        self.commits = self.near_left = 0  # every commit event; those within the k leftmost remaining masks
        self.done: list[torch.Tensor] = []  # the commit steps of each finished call
        self.commit: torch.Tensor | None = None  # [B, L] int64, -1 = never committed
        self.previous: torch.Tensor | None = None  # [B, L] ids at the last step

    def __call__(self, step: SamplerStep) -> None:
        x = step.x.detach().cpu()
        if step.index == 0 or self.commit is None or self.commit.shape != x.shape:
            self.finish()
            self.commit = torch.full(x.shape, -1, dtype=torch.long)
            self.previous = torch.full_like(x, self.mask_id)  # before the first step (a prompt shows at step 0)
        masked = x == self.mask_id
        committed = (self.previous == self.mask_id) & ~masked  # [B, L]: became a token at this step
        self.commit[committed] = step.index
        left = masked.long().cumsum(1) - masked.long()  # [B, L]: masks still left of each position
        if self.fixed is not None:  # the prompt shows at the first step: no commit
            rows = sum(len(c) for c in self.done)
            committed &= ~self.fixed.cpu()[rows : rows + x.shape[0]]
        self.commits += int(committed.sum())
        self.near_left += int((committed & (left < self.k)).sum())
        self.previous = x.clone()
        if self.forward is not None:
            self.forward(step)

    def finish(self) -> None:
        """Close the current sampler call (``value`` does it)."""
        if self.commit is not None:
            self.done.append(self.commit)
            self.commit = self.previous = None

    def arness(self) -> float | None:
        """NAP's Global-ARness@k over every commit recorded (None before any)."""
        return self.near_left / self.commits if self.commits else None

    def value(self) -> float | None:
        """``left_to_right`` over every row recorded, the prompt's ``fixed`` positions left out."""
        self.finish()
        if not self.done:
            return None
        commit = torch.cat(self.done)
        generated = commit >= 0
        if self.fixed is not None:
            generated &= ~self.fixed.cpu()[: len(generated)]
        return left_to_right(commit, generated)

"""Generation-quality metrics (docs/math.md §8): Gen PPL, unigram entropy and distinct-n of samples.

Every state is a float64 sum (``dist_reduce_fx="sum"``), so the metrics give the same value on N ranks as on
one process holding all the samples. Per-sample figures are averaged over samples; Gen PPL is token-weighted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from cdlm.metrics.judges import Judge

Ids = torch.Tensor | Sequence[Sequence[int]]


def sample_rows(ids: Ids, mask: torch.Tensor | None = None) -> list[list[int]]:
    """Token ids per sample: rows of ``ids`` ``[B, L]`` (or ragged lists), keeping positions where ``mask``.

    Masked-out positions are removed and the remaining tokens are read as one sequence.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
        ids = ids.detach().cpu()
        if mask is None:
            return ids.tolist()
        mask = mask.detach().cpu().bool()
        return [row[keep].tolist() for row, keep in zip(ids, mask)]
    rows = [[int(i) for i in row] for row in ids]
    if mask is not None:
        rows = [[i for i, keep in zip(row, m) if keep] for row, m in zip(rows, mask.tolist())]
    return rows


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of the empirical unigram distribution of ``tokens`` (0 for one repeated token)."""
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values()) if n else 0.0


def distinct_n(tokens: Sequence[int], n: int) -> float | None:
    """Unique n-grams / total n-grams of ``tokens``; ``None`` when there is no n-gram (fewer than n tokens)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


class GenPPL(Metric):
    """Generative perplexity: ``exp(sum NLL / sum tokens)`` of decoded samples under a judge (docs/math.md §8).

    Token-weighted over all samples. ``compute()`` returns Gen PPL; ``summary()`` adds the per-token mean NLL
    (nats), the token and sample counts. The judge is a plain attribute, not metric state.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, judge: Judge, **kwargs) -> None:
        super().__init__(**kwargs)
        self.judge = judge
        for name in ("nll", "tokens", "samples"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, texts: list[str]) -> None:
        """Score decoded ``texts`` with the judge and accumulate their NLL and token counts."""
        scores = self.judge.score(list(texts))
        self.nll += sum(s for s, _ in scores)
        self.tokens += sum(n for _, n in scores)
        self.samples += len(scores)

    def mean_nll(self) -> torch.Tensor:
        """Per-token mean NLL in nats of the local state (synced inside ``compute``/``summary``)."""
        return self.nll / self.tokens.clamp_min(1)

    def compute(self) -> torch.Tensor:
        return self.mean_nll().exp()

    def summary(self) -> dict[str, float]:
        """``gen_ppl``, ``nll`` (nats per token), ``tokens`` and ``samples``, synced across ranks."""
        with self.sync_context():
            nll = self.mean_nll()
            return {
                "gen_ppl": float(nll.exp()),
                "nll": float(nll),
                "tokens": float(self.tokens),
                "samples": float(self.samples),
            }


class UnigramEntropy(Metric):
    """Mean over samples of the entropy (nats) of each sample's empirical unigram distribution of token ids.

    The Duo / MDLM "entropy" of generated samples, on the model's own token ids (docs/math.md §8); low values
    flag repetitive samples. ``compute()`` returns nats; ``summary()`` adds bits and the sample count. Samples
    with no token (all masked) are skipped.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("entropy", "samples"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ids: Ids, mask: torch.Tensor | None = None) -> None:
        """``ids`` ``[B, L]`` (or ragged lists) of token ids; ``mask`` ``[B, L]`` bool, the tokens to count."""
        rows = [r for r in sample_rows(ids, mask) if r]
        self.entropy += sum(unigram_entropy(r) for r in rows)
        self.samples += len(rows)

    def compute(self) -> torch.Tensor:
        return self.entropy / self.samples.clamp_min(1)

    def summary(self) -> dict[str, float]:
        """``entropy_nats``, ``entropy_bits`` and ``samples``, synced across ranks."""
        with self.sync_context():
            nats = float(self.entropy / self.samples.clamp_min(1))
            return {"entropy_nats": nats, "entropy_bits": nats / math.log(2), "samples": float(self.samples)}


class DistinctN(Metric):
    """Per-sample distinct-n (unique n-grams / total n-grams of the sample's token ids), averaged over samples.

    ``compute()`` returns ``{"distinct_<n>": mean}`` for each ``n``; a sample shorter than ``n`` tokens does not
    count towards that ``n``'s mean.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, n: Sequence[int] = (1, 2, 3), **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = tuple(int(k) for k in n)
        if not self.n or min(self.n) < 1:
            raise ValueError(f"n must be positive n-gram orders, got {n}")
        for name in ("distinct", "samples"):
            self.add_state(name, default=torch.zeros(len(self.n), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ids: Ids, mask: torch.Tensor | None = None) -> None:
        """``ids`` ``[B, L]`` (or ragged lists) of token ids; ``mask`` ``[B, L]`` bool, the tokens to use."""
        distinct = torch.zeros(len(self.n), dtype=torch.float64)
        samples = torch.zeros(len(self.n), dtype=torch.float64)
        for row in sample_rows(ids, mask):
            for k, n in enumerate(self.n):
                value = distinct_n(row, n)
                if value is not None:
                    distinct[k] += value
                    samples[k] += 1
        self.distinct += distinct.to(self.distinct.device)
        self.samples += samples.to(self.samples.device)

    def compute(self) -> dict[str, torch.Tensor]:
        means = self.distinct / self.samples.clamp_min(1)
        return {f"distinct_{n}": means[k] for k, n in enumerate(self.n)}

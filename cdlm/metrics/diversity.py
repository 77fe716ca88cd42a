"""Diversity of a set of samples: self-BLEU (Zhu et al. 2018, "Texygen"; docs/math.md §8, "Diversity").

Each sample is scored by BLEU-4 (torchmetrics' ``bleu_score``: clipped n-gram precisions up to 4, geometric mean,
brevity penalty, no smoothing) against all the other samples of the set as references; self-BLEU is the mean. On the
model's own token ids (written as space-separated numbers, so no tokenizer decides what a word is). 1: every sample
repeats the others' n-grams (mode collapse); near 0: samples share few 4-grams. It complements the per-sample
distinct-n, which sees repetition inside a sample but not between samples.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.text import bleu_score


def self_bleu(ids: torch.Tensor, mask: torch.Tensor | None = None, n_gram: int = 4) -> float | None:
    """Mean BLEU-``n_gram`` of each row of ``ids`` ``[n, L]`` (its tokens where ``mask``, if given) against the other
    rows; None for fewer than two rows."""
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    texts = [" ".join(str(t) for t in row[m].tolist()) for row, m in zip(ids.cpu(), keep.cpu())]
    if len(texts) < 2:
        return None
    scores = [float(bleu_score([text], [texts[:i] + texts[i + 1 :]], n_gram=n_gram)) for i, text in enumerate(texts)]
    return sum(scores) / len(scores)

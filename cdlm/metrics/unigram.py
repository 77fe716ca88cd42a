"""The unigram reference of the evaluation protocol (docs/math.md §8): a model of token frequencies alone.

A ``UnigramModel`` is fitted on a run's train split (its own token stream, the run's tokenizer) with add-alpha
smoothing over the tokenizer's whole vocabulary, ``alpha = 0.5`` by default (``ALPHA``):

    p(v) = (count(v) + alpha) / (N + alpha V)        N train tokens, V the vocabulary

Scored on the validation tokens of a model's bound (``unigram_bound``, the same batches and characters), it says
how far a bound is below what token frequencies alone give; its independent draws (``UnigramModel.sample``) give
the Gen PPL of text with the right frequencies and no context. Everything is float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch

from cdlm.metrics.likelihood import LikelihoodMetric

ALPHA = 0.5  # add-alpha smoothing of the protocol's unigram reference (Jeffreys prior)
COUNT_CHUNK = 2**24  # tokens read per bincount while counting a split (128 MiB of int64 at most)


class TokenStream(Protocol):
    """A token stream ``[N]`` read in contiguous slices: a numpy array, a 1-D tensor or a cache's ``TokenFile``."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice) -> Any: ...


def count_tokens(tokens: TokenStream, vocab_size: int, chunk: int = COUNT_CHUNK) -> torch.Tensor:
    """Occurrences of each id of ``[0, vocab_size)`` in ``tokens`` ``[N]``, as float64 ``[V]``; read ``chunk``
    tokens at a time, so a corpus on disk is never read whole into memory."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        piece = tokens[start : start + chunk]
        piece = piece.numpy() if isinstance(piece, torch.Tensor) else np.asarray(piece)
        piece = piece.astype(np.int64, copy=False).ravel()
        if piece.size and (piece.min() < 0 or piece.max() >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got {piece.min()}..{piece.max()}")
        counts += np.bincount(piece, minlength=vocab_size)
    return torch.from_numpy(counts).double()


class UnigramModel:
    """Token frequencies of a train split with add-``alpha`` smoothing over the whole vocabulary (docs/math.md §8).

    ``probs`` ``[V]`` float64 is ``(counts + alpha) / (counts.sum() + alpha V)``; ``alpha = 0.5`` (``ALPHA``) in
    the protocol. Build one with ``UnigramModel.fit``.
    """

    def __init__(self, counts: torch.Tensor, alpha: float = ALPHA) -> None:
        if counts.dim() != 1 or counts.numel() == 0:
            raise ValueError(f"counts must be a non-empty [V] tensor, got shape {tuple(counts.shape)}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (every token of the vocabulary keeps some mass), got {alpha}")
        self.counts = counts.double()  # [V]
        self.alpha = float(alpha)
        smoothed = self.counts + self.alpha  # [V]
        self.probs = smoothed / smoothed.sum()  # [V] float64
        self.log_probs = self.probs.log()  # [V]
        self.cdf = self.probs.cumsum(0)  # [V] float64: the inverse-CDF table of ``sample``

    @classmethod
    def fit(cls, tokens: TokenStream, vocab_size: int, alpha: float = ALPHA) -> UnigramModel:
        """The unigram model of ``tokens`` ``[N]`` (ids in ``[0, vocab_size)``) with add-``alpha`` smoothing."""
        return cls(count_tokens(tokens, vocab_size), alpha)

    @property
    def vocab_size(self) -> int:
        return self.probs.numel()

    @property
    def train_tokens(self) -> int:
        """Tokens the model was fitted on."""
        return int(self.counts.sum())

    def nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """``-log p(token)`` in nats, float64, the shape of ``tokens`` (any shape of ids in ``[0, V)``)."""
        return -self.log_probs.to(tokens.device)[tokens.long()]

    def sample(self, n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, length]`` int64 ids drawn independently from ``probs`` by float64 inverse-CDF sampling.

        The rule of ``cdlm.samplers.categorical.inverse_cdf`` (docs/math.md §0, "Categorical draws"): one uniform
        ``u`` per token and the first id whose cumulative mass exceeds ``u``; the cumulative table is built once
        here, since every draw has the same law. The same ``generator`` state gives the same draws.
        """
        u = torch.rand(n * length, dtype=torch.float64, generator=generator)  # [n * length]
        ids = torch.searchsorted(self.cdf, u * self.cdf[-1], right=True)  # [n * length]
        return ids.clamp_max_(self.vocab_size - 1).view(n, length)  # the clamp only guards u * total rounding up

    def __repr__(self) -> str:
        return f"UnigramModel(vocab_size={self.vocab_size}, train_tokens={self.train_tokens}, alpha={self.alpha})"


def unigram_bound(model: UnigramModel, batches: Iterable[dict], max_batches: int | None = None) -> dict[str, float]:
    """The unigram NLL of the tokens a model's bound scores: ``val_nll`` (nats/token), ``val_ppl``, ``val_bpc``.

    ``batches``: the validation batches of ``cdlm.metrics.likelihood.score_batches`` (``input_ids`` ``[B, L]``,
    ``attention_mask`` ``[B, L]`` = the tokens scored, ``n_chars`` ``[B]``), the first ``max_batches`` of them, so
    the tokens and the characters are the bound's (docs/math.md §0, "Units"). ``val_tokens``: tokens scored.
    """
    metric = LikelihoodMetric()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        mask = batch["attention_mask"].bool()  # [B, L]
        ids = batch["input_ids"].masked_fill(~mask, 0)  # [B, L]: padding (whatever its id) is not scored
        metric.update(model.nll(ids), mask, batch["n_chars"])
    scores = {f"val_{k}": float(v) for k, v in metric.compute().items()}
    return scores | {"val_tokens": int(metric.tokens)}

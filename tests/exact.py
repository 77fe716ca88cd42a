"""Exact denoisers for tiny known laws over token sequences: the networks a perfect model would be (docs/math.md §0).

A ``Law`` lists its support (``K`` sequences of length ``L``) and their probabilities. ``install_oracle`` replaces an
objective's network-facing methods with the exact posterior of that law under the objective's own parametrisation,
chosen by the sampling contract the objective satisfies (``cdlm.types``), so a sampler run on it must draw the law
itself (up to its own discretisation):

- absorbing (masked) objectives: ``denoise(z, t)`` is ``log p(x0_l = v | visible tokens of z)`` per position;
- autoregressive objectives: ``next_logits(prefix)`` is ``log p(x_i = v | x_<i = prefix)``;
- continuous (VE) objectives: ``denoise(x, sigma)`` is the posterior mean ``E[clean_state(x0) | x]`` with
  ``x = clean_state(x0) + sigma eps``; a decoder that reads a network at ``sigma_min`` (``decoder_logits``) reads
  the exact token posterior there; a two-time objective's ``flow_denoise`` is the exact probability-flow ODE's map
  (integrated finely with the exact denoiser).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdlm.types import (
    AbsorbingObjective,
    AutoregressiveObjective,
    ContinuousObjective,
    FlowMapObjective,
    ProjectedState,
)

FLOOR = 1e-30  # log-probabilities of impossible tokens: log(FLOOR), finite so gaps and sorts stay defined
FLOW_MAP_RESOLUTION = 64  # DDIM steps of the exact flow map per unit of log sigma (each lowers sigma by 1.6%)


@dataclass(frozen=True)
class Law:
    """A distribution over ``K`` token sequences: ``seqs`` ``[K, L]`` (int64), ``probs`` ``[K]`` (float64, sum 1)."""

    name: str
    seqs: torch.Tensor
    probs: torch.Tensor

    @property
    def length(self) -> int:
        return self.seqs.shape[1]

    def onehot(self, vocab: int) -> torch.Tensor:
        """``[K, L, V]`` float64 one-hots of the support."""
        return F.one_hot(self.seqs, vocab).double()

    def marginals(self, weights: torch.Tensor, vocab: int) -> torch.Tensor:
        """Per-position token probabilities ``[B, L, V]`` of the mixture ``weights`` ``[B, K]`` over the support."""
        return torch.einsum("bk,klv->blv", weights, self.onehot(vocab))

    def conditioned(self, agree: torch.Tensor) -> torch.Tensor:
        """Posterior weights ``[B, K]`` given which sequences ``agree`` ``[B, K]`` (bool) with the evidence; rows with
        no agreeing sequence fall back to the law itself (a sampler that left the support keeps going)."""
        w = self.probs[None] * agree.double()  # [B, K]
        total = w.sum(-1, keepdim=True)
        return torch.where(total > 0, w / total.clamp_min(FLOOR), self.probs[None].expand_as(w))

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """The support index of each row of ``ids`` ``[N, L]``, ``-1`` for a sequence outside the support."""
        match = (ids[:, None, :] == self.seqs[None]).all(-1)  # [N, K]
        return torch.where(match.any(-1), match.double().argmax(-1), -1)


def independent_law() -> Law:
    """Four independent positions, each over two tokens with its own probabilities: 16 sequences."""
    tokens = [(1, 6), (2, 5), (3, 0), (7, 4)]
    p_first = [0.7, 0.25, 0.5, 0.6]
    seqs, probs = [], []
    for bits in range(16):
        choice = [(bits >> i) & 1 for i in range(4)]
        seqs.append([tokens[i][c] for i, c in enumerate(choice)])
        probs.append(math.prod(p_first[i] if c == 0 else 1 - p_first[i] for i, c in enumerate(choice)))
    return Law("independent", torch.tensor(seqs), torch.tensor(probs, dtype=torch.float64))


def correlated_law() -> Law:
    """Six allowed sequences sharing tokens position by position, so that drawing positions independently from
    their marginals leaves the support (2 / 3 of such draws do)."""
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 2, 3, 6], [7, 0, 5, 4], [1, 0, 3, 6], [7, 2, 5, 4]]
    probs = [0.3, 0.1, 0.2, 0.15, 0.1, 0.15]
    return Law("correlated", torch.tensor(seqs), torch.tensor(probs, dtype=torch.float64))


LAWS = {"independent": independent_law, "correlated": correlated_law}


def log_floor(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(FLOOR).log()


# ---- the oracles ------------------------------------------------------------------------------------------------
def unique_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the ``S`` distinct values of ``keys`` ``[B]``: the index of one row holding each ``[S]``, and the distinct
    value of each row ``[B]`` (an index into the ``S``)."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.empty_like(unique).scatter_(0, inverse, torch.arange(keys.shape[0]))
    return first, inverse


def per_state(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` over the rows of ``z`` ``[B, n]``, computed once per distinct row (the laws' states are few)."""

    def rows(z: torch.Tensor) -> torch.Tensor:
        base = int(z.max()) + 1
        keys = (z * base ** torch.arange(z.shape[1])).sum(-1)  # [B]: one integer per row
        first, inverse = unique_rows(keys)
        return fn(z[first])[inverse]

    return rows


def masked_oracle(objective: AbsorbingObjective, law: Law) -> None:
    """``denoise(z, t)``: SUBS ``log p(x0 | z)`` ``[B, L, V]``: visible tokens kept, masked ones from the law."""
    vocab, mask_id = objective.vocab_size, objective.mask_id

    @per_state
    def posterior(z: torch.Tensor) -> torch.Tensor:
        visible = z != mask_id  # [S, L]
        agree = ((law.seqs[None] == z[:, None]) | ~visible[:, None]).all(-1)  # [S, K]
        probs = law.marginals(law.conditioned(agree), vocab)  # [S, L, V]
        onehot = F.one_hot(z.clamp_max(vocab - 1), vocab).double()
        return log_floor(torch.where(visible[..., None], onehot, probs)).float()

    objective.denoise = lambda z, t, padding=None: posterior(z)
    # a block cache's span pass: the oracle's rows of the span (an oracle has no stale keys: the cache is exact)
    objective.denoise_span = lambda z, t, cache, span: posterior(z)[:, span]
    objective.denoise_positions = lambda z, t, cache, index: posterior(z).gather(
        1, index[..., None].expand(-1, -1, vocab)
    )


def autoregressive_oracle(objective: AutoregressiveObjective, law: Law) -> None:
    """``next_logits(prefix)``: ``log p(x_i | x_<i)`` ``[B, V]`` for a prefix ``[B, i]``."""
    vocab = objective.vocab_size

    def next_logits(prefix: torch.Tensor, cache: object = None) -> torch.Tensor:
        i = prefix.shape[1]
        agree = (law.seqs[None, :, :i] == prefix[:, None]).all(-1)  # [B, K]
        return log_floor(law.marginals(law.conditioned(agree), vocab)[:, i]).float()

    objective.next_logits = next_logits


class VEPosterior:
    """The exact posterior of ``x = clean_state(x0) + sigma eps`` under ``law`` for a VE-form objective."""

    def __init__(self, objective: ContinuousObjective, law: Law) -> None:
        self.law, self.vocab = law, objective.vocab_size
        with torch.no_grad():
            self.points = objective.clean_state(law.seqs).double()  # [K, L', D]

    def weights(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``p(x0 = seq_k | x)`` ``[B, K]`` for the state ``x`` ``[B, L', D]`` at ``sigma`` (``[B]`` or a scalar)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)  # [B, 1]
        flat, points = x.double().flatten(1), self.points.flatten(1)  # [B, L' D], [K, L' D]
        d2 = flat.square().sum(-1, keepdim=True) - 2 * flat @ points.T + points.square().sum(-1)  # [B, K]
        return (self.law.probs.log()[None] - d2 / (2 * sigma.square())).softmax(-1)

    def mean(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``E[clean_state(x0) | x]`` ``[B, L', D]`` (float64)."""
        return torch.einsum("bk,kld->bld", self.weights(x, sigma), self.points)

    def token_logits(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``log p(x0_l = v | x)`` ``[B, L, V]`` (float32)."""
        return log_floor(self.law.marginals(self.weights(x, sigma), self.vocab)).float()

    def flow_map(self, x: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        """``D_{s,t}`` ``[B, L', D]``: the clean point whose DDIM step from ``sigma_s`` to ``sigma_t`` lands where the
        exact probability-flow ODE does (DDIM steps with the exact mean, geometric in sigma: ``FLOW_MAP_RESOLUTION``
        per unit of ``log sigma``)."""
        s, t = float(sigma_s.reshape(-1)[0]), float(sigma_t.reshape(-1)[0])
        if t >= s:
            return self.mean(x, s).to(x.dtype)
        y = x.double()
        steps = math.ceil(FLOW_MAP_RESOLUTION * math.log(s / t))
        levels = torch.logspace(math.log10(s), math.log10(t), steps + 1, dtype=torch.float64).tolist()
        for a, b in zip(levels[:-1], levels[1:]):
            x0 = self.mean(y, a)
            y = x0 + (b / a) * (y - x0)
        ratio = t / s
        return ((y - ratio * x.double()) / (1 - ratio)).to(x.dtype)


def continuous_oracle(objective: ContinuousObjective, law: Law) -> None:
    """The exact ``denoise``, and wherever the objective reads a network to decode or to jump, the exact one."""
    post = VEPosterior(objective, law)
    objective.denoise = lambda x, sigma, x0_prev=None: post.mean(x, sigma).to(x.dtype)
    if isinstance(objective, ProjectedState):  # the exact posterior reads the whole state, not x @ P
        objective.state_projection = lambda: None
    if hasattr(objective, "decoder_logits"):  # a decoder network read at sigma_min (LangFlow, a text VAE)
        objective.decoder_logits = lambda x, x0_prev=None: post.token_logits(x, objective.sigma_min)
    if isinstance(objective, FlowMapObjective):
        objective.flow_denoise = post.flow_map


def install_oracle(objective: object, law: Law) -> None:
    """Replace ``objective``'s network by the exact posterior of ``law``, by the contract the objective satisfies."""
    if isinstance(objective, AutoregressiveObjective):
        autoregressive_oracle(objective, law)
    elif isinstance(objective, AbsorbingObjective):
        masked_oracle(objective, law)
    elif isinstance(objective, ContinuousObjective):
        continuous_oracle(objective, law)
    else:
        raise TypeError(f"no exact oracle for {type(objective).__name__}: add one to tests/exact.py")


# ---- the comparison ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """How ``n`` draws compare with the law: Pearson's chi-square p-value of the draws inside the support against the
    law, the total-variation distance of the whole histogram, and the fraction of draws outside the support."""

    p_value: float
    tv: float
    outside: float
    n: int

    def __str__(self) -> str:
        return f"p={self.p_value:.3g} tv={self.tv:.4f} outside={self.outside:.4f} (n={self.n})"


def compare(ids: torch.Tensor, law: Law) -> Fit:
    """The fit of draws ``ids`` ``[N, L]`` to ``law``."""
    index = law.index(ids)
    n, k = ids.shape[0], law.seqs.shape[0]
    counts = torch.bincount(index[index >= 0], minlength=k).double()  # [K]
    inside = float(counts.sum())
    expected = inside * law.probs
    stat = float(((counts - expected).square() / expected.clamp_min(FLOOR)).sum())
    p = float(torch.special.gammaincc(torch.tensor((k - 1) / 2, dtype=torch.float64), torch.tensor(stat / 2)))
    outside = 1 - inside / n
    tv = 0.5 * (float((counts / n - law.probs).abs().sum()) + outside)
    return Fit(p if inside > 0 else 0.0, tv, outside, n)

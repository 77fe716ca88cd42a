"""Ancestral sampling for absorbing (masked) diffusion: MDLM (Sahoo et al., 2024), docs/math.md §1.

A masked position at step ``t -> s`` draws from ``[(a_s - a_t) p_theta + (1 - a_s) e_mask] / (1 - a_t)``;
visible positions are copied. With a network that is not time-conditioned, ``p_theta`` depends only on the
state, so when no position changed it is reused without a network call (MDLM sec. 4.2, the "cache").

With ``remask_eta > 0`` the step is ReMDM's (Wang et al., 2025, arXiv:2503.00307, "max-capped" schedule): a token
the sampler generated returns to ``[MASK]`` with ``sigma = min(eta, (1 - a_s) / a_t)``, and a masked position
unmasks with ``(a_s - (1 - sigma) a_t) / (1 - a_t)`` instead of ``(a_s - a_t) / (1 - a_t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdlm.samplers.categorical import nucleus, renormalise, row_chunks, sample_categorical
from cdlm.samplers.grids import linear_grid
from cdlm.samplers.registry import Choice, Range, register_sampler
from cdlm.samplers.selectors import remask, remask_sigma
from cdlm.types import AbsorbingObjective, SamplerStep


@dataclass(frozen=True)
class CleanProbs:
    """``p_theta(x0 | x)`` at ``N`` masked positions, kept lean: the denoiser's float32 ``log p`` rows ``[R, V]``
    (not copied), ``index`` ``[N]``, the rows of the ``N`` positions (None: all ``R`` rows), and the nucleus level
    ``top_p``. Float64 probabilities and nuclei exist only for the positions a step draws, a chunk at a time."""

    logp: torch.Tensor
    top_p: float = 1.0
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        """``N``: the number of positions."""
        return self.logp.shape[0] if self.index is None else self.index.shape[0]

    def rows(self, count: int | None = None) -> list[slice]:
        """The chunks of ``count`` (default ``N``) positions a draw runs over (``row_chunks``; ``V + 1`` wide)."""
        return row_chunks(len(self) if count is None else count, self.logp.shape[1] + 1)

    def probs(self, positions: slice | torch.Tensor) -> torch.Tensor:
        """Float64 probabilities ``[n, V]`` at ``positions`` (of the ``N``), nucleus-filtered and renormalised as
        ``top_p_filter`` (the nucleus of a row depends on that row alone)."""
        logp = self.logp[positions] if self.index is None else self.logp[self.index[positions]]  # [n, V] float32
        probs = logp.double().exp_()  # [n, V]
        return probs if self.top_p >= 1.0 else renormalise(probs, nucleus(probs, self.top_p))

    def best(self) -> torch.Tensor:
        """The clean argmax ``[N]`` (float32 suffices: the nucleus always holds the top token)."""
        best = self.logp.argmax(-1)  # [R]
        return best if self.index is None else best[self.index]


def clean_probs(
    objective: AbsorbingObjective, x: torch.Tensor, t: torch.Tensor, top_p: float, where: torch.Tensor
) -> CleanProbs:
    """``p_theta(x0 | x)`` at the positions ``where`` ``[B, L]`` (bool): ``N`` rows, nucleus-filtered (``top_p``)."""
    logp = objective.denoise(x, t.expand(x.shape[0]).float())  # [B, L, V] float32
    return CleanProbs(logp.reshape(-1, logp.shape[-1]), top_p, where.reshape(-1).nonzero().squeeze(-1))


def ancestral_moves(
    clean: CleanProbs,
    moved: torch.Tensor | float,
    stay: torch.Tensor | float,
    norm: torch.Tensor | float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One step's draws ``[N]`` at the ``N`` masked positions (``V`` = stays ``[MASK]``).

    A masked position draws from ``q = [moved * p_theta, stay] / norm`` ``[V + 1]`` (docs/math.md §1), with
    ``norm = moved + stay``: it stays ``[MASK]`` with probability ``stay / norm`` (one uniform each, all drawn
    first), else takes a token drawn from ``p_theta`` in float64; the same law without forming ``q``. Only the
    positions that move are drawn from ``p_theta`` (about ``N / steps`` of them), in order and chunk by chunk, so
    the stream of the generator does not depend on the chunks.
    """
    vocab = clean.logp.shape[-1]
    u = torch.rand(len(clean), dtype=torch.float64, device=clean.logp.device, generator=generator)  # [N]
    moves = (~(u * norm < stay)).nonzero().squeeze(-1)  # [M]: the positions that take a token
    draws = torch.full((len(clean),), vocab, dtype=torch.long, device=clean.logp.device)  # index V is [MASK]
    if len(moves):
        draws[moves] = torch.cat(
            [sample_categorical(clean.probs(moves[rows]), generator) for rows in clean.rows(len(moves))]
        )
    return draws


def ancestral_draws(
    clean: CleanProbs,
    moved: torch.Tensor | float,
    stay: torch.Tensor | float,
    norm: torch.Tensor | float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ancestral_moves`` ``[N]`` and the clean argmax ``[N]`` (``CleanProbs.best``)."""
    return ancestral_moves(clean, moved, stay, norm, generator), clean.best()


@register_sampler(
    "ancestral",
    space="discrete",
    grid=linear_grid,
    requires=AbsorbingObjective,
    knobs={
        "top_p": Range(0, 1, low_open=True, note="1 = off"),
        "final": Choice("argmax", "sample"),
        "remask_eta": Range(0, 1, note="0 = no remasking"),
    },
)
@torch.no_grad()
def sample_ancestral(
    objective: AbsorbingObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    top_p: float = 1.0,
    cache: bool = True,
    final: str = "argmax",
    remask_eta: float = 0.0,
) -> torch.Tensor:
    """Reverse the absorbing process over the grid ``ts`` ``[T + 1]`` (1 -> ~0) from ``x`` ``[B, L]``.

    Only masked positions are drawn (visible ones are copied), and of those only the ones that unmask at the step
    draw a token from ``p_theta`` (``ancestral_moves``: about ``1 / steps`` of them), so the float64 draws are a
    small part of a step; they run over chunks of positions, so only float32 ``log p_theta`` is kept whole.
    ``final``: how positions still masked after the grid are committed, ``argmax`` or ``sample`` of ``p_theta``.
    ``cache=False`` calls the network at every step (the reference the cached path must equal). ``remask_eta``:
    ReMDM's ``eta`` (0 = off, the MDLM step); tokens visible in the input ``x`` (a prompt) are never remasked.
    """
    if final not in ("argmax", "sample"):
        raise ValueError(f"final must be 'argmax' or 'sample', got {final!r}")
    if not 0.0 <= remask_eta <= 1.0:
        raise ValueError(f"remask_eta must be in [0, 1] (0 = no remasking), got {remask_eta}")
    reuse = cache and not objective.time_conditioning
    generated = x == objective.mask_id  # [B, L]: the positions this sampler writes (and may remask)
    alpha = objective.schedule.alpha
    clean, nfe = None, 0  # clean: CleanProbs at the N positions masked in the current x
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        masked = x == objective.mask_id  # [B, L]
        if clean is None:
            clean, nfe = clean_probs(objective, x, t, top_p, masked), nfe + 1
        a_t, a_s = alpha(t), alpha(s)
        sigma = remask_sigma(a_t, a_s, remask_eta)  # 0.0 when off: then the terms below are exactly MDLM's
        # mass moved to p_theta, mass left on [MASK], normaliser
        draw = ancestral_moves(clean, a_s - a_t + sigma * a_t, 1 - a_s - sigma * a_t, 1 - a_t, generator)
        if callback is not None:  # the clean estimate is for the callback only
            x0 = x.clone()
            x0[masked] = clean.best()
        x = x.clone()
        x[masked] = draw
        changed = not bool((draw == objective.mask_id).all())
        if sigma > 0:
            remasked = remask(x, generated & ~masked, sigma, objective.mask_id, generator)
            changed, x = changed or not torch.equal(remasked, x), remasked
        if changed or not reuse:
            clean = None
        if callback is not None:
            callback(SamplerStep(i, float(s), x, x0, nfe))
    return commit_remaining(objective, x, ts, clean, nfe, top_p, final, generator, callback)


def commit_remaining(
    objective: AbsorbingObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    clean: CleanProbs | None,
    nfe: int,
    top_p: float,
    final: str,
    generator: torch.Generator | None,
    callback: Callable[[SamplerStep], None] | None,
) -> torch.Tensor:
    """``x`` ``[B, L]`` with the positions still masked after the grid ``ts`` committed by ``final`` (``argmax`` or
    ``sample`` of ``p_theta``), reusing ``clean`` (``p_theta`` of the current ``x``) when given; ``nfe``: the calls
    so far, reported to the ``callback`` with the one this may make."""
    masked = x == objective.mask_id
    if not masked.any():
        return x
    if clean is None:
        clean, nfe = clean_probs(objective, x, ts[-1], top_p, masked), nfe + 1
    chunks = (clean.probs(rows) for rows in clean.rows())  # [n, V] float64 each
    fill = torch.cat([p.argmax(-1) if final == "argmax" else sample_categorical(p, generator) for p in chunks])
    x = x.clone()
    x[masked] = fill
    if callback is not None:
        callback(SamplerStep(len(ts) - 1, 0.0, x, x, nfe))
    return x

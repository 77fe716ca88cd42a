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
from cdlm.types import DiscreteObjective, SamplerStep


@dataclass(frozen=True)
class CleanProbs:
    """``p_theta(x0 | x)`` at ``N`` masked positions, kept lean: float32 ``log p`` ``[N, V]`` and, with nucleus
    filtering, the nucleus as a bool ``[N, V]``. Float64 probabilities exist only for a chunk of rows at a time."""

    logp: torch.Tensor
    keep: torch.Tensor | None = None

    def rows(self) -> list[slice]:
        """The chunks of rows a draw runs over (``cdlm.samplers.categorical.row_chunks``; ``V + 1`` wide)."""
        return row_chunks(self.logp.shape[0], self.logp.shape[1] + 1)

    def probs(self, rows: slice) -> torch.Tensor:
        """Float64 probabilities ``[n, V]`` of ``rows``, nucleus-filtered and renormalised as ``top_p_filter``."""
        probs = self.logp[rows].double().exp_()  # [n, V]
        return probs if self.keep is None else renormalise(probs, self.keep[rows])


def clean_probs(
    objective: DiscreteObjective, x: torch.Tensor, t: torch.Tensor, top_p: float, where: torch.Tensor
) -> CleanProbs:
    """``p_theta(x0 | x)`` at the positions ``where`` ``[B, L]`` (bool): ``N`` rows, nucleus-filtered (``top_p``)."""
    logp = objective.denoise(x, t.expand(x.shape[0]).float())[where]  # [N, V] float32
    if top_p >= 1.0:
        return CleanProbs(logp)
    chunks = row_chunks(logp.shape[0], logp.shape[1] + 1)
    return CleanProbs(logp, torch.cat([nucleus(logp[rows].double().exp(), top_p) for rows in chunks]))


def ancestral_draws(
    clean: CleanProbs,
    moved: torch.Tensor | float,
    stay: torch.Tensor | float,
    norm: torch.Tensor | float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's draws ``[N]`` (``V`` = stays ``[MASK]``) and the clean argmax ``[N]``, chunk by chunk.

    A masked position draws from ``q = [moved * p_theta, stay] / norm`` ``[V + 1]`` (docs/math.md §1), with
    ``norm = moved + stay``: it stays ``[MASK]`` with probability ``stay / norm`` (one uniform), else takes a token
    drawn from ``p_theta`` in float64; the same law without forming ``q``.
    """
    logp = clean.logp  # [N, V]
    u = torch.rand(logp.shape[0], dtype=torch.float64, device=logp.device, generator=generator)  # [N], first:
    draws, best = [], []  # the generator's stream is then the same whatever the chunks
    for rows in clean.rows():
        probs = clean.probs(rows)  # [n, V] float64
        token = sample_categorical(probs, generator)  # [n]
        draws.append(torch.where(u[rows] * norm < stay, probs.shape[-1], token))  # index V is [MASK]
        best.append(clean.logp[rows].argmax(-1))  # float32 suffices: the nucleus always holds the top token
    return torch.cat(draws), torch.cat(best)


@register_sampler(
    "ancestral",
    space="discrete",
    grid=linear_grid,
    knobs={
        "top_p": Range(0, 1, low_open=True, note="1 = off"),
        "final": Choice("argmax", "sample"),
        "remask_eta": Range(0, 1, note="0 = no remasking"),
    },
)
@torch.no_grad()
def sample_ancestral(
    objective: DiscreteObjective,
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

    Only masked positions are scored and drawn (visible ones are copied), so the cost of the float64 draws falls
    with the number of masks; they run over chunks of positions, so only float32 ``log p_theta`` is kept whole.
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
        draw, best = ancestral_draws(clean, a_s - a_t + sigma * a_t, 1 - a_s - sigma * a_t, 1 - a_t, generator)
        x0 = x.clone()
        x0[masked] = best
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
    masked = x == objective.mask_id
    if masked.any():
        if clean is None:
            clean, nfe = clean_probs(objective, x, ts[-1], top_p, masked), nfe + 1
        chunks = (clean.probs(rows) for rows in clean.rows())  # [n, V] float64 each
        fill = torch.cat([p.argmax(-1) if final == "argmax" else sample_categorical(p, generator) for p in chunks])
        x = x.clone()
        x[masked] = fill
        if callback is not None:
            callback(SamplerStep(len(ts) - 1, 0.0, x, x, nfe))
    return x

"""One step of parallel decoding for masked diffusion (docs/math.md §7): the ``Policy`` (the sampler's knobs),
which candidates a step commits (``choose``), and the step itself (``parallel_step``: commit, draw, remask; RCR's
``rcr_step``; batch repulsion's ``fill``; Guided Diffusion's ``guided_step``; ETE's cross-block ``commit_ahead``).
``cdlm.samplers.parallel`` runs these steps block by block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdlm.samplers.categorical import draw_tokens
from cdlm.samplers.guided import guided_step
from cdlm.samplers.selectors import (
    explore_uncertain,
    group_ranks,
    prophet_ready,
    remask,
    repel,
    running_remask,
    select_threshold,
    select_topk,
    top2_gap,
    topk_count,
)

SELECTORS = ("topk", "threshold", "prophet", "rcr", "ete", "ccd", "guided")
THRESHOLDED = ("threshold", "ete", "ccd")  # selectors that commit the top-1 plus every candidate >= tau


@dataclass(frozen=True)
class Policy:
    """The per-step decisions of ``sample_parallel`` (its knobs, validated here; see its docstring)."""

    selector: str = "topk"
    tau: float = 0.9
    remask_eta: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    ete_budget: float = 2.0
    ccd_decay: float = 0.5
    repulsion: float = 0.0

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {list(SELECTORS)}, got {self.selector!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if not 0.0 <= self.remask_eta <= 1.0:
            raise ValueError(f"remask_eta must be in [0, 1] (0 = no remasking), got {self.remask_eta}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = argmax), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.ete_budget >= 0:
            raise ValueError(f"ete_budget must be >= 0 nats (0 = threshold alone), got {self.ete_budget}")
        if not self.repulsion >= 0:
            raise ValueError(f"repulsion must be >= 0 (0 = off), got {self.repulsion}")
        if self.repulsion > 0 and self.selector in ("rcr", "guided"):
            raise ValueError(f"repulsion does not apply to selector={self.selector}; use another selector")
        if not 0.0 <= self.ccd_decay < 1.0:
            raise ValueError(f"ccd_decay must be in [0, 1) (0 = this step alone), got {self.ccd_decay}")


def choose(
    policy: Policy,
    logp: torch.Tensor,
    candidates: torch.Tensor,
    rates: tuple[float, float, float],
    progress: float,
    span: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions to commit ``[B, L]`` and the Prophet-ready rows ``[B]`` (filled all-in by argmax).

    ``rates``: ``(alpha_t, alpha_s, sigma)`` of the step, ``sigma`` the ReMDM remasking probability. ``span``: the
    positions holding every candidate (a block's); only their rows of ``log p_theta`` ``[B, L, V]`` are read. The
    confidence is ``selectors.confidence``'s (``max_v p_theta``, from ``amax``: no argmax is formed).
    """
    top = torch.full(candidates.shape, -math.inf, dtype=logp.dtype, device=logp.device)  # [B, L]
    top[:, span] = logp[:, span].amax(-1)  # max_v log p_theta
    conf = top.double().exp_().masked_fill_(~candidates, -math.inf)  # [B, L] float64, -inf off candidates
    if policy.selector in THRESHOLDED:
        commit = select_threshold(conf, policy.tau)
        if policy.selector == "ete" and policy.ete_budget > 0:
            rows = logp[:, span].float()  # [B, n, V]
            entropy = torch.zeros(candidates.shape, dtype=torch.float32, device=logp.device)  # [B, L]
            entropy[:, span] = -(rows.exp() * rows.clamp_min(-1e4)).sum(-1)
            commit = explore_uncertain(entropy, candidates, commit, policy.ete_budget)
    else:
        commit = select_topk(conf, topk_count(candidates.sum(-1), *rates))
    ready = torch.zeros_like(candidates[:, 0])  # [B]
    if policy.selector == "prophet":
        gap = torch.zeros(candidates.shape, dtype=torch.float32, device=logp.device)  # [B, L]
        gap[:, span] = top2_gap(logp[:, span])  # 0 off the span: prophet_ready reads candidates only
        ready = prophet_ready(gap, candidates, progress)
    return commit | (ready[:, None] & candidates), ready


def parallel_step(
    policy: Policy,
    x: torch.Tensor,
    logp: torch.Tensor,
    candidates: torch.Tensor,
    remaskable: torch.Tensor,
    rates: tuple[float, float, float],
    progress: float,
    last: bool,
    mask_id: int,
    generator: torch.Generator | None,
    span: slice = slice(None),
    running: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    guide: torch.nn.Module | None = None,
) -> torch.Tensor:
    """One step on ``x`` ``[B, L]``: commit the chosen ``candidates``, then remask some ``remaskable`` tokens.

    ``last``: the block's final step commits every candidate and remasks nothing. ``span``: positions holding
    every candidate (a block's), the only ones whose ``log p_theta`` rows are read. ``running`` ``[B, L]`` float64:
    the ``rcr`` selector's running confidences, updated in place (``rcr_step``). ``groups`` ``[B]``: prompt groups
    for batch repulsion (``fill``; None = off). ``guide``: the ``guided`` selector's autoregressive verifier.
    """
    if policy.selector == "guided" and not last:
        return guided_step(x, logp, candidates, guide, mask_id, policy.temperature, policy.top_p, generator)
    x = x.clone()
    if policy.selector == "rcr":
        n = candidates.sum(-1)  # [B]
        k = n if last else topk_count(n, rates[0], rates[1])
        step = {"policy": policy, "mask_id": mask_id, "generator": generator, "running": running}
        return rcr_step(x, logp, candidates, candidates | remaskable, k, **step)
    if last:
        fill(x, logp, candidates, policy, generator, mask_id, groups)
        return x
    commit, ready = choose(policy, logp, candidates, rates, progress, span)
    greedy = ready[:, None] & candidates  # [B, L]: Prophet's all-in rows take the argmax
    sampled = commit & ~greedy
    if policy.selector == "prophet" and bool(ready.any()):
        best = torch.zeros(candidates.shape, dtype=torch.long, device=logp.device)  # [B, L]
        best[:, span] = logp[:, span].argmax(-1)
        x[greedy] = best[greedy]  # no [N, V] copy of the greedy rows
    fill(x, logp, sampled, policy, generator, mask_id, groups)
    return remask(x, remaskable & ~ready[:, None], rates[2], mask_id, generator)


def commit_ahead(
    policy: Policy,
    x: torch.Tensor,
    logp: torch.Tensor,
    early: torch.Tensor,
    generator: torch.Generator | None,
    mask_id: int,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """ETE's cross-block decoding on ``x`` ``[B, L]`` (a new tensor when anything is committed): the ``early``
    positions ``[B, L]`` (masked, after the active block) whose confidence ``max_v p_theta`` reaches ``policy.tau``
    are drawn from ``logp`` ``[B, L, V]``, the pass the block's step used; no top-1 is forced and nothing there is
    explored, so a position ahead is committed only when the network is already sure of it."""
    if not bool(early.any()):
        return x
    sure = torch.zeros_like(early)  # [B, L]
    sure[early] = logp[early].amax(-1).double().exp() >= policy.tau
    if not bool(sure.any()):
        return x
    x = x.clone()
    fill(x, logp, sure, policy, generator, mask_id, groups)
    return x


def fill(
    x: torch.Tensor,
    logp: torch.Tensor,
    where: torch.Tensor,
    policy: Policy,
    generator: torch.Generator | None,
    mask_id: int,
    groups: torch.Tensor | None = None,
) -> None:
    """Draw ``x[where]`` in place from ``logp`` ``[B, L, V]``. With prompt ``groups`` ``[B]`` (batch repulsion), the
    rows draw rank by rank within their group, each from ``logp`` repelled from the tokens the group's other rows
    hold, including those drawn by lower ranks in this step (``selectors.repel``): samples of one prompt that reach a
    position together do not all take its most probable token."""
    if groups is None:
        x[where] = draw_tokens(logp[where], policy.temperature, policy.top_p, generator)
        return
    for rank in group_ranks(groups):  # [B] each
        part = where & rank[:, None]  # [B, L]
        if part.any():
            repelled = repel(logp, x, groups, part, policy.repulsion, mask_id)
            x[part] = draw_tokens(repelled[part], policy.temperature, policy.top_p, generator)


def rcr_step(
    x: torch.Tensor, logp: torch.Tensor, candidates: torch.Tensor, revisable: torch.Tensor, k: torch.Tensor, **step
) -> torch.Tensor:
    """RCR (``selectors.running_remask``) on a copy ``x`` ``[B, L]``: draw every candidate, record each drawn
    token's probability in ``step["running"]`` ``[B, L]`` (in place), then remask as many of the block's generated
    tokens (``revisable``, the candidates included) as the schedule leaves masked after this step (``n - k``: ``k``
    ``[B]`` is the top-k count, every candidate at a block's last step), lowest running confidence first. Prompt
    tokens are never revisable. A step with ``k = 0`` in every row is skipped (it would remask all it drew).
    ``step``: ``policy``, ``mask_id``, ``generator``, ``running``."""
    if not bool(k.any()):  # drawing every candidate only to remask them all: the same law, no draws
        return x
    policy, running = step["policy"], step["running"]
    tokens = draw_tokens(logp[candidates], policy.temperature, policy.top_p, step["generator"])  # [N]
    x[candidates] = tokens
    running[candidates] = logp[candidates].gather(-1, tokens[:, None]).squeeze(-1).double().exp()
    left = candidates.sum(-1) - k  # [B]: still masked after the step
    return x.masked_fill(running_remask(running, revisable, left), step["mask_id"])

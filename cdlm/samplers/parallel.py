"""Parallel decoding for masked diffusion: confidence selectors, early commit, remasking and blocks (docs/math.md §7).

Every step scores the state once with ``p_theta``, lets a selector (``cdlm.samplers.selectors``) choose which
masked positions of the active block to commit, fills them, and, with ``remask_eta > 0``, returns some generated
tokens of the block to ``[MASK]`` (ReMDM). As in the ancestral sampler, ``p_theta`` is reused without a network
call when the state did not change and the network is not time-conditioned (MDLM sec. 4.2); NFE counts calls.

Blocks (semi-autoregressive decoding, LLaDA / Block Diffusion): positions are cut left to right into blocks of
``block_length``; only blocks holding a masked position get steps. The ``T`` steps of the grid are split evenly
among them (the first ``T mod n_blocks`` blocks get one more), and every block runs the whole grid ``ts``
resampled to its share. A block's last step commits all its remaining masks, so the sampler moves on only when
the block is fully unmasked; a block that empties early (threshold, Prophet) ends there, and its unused steps
are dropped, not carried over. The callback's ``index`` is the step's place in the ``T``-step budget (increasing,
with gaps where blocks ended early); ``nfe`` is the honest cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdlm.models.span_cache import SpanCache
from cdlm.samplers.grids import linear_grid
from cdlm.samplers.parallel_step import SELECTORS, THRESHOLDED, Policy, commit_ahead, parallel_step
from cdlm.samplers.registry import Choice, Range, register_sampler
from cdlm.samplers.selectors import (
    active_block,
    block_grid,
    block_steps,
    num_blocks,
    prompt_groups,
    rectify,
    remask_sigma,
)
from cdlm.types import AbsorbingObjective, SamplerStep

KV_CACHES = ("none", "prefix", "dual", "delayed", "window")  # Fast-dLLM, dKV-Cache, FreeCache; approximate


def stale_positions(x: torch.Tensor, keyed: torch.Tensor, mask_id: int) -> torch.Tensor:
    """dKV-Cache's positions to feed ``[B, m]``: in each row, the masked positions of ``x`` ``[B, L]`` and those whose
    token differs from ``keyed`` ``[B, L]`` (decoded since their keys were stored), first and in order; rows with
    fewer are padded with their other positions (recomputing one is harmless), so that every row feeds ``m``."""
    need = (x == mask_id) | (x != keyed)  # [B, L]
    m = max(int(need.sum(-1).max()), 1)
    return torch.argsort((~need).int(), dim=1, stable=True)[:, :m]


@register_sampler(
    "parallel",
    space="discrete",
    grid=linear_grid,
    requires=AbsorbingObjective,
    knobs={
        "selector": Choice(*SELECTORS),
        "tau": Range(0, 1, low_open=True),
        "block_length": Range(1, note="None = one block"),
        "remask_eta": Range(0, 1, note="0 = no remasking"),
        "temperature": Range(0, note="0 = argmax"),
        "top_p": Range(0, 1, low_open=True, note="1 = off"),
        "kv_cache": Choice(*KV_CACHES),
        "kv_refresh": Range(1, note="delayed cache: passes between full passes; 1 = every pass full"),
        "kv_window": Range(1, note="window cache: positions after the active block kept in attention"),
        "ete_budget": Range(0, note="nats; 0 = threshold alone"),
        "ccd_decay": Range(0, 1, high_open=True, note="0 = this step alone"),
        "repulsion": Range(0, note="0 = off"),
        "lookahead": Range(0, note="positions after the active block; threshold, ete, ccd; 0 = off"),
    },
)
@torch.no_grad()
def sample_parallel(
    objective: AbsorbingObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    selector: str = "topk",
    tau: float = 0.9,
    block_length: int | None = None,
    remask_eta: float = 0.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    cache: bool = True,
    kv_cache: str = "none",
    kv_refresh: int = 8,
    kv_window: int = 32,
    ete_budget: float = 2.0,
    ccd_decay: float = 0.5,
    repulsion: float = 0.0,
    lookahead: int = 0,
    guide: str | None = None,
) -> torch.Tensor:
    """Decode ``x`` ``[B, L]`` over the grid ``ts`` ``[T + 1]`` (1 -> ~0) with a parallel-decoding policy.

    Positions masked in ``x`` are generated; visible ones are a prompt, kept as they are and never remasked. Each
    selector and option is described with its paper in docs/math.md §7 and docs/sampling.md "Block caches".

    Args:
        selector: which candidates a step commits (confidence = ``max_v p_theta(v)``): ``topk`` the schedule's
            expected count ``round(n_masked (alpha_s - alpha_t) / (1 - alpha_t))``, most confident first;
            ``threshold`` the top-1 plus every candidate ``>= tau`` (Fast-dLLM); ``prophet`` top-k plus an all-in
            argmax commit once the mean top-2 logit gap reaches 7.5 / 5.0 / 2.5 by tercile of the steps; ``rcr``
            MDPO's running-confidence remasking (``rcr_step``; ``remask_eta`` does not apply); ``ete`` threshold plus
            the most uncertain candidates up to ``ete_budget`` nats (``selectors.explore_uncertain``); ``ccd``
            threshold on each position's moving-average law, weight ``ccd_decay`` on the past (``selectors.rectify``);
            ``guided`` the leftmost candidate and the run after it that the autoregressive ``guide`` verifies
            (``cdlm.samplers.guided``). ``threshold``, ``ete``, ``ccd`` and ``guided`` treat ``steps`` as a cap.
        tau: the confidence level of the threshold rules, in (0, 1].
        block_length: semi-autoregressive blocks of this many positions, decoded left to right; None = the whole
            sequence is one block. Steps are split among the blocks (module docstring).
        remask_eta: ReMDM-cap's ``eta``: generated, visible tokens of the active block return to ``[MASK]`` with
            probability ``min(eta, (1 - alpha_s) / alpha_t)``, and ``topk`` unmasks correspondingly more; 0 = off.
        temperature: tokens are drawn from ``p_theta^(1 / temperature)`` in float64; 0 = argmax.
        top_p: nucleus filtering of the draw (after temperature); 1 = off.
        cache: reuse ``p_theta`` when nothing changed (only without time conditioning); False calls the network
            at every step.
        kv_cache: approximate key/value caches (``cdlm.models.span_cache``): ``prefix`` / ``dual`` (Fast-dLLM: a
            full pass at each block's first step, then the block and what follows it / the block alone);
            ``delayed`` (dKV-Cache: a full pass every ``kv_refresh`` passes, else each row's masked and newly decoded
            positions); ``window`` (FreeCache: one full pass, then each step feeds the active block and the
            ``kv_window`` positions after it, attending over the stored keys before the block and to nothing after
            the window; a new block's first pass feeds the finished block again, so its final tokens' keys are
            stored); ``none``. Every pass counts as one NFE.
        repulsion: batch repulsion between the samples of one prompt (``fill``, ``selectors.repel``); 0 = off.
        lookahead: ETE's cross-block decoding: at every step, masked positions among the first ``lookahead`` after
            the active block whose confidence reaches ``tau`` are committed too, from the same network pass
            (``parallel_step.commit_ahead``); the threshold selectors only (``threshold``, ``ete``, ``ccd``); 0 = off.
        guide: the ``guided`` selector's autoregressive objective (``DiffusionLM.generate`` and ``sample.py`` load it
            from a run's path).
    """
    policy = Policy(selector, tau, remask_eta, temperature, top_p, ete_budget, ccd_decay, repulsion)
    check_extras(objective, kv_cache, (kv_refresh, kv_window), selector, guide)
    check_lookahead(lookahead, selector, kv_cache)
    generated = x == objective.mask_id  # [B, L]
    length = x.shape[1]
    blocks = [active_block(length, block_length, b, x.device) for b in range(num_blocks(length, block_length))]
    blocks = [block for block in blocks if (generated & block).any()]  # [L] each
    decoder = BlockDecoder(objective, policy, generated, len(ts) - 1, cache, generator, callback)
    decoder.lookahead = lookahead
    decoder.keys = None if kv_cache == "none" else SpanCache()
    decoder.kv_cache, decoder.kv_refresh, decoder.kv_window, decoder.guide = kv_cache, kv_refresh, kv_window, guide
    decoder.groups = prompt_groups(x) if repulsion > 0 else None
    offset = 0
    for block, n in zip(blocks, block_steps(decoder.steps, len(blocks))):
        x = decoder.decode(x, block, block_grid(ts, n), offset)
        offset += n
    return x


def check_extras(objective: AbsorbingObjective, kv_cache: str, sizes: tuple[int, int], selector: str, guide) -> None:
    """``sample_parallel``'s cache and guide options, checked against the objective (a ``ValueError`` naming them);
    ``sizes``: ``(kv_refresh, kv_window)``."""
    kv_refresh, kv_window = sizes
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {list(KV_CACHES)}, got {kv_cache!r}")
    if kv_cache != "none" and not hasattr(objective, "denoise_span"):
        raise ValueError(f"kv_cache={kv_cache!r} needs an objective with denoise_span (masked diffusion)")
    if kv_cache == "delayed" and not hasattr(objective, "denoise_positions"):
        raise ValueError("kv_cache='delayed' needs an objective with denoise_positions (masked diffusion)")
    if not (isinstance(kv_refresh, int) and kv_refresh >= 1):
        raise ValueError(f"kv_refresh must be an integer >= 1, got {kv_refresh!r}")
    if not (isinstance(kv_window, int) and kv_window >= 1):
        raise ValueError(f"kv_window must be an integer >= 1, got {kv_window!r}")
    if selector == "guided" and guide is None:
        raise ValueError("selector=guided needs guide=PATH, an autoregressive run with the model's tokenizer")
    if selector == "guided" and not isinstance(guide, torch.nn.Module):
        raise ValueError(f"guide={guide!r}: pass it through DiffusionLM.generate / sample.py, which load the run")


def check_lookahead(lookahead: int, selector: str, kv_cache: str) -> None:
    """``sample_parallel``'s ``lookahead``, checked against the selector and the cache (a ``ValueError``)."""
    if not (isinstance(lookahead, int) and lookahead >= 0):
        raise ValueError(f"lookahead must be an integer >= 0 (0 = off), got {lookahead!r}")
    if lookahead and selector not in THRESHOLDED:
        raise ValueError(
            f"lookahead commits by the threshold rule: use selector in {list(THRESHOLDED)}, not {selector!r}"
        )
    if lookahead and kv_cache == "dual":
        raise ValueError(
            "lookahead needs scores after the active block, which kv_cache='dual' does not compute; "
            "use kv_cache=prefix, delayed or none"
        )


def ahead_of(block: torch.Tensor, lookahead: int) -> torch.Tensor:
    """The ``lookahead`` positions ``[L]`` (bool) right after the last position of ``block`` ``[L]`` (fewer at the
    end of the sequence; none for an empty block)."""
    ahead = torch.zeros_like(block)
    where = block.nonzero().flatten()
    if lookahead and len(where):
        ahead[int(where[-1]) + 1 : int(where[-1]) + 1 + lookahead] = True
    return ahead


class BlockDecoder:
    """Runs ``sample_parallel``'s steps block by block, carrying ``p_theta`` (for the cache) and the NFE count."""

    def __init__(
        self,
        objective: AbsorbingObjective,
        policy: Policy,
        generated: torch.Tensor,
        steps: int,
        cache: bool,
        generator: torch.Generator | None,
        callback: Callable[[SamplerStep], None] | None,
    ) -> None:
        self.objective, self.policy, self.generated, self.steps = objective, policy, generated, steps
        self.kv_cache, self.keys = "none", None  # kv_cache: the cache's kind and its SpanCache
        self.rows: torch.Tensor | None = None  # kv_cache: [B, L, V], the latest scores of every position
        self.keyed: torch.Tensor | None = None  # delayed: [B, L], each position's token when its keys were stored
        self.kv_refresh, self.passes = 8, 0  # delayed: passes between full passes; partial passes since the last
        self.kv_window = 32  # window: positions after the active block (and its lookahead) kept in attention
        self.refeed: int | None = None  # window: the finished block's first position, fed again at the next pass
        self.block_start: int | None = None  # window: the active block's first position
        self.reuse = cache and not objective.time_conditioning
        self.generator, self.callback = generator, callback
        self.logp: torch.Tensor | None = None  # [B, L, V] for the current x
        self.nfe = 0
        self.running = torch.zeros(generated.shape, dtype=torch.float64, device=generated.device)  # rcr: [B, L]
        self.history: torch.Tensor | None = None  # ccd: [B, L, V], each position's moving-average law
        self.groups: torch.Tensor | None = None  # repulsion: [B] prompt group of each row
        self.guide: torch.nn.Module | None = None  # guided: the autoregressive verifier
        self.lookahead = 0  # ETE's cross-block decoding: positions after the block committed at tau

    def decode(self, x: torch.Tensor, block: torch.Tensor, grid: torch.Tensor, offset: int) -> torch.Tensor:
        """Unmask the ``block`` ``[L]`` of ``x`` ``[B, L]`` over its ``grid`` ``[n + 1]``; ``offset``: steps so far.

        The block's last step commits every remaining candidate; a block that empties early drops its other steps.
        """
        mask_id, alpha, n = self.objective.mask_id, self.objective.schedule.alpha, len(grid) - 1
        ahead = ahead_of(block, self.lookahead)  # [L]
        looks_ahead = bool(ahead.any())  # once per block, not a device sync per step
        where = (block | ahead).nonzero().flatten()  # scores are read on the span the block and lookahead cover
        span = slice(int(where[0]), int(where[-1]) + 1) if len(where) else slice(0, 0)
        if self.keys is not None and self.kv_cache in ("prefix", "dual"):  # a block starts with a full pass
            self.keys.reset()
        if self.kv_cache == "window":  # the finished block is fed once more: its last commits get their keys
            self.refeed, self.block_start = self.block_start, span.start
        for j in range(n):
            candidates = (x == mask_id) & block  # [B, L]
            if not candidates.any():
                break
            if self.logp is None:
                self.score(x, grid[j].expand(x.shape[0]).float(), span)
            a_t, a_s = alpha(grid[j]), alpha(grid[j + 1])
            rates = (float(a_t), float(a_s), remask_sigma(a_t, a_s, self.policy.remask_eta))
            remaskable = self.generated & block & (x != mask_id)  # [B, L]: tokens this sampler wrote in the block
            last, progress = j == n - 1, (offset + j + 1) / self.steps
            new = parallel_step(
                self.policy,
                x,
                self.scores(candidates),
                candidates,
                remaskable,
                rates,
                progress,
                last,
                mask_id,
                self.generator,
                span,
                self.running,
                self.groups,
                self.guide,
            )
            if looks_ahead:
                early = (x == mask_id) & ahead & self.generated  # [B, L]
                new = commit_ahead(self.policy, new, self.logp, early, self.generator, mask_id, self.groups)
            if self.callback is not None:  # the clean estimate this step used [B, L], for the callback only
                x0 = torch.where(x == mask_id, self.logp.argmax(-1), x)
            if not (self.reuse and torch.equal(new, x)):
                self.logp = None
            x = new
            if self.callback is not None:
                self.callback(SamplerStep(offset + j, float(grid[j + 1]), x, x0, self.nfe))
        return x

    def scores(self, candidates: torch.Tensor) -> torch.Tensor:
        """The log-law a step selects and draws from ``[B, L, V]``: ``p_theta``, or for ``ccd`` its rectified moving
        average over the steps each of the ``candidates`` ``[B, L]`` has been one (``selectors.rectify``)."""
        if self.policy.selector != "ccd":
            return self.logp
        if self.history is None:
            self.history = torch.zeros(self.logp.shape, dtype=torch.float32, device=self.logp.device)
        return rectify(self.history, self.logp, candidates, self.policy.ccd_decay)

    def score(self, x: torch.Tensor, t: torch.Tensor, block: slice) -> None:
        """``self.logp`` ``[B, L, V]`` for ``x`` at ``t`` ``[B]``: a full pass, or with a ``kv_cache`` filled by the
        block's first pass, the rows of the block (``dual``) or of the block and everything after it (``prefix``)
        only, or (``window``) of the block and the ``kv_window`` after it; rows outside those keep their earlier
        values (no candidate is there)."""
        self.nfe += 1
        if self.keys is None:
            self.logp = self.objective.denoise(x, t)
            return
        if self.keys.empty or (self.kv_cache == "delayed" and self.passes >= self.kv_refresh - 1):
            self.keys.reset()
            self.rows = self.objective.denoise_span(x, t, self.keys, slice(0, x.shape[1]))  # [B, L, V]
            self.keyed, self.passes = x.clone(), 0
        elif self.kv_cache == "delayed":
            index = stale_positions(x, self.keyed, self.objective.mask_id)  # [B, m]
            out = self.objective.denoise_positions(x, t, self.keys, index)  # [B, m, V]
            self.rows.scatter_(1, index[..., None].expand(-1, -1, out.shape[-1]), out)
            self.keyed.scatter_(1, index, x.gather(1, index))
            self.passes += 1
        elif self.kv_cache == "window":
            start = block.start if self.refeed is None else min(self.refeed, block.start)
            self.keys.limit = min(x.shape[1], block.stop + self.kv_window)
            span = slice(start, self.keys.limit)
            self.rows[:, span] = self.objective.denoise_span(x, t, self.keys, span)
            self.refeed = None
        else:
            span = slice(block.start, block.stop if self.kv_cache == "dual" else x.shape[1])
            self.rows[:, span] = self.objective.denoise_span(x, t, self.keys, span)
        self.logp = self.rows

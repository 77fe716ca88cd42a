"""Parallel-decoding selectors for masked-diffusion samplers (docs/math.md §7): small pure functions.

A *selector* decides which masked positions a step commits, on top of any ``p_theta``; it never chooses which
token goes there. Shapes: ``B`` rows, ``L`` positions, ``V`` tokens. A *candidate* is a position the step may
write: masked, and inside the active block when decoding block by block.

- ``topk_count`` / ``select_topk``: the ``k`` most confident candidates, ``k`` from the masking schedule.
- ``select_threshold``: Fast-dLLM's threshold rule (Wu et al., 2025, "Fast-dLLM", confidence-aware parallel decoding).
- ``prophet_ready``: Prophet's early commit (Li et al., 2025, "Diffusion Language Models Know the Answer Before
  Decoding", arXiv:2508.19982).
- ``remask_sigma`` / ``remask``: ReMDM's remasking with the "cap" schedule (Wang et al., 2025, "Remasking Discrete
  Diffusion Models with Inference-Time Scaling", arXiv:2503.00307).
- ``explore_uncertain``: ETE's exploration (Huang et al., 2025, "From Bits to Rounds: Parallel Decoding with
  Exploration for Diffusion Language Models", arXiv:2511.21103).
- ``rectify``: CCD's history-rectified scores (Chen et al., 2025, "Beyond Confidence: Adaptive and Coherent Decoding
  for Diffusion Language Models").
- ``prompt_groups`` / ``group_ranks`` / ``repel``: batch repulsion between samples of one prompt (after "Free Lunch
  for Pass@k"'s repulsive batch sampling, simplified to tokens at the same position).
- ``running_remask``: MDPO's running-confidence remasking, RCR (He et al., 2025, "MDPO: Overcoming the
  Training-Inference Divide of Masked Diffusion Language Models", arXiv:2508.13148).
- ``num_blocks`` / ``active_block`` / ``block_steps`` / ``block_grid``: semi-autoregressive blocks (Nie et al., 2025,
  "Large Language Diffusion Models" (LLaDA), semi-autoregressive remasking; Arriola et al., 2025, "Block Diffusion").

Confidence is ``max_v p_theta(v | z_t)`` at a position (MaskGIT / Fast-dLLM): how sure the network is about the
position, whatever token is then drawn there. With argmax filling it is the probability of the committed token,
LLaDA's "low-confidence remasking" score.
"""

from __future__ import annotations

import math

import torch

PROPHET_THRESHOLDS = (7.5, 5.0, 2.5)  # top-2 logit gap needed in the first, second and last third of the steps


def confidence(logp: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``max_v p_theta(v)`` ``[B, L]`` in float64 from ``log p_theta`` ``[B, L, V]``; ``-inf`` off ``candidates``."""
    conf = logp.max(-1).values.double().exp()  # [B, L]
    return conf.masked_fill(~candidates, -math.inf)


def top2_gap(logp: torch.Tensor) -> torch.Tensor:
    """Gap between the two largest logits per position ``[B, L]`` (float32).

    ``log p_theta`` is the logits minus one per-position constant, so its top-2 gap is the logit gap Prophet uses.
    """
    top2 = logp.float().topk(2, dim=-1).values  # [B, L, 2]
    return top2[..., 0] - top2[..., 1]


def topk_count(
    n_masked: torch.Tensor,
    alpha_t: float | torch.Tensor,
    alpha_s: float | torch.Tensor,
    sigma: float = 0.0,
    last: bool = False,
) -> torch.Tensor:
    """How many positions a step ``t -> s`` unmasks per row: ``k`` ``[B]`` (int64) from ``n_masked`` ``[B]``.

    ``k = round(n_masked * (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t))`` (half rounds up), the expected
    number of masked positions the ancestral step would unmask (docs/math.md §1). ``sigma`` is ReMDM's remasking
    probability, which raises the unmasking rate so that the marginal stays ``alpha_s`` (ReMDM's posterior for a
    masked position); with ``sigma = 0`` this is docs/math.md §7's count. ``k`` may be 0 early on (the step then
    changes nothing and costs no network call when ``p_theta`` is reused); ``last`` (the final step of a block)
    commits every masked position, so ``k >= 1`` whenever ``n_masked > 0``.
    """
    if last:
        return n_masked.long()
    alpha_t, alpha_s = float(alpha_t), float(alpha_s)
    rate = (alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t)
    k = torch.floor(n_masked.double() * rate + 0.5).long()  # [B]
    return torch.minimum(k.clamp_min(0), n_masked.long())


def select_topk(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k`` ``[B]`` most confident candidates per row: bool ``[B, L]``.

    ``conf`` ``[B, L]`` is ``-inf`` off candidates; a row commits ``min(k, candidates)`` positions, never a
    non-candidate. Ties go to the leftmost position (stable sort), so the choice is deterministic.
    """
    order = conf.argsort(dim=-1, descending=True, stable=True)  # [B, L]
    positions = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # [B, L]: 0 = most confident
    return (rank < k.to(conf.device)[:, None]) & (conf > -math.inf)


def select_threshold(conf: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """Fast-dLLM's threshold rule: every candidate with confidence ``>= tau``, plus the top-1: bool ``[B, L]``.

    The top-1 makes every row with a candidate commit at least one position, so decoding always progresses
    (Fast-dLLM, "confidence-aware parallel decoding"). ``conf`` ``[B, L]`` is ``-inf`` off candidates.
    """
    candidates = conf > -math.inf  # [B, L]
    top1 = torch.zeros_like(candidates).scatter_(-1, conf.argmax(-1, keepdim=True), True)
    return (top1 | (conf >= tau)) & candidates


def explore_uncertain(
    entropy: torch.Tensor, candidates: torch.Tensor, commit: torch.Tensor, budget: float
) -> torch.Tensor:
    """ETE's exploration: ``commit`` ``[B, L]`` plus, in each row whose committed positions carry less than
    ``budget`` nats of predictive entropy, the most uncertain other candidates, highest entropy first, until the
    row's committed entropy reaches the budget (the last one added may pass it).

    ``entropy`` ``[B, L]``: ``H(p_theta)`` per position (read on candidates only). A confident commit carries almost
    no information; committing an uncertain token (drawn from its law) conditions the rest on it, which can turn
    other positions confident in the next round (ETE's "bits-to-rounds" argument). ``budget = 0``: ``commit``.
    """
    free = candidates & ~commit  # [B, L]
    h = torch.where(free, entropy, -math.inf)  # [B, L]
    order = h.argsort(-1, descending=True)  # [B, L]: free positions first, most uncertain first
    ranked = h.gather(-1, order)  # [B, L]
    valid = ranked > -math.inf
    ranked = torch.where(valid, ranked, 0.0)
    need = (budget - torch.where(commit, entropy, 0.0).sum(-1)).clamp_min(0)  # [B] nats still to commit
    take = valid & (ranked.cumsum(-1) - ranked < need[:, None])  # [B, L] in rank order
    return commit | torch.zeros_like(commit).scatter_(-1, order, take)


def rectify(history: torch.Tensor, logp: torch.Tensor, rows: torch.Tensor, decay: float) -> torch.Tensor:
    """CCD's trajectory rectification: ``history`` ``[B, L, V]`` float32, the exponential moving average of the
    predictive laws ``p_theta`` a position has had over the steps it was a candidate, updated in place on ``rows``
    ``[B, L]`` with this step's ``logp`` ``[B, L, V]`` (a position's first update takes ``p_theta`` whole); returns
    the log of the rectified law ``[B, L, V]`` (``-inf`` where ``history`` is zero).

    A token that the network has preferred over several steps keeps a high rectified probability; one that a single
    step favours does not, so confidence in the rectified law is confidence consistent across the trajectory.
    ``decay`` in [0, 1): the weight of the past (0: this step alone, i.e. plain confidence).
    """
    p = logp.float().exp()  # [B, L, V]
    fresh = history.sum(-1, keepdim=True) == 0  # [B, L, 1]: never a candidate before
    mixed = torch.where(fresh, p, decay * history + (1 - decay) * p)
    history.copy_(torch.where(rows[..., None], mixed, history))
    return history.log()


def prompt_groups(x: torch.Tensor) -> torch.Tensor:
    """Group ids ``[B]``: rows of ``x`` ``[B, L]`` (the sampler's starting canvas) that are equal share a group, so
    the samples of one prompt (or every unprompted sample) repel each other and no one else."""
    return torch.unique(x, dim=0, return_inverse=True)[1]


def group_ranks(groups: torch.Tensor) -> list[torch.Tensor]:
    """Rows by rank within their group: the ``r``-th bool ``[B]`` marks each group's ``r``-th row (in batch order)."""
    onehot = torch.nn.functional.one_hot(groups)  # [B, G]
    rank = (onehot.cumsum(0) - 1).gather(1, groups[:, None]).squeeze(1)  # [B]
    return [rank == r for r in range(int(rank.max()) + 1)]


def repel(
    logp: torch.Tensor, x: torch.Tensor, groups: torch.Tensor, rows: torch.Tensor, strength: float, mask_id: int
) -> torch.Tensor:
    """Batch repulsion: ``log p_theta`` ``[B, L, V]`` minus ``strength`` times the share of the other samples of the
    row's group (``groups`` ``[B]``) that already hold token ``v`` at the position in ``x`` ``[B, L]``, renormalised,
    on ``rows`` ``[B, L]`` (elsewhere ``logp`` unchanged).

    A token the rest of the group has already written at a position becomes ``exp(-strength)`` times less likely
    there (when all the others hold it), so samples of one prompt spread over the model's modes instead of repeating
    the most probable one; ``strength = 0`` is the model's law. Positions still masked in every other sample are
    unaffected, so the first sample of a group to commit a position draws from ``p_theta``.
    """
    vocab = logp.shape[-1]
    held = (x != mask_id)[..., None] & (x.clamp_max(vocab - 1)[..., None] == torch.arange(vocab, device=x.device))
    held = held.float()  # [B, L, V]: the token each sample holds, if any
    totals = torch.zeros(int(groups.max()) + 1, *held.shape[1:], device=x.device).index_add_(0, groups, held)
    others = totals[groups] - held  # [B, L, V]: how many other samples of the group hold v at the position
    size = (torch.bincount(groups)[groups] - 1).clamp_min(1)  # [B]: the other samples of the group
    repelled = (logp.float() - strength * others / size[:, None, None]).log_softmax(-1)
    return torch.where(rows[..., None], repelled, logp)


def prophet_threshold(progress: float, thresholds: tuple[float, float, float] = PROPHET_THRESHOLDS) -> float:
    """The gap Prophet requires at ``progress`` in [0, 1] (fraction of the step budget used): by tercile."""
    if progress < 1 / 3:
        return thresholds[0]
    return thresholds[1] if progress < 2 / 3 else thresholds[2]


def prophet_ready(
    gap: torch.Tensor,
    candidates: torch.Tensor,
    progress: float,
    thresholds: tuple[float, float, float] = PROPHET_THRESHOLDS,
) -> torch.Tensor:
    """Prophet's early-commit test per row: bool ``[B]`` (Li et al., 2025, arXiv:2508.19982).

    A row is ready when the *mean* top-2 logit gap ``gap`` ``[B, L]`` over its ``candidates`` ``[B, L]`` (the
    masked positions still to decode) is ``>= prophet_threshold(progress)``: 7.5 in the first third of the steps,
    5.0 in the second, 2.5 in the last. Prophet averages the gap over the answer positions; an unconditional
    language model has no answer span, so the mean runs over every remaining candidate. A ready row goes
    "all-in": every candidate is filled by argmax in this step. Rows without candidates are never ready.
    """
    count = candidates.sum(-1)  # [B]
    mean_gap = (gap.float() * candidates).sum(-1) / count.clamp_min(1)  # [B]
    return (mean_gap >= prophet_threshold(progress, thresholds)) & (count > 0)


def remask_sigma(alpha_t: float | torch.Tensor, alpha_s: float | torch.Tensor, eta: float) -> float:
    """ReMDM's remasking probability ``sigma_t = min(eta, (1 - alpha_s) / alpha_t)`` (its "max-capped" schedule).

    The cap ``(1 - alpha_s) / alpha_t`` is the largest ``sigma`` for which the reverse step is a distribution.
    ``eta = 0`` switches remasking off.
    """
    if eta <= 0:
        return 0.0
    return min(eta, float((1 - alpha_s) / alpha_t))


def remask(
    x: torch.Tensor,
    candidates: torch.Tensor,
    prob: float,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ReMDM: each ``candidates`` ``[B, L]`` position of ``x`` ``[B, L]`` returns to ``[MASK]`` with ``prob``.

    ``candidates`` must hold only visible tokens the sampler generated (never prompt tokens, never ``[MASK]``).
    The Bernoulli draws are float64 uniforms, like every other draw of the samplers (docs/math.md §0).
    """
    if prob <= 0:
        return x
    u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)  # [B, L]
    return torch.where(candidates & (u < prob), mask_id, x)


def running_remask(running: torch.Tensor, revisable: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """RCR's choice: the ``count`` ``[B]`` positions of lowest running confidence ``running`` ``[B, L]`` among the
    ``revisable`` ``[B, L]`` ones, bool ``[B, L]`` (ties to the leftmost).

    MDPO's RCR fills every masked position of the block at each step and records each token's confidence (its
    probability when drawn); the schedule's number of positions that should still be masked after the step is then
    remasked, lowest running confidence first, whether the token was drawn now or steps ago. A token drawn with
    little confidence early can thus be revised once later tokens are more sure; one drawn confidently stays.
    """
    low = (-running).masked_fill(~revisable, -math.inf)  # the least confident rank first
    return select_topk(low, count)


def num_blocks(length: int, block_length: int | None) -> int:
    """Blocks of ``block_length`` covering ``length`` positions (the last may be shorter); None = one block."""
    if block_length is None:
        return 1
    if block_length < 1:
        raise ValueError(f"block_length must be a positive integer or None, got {block_length}")
    return math.ceil(length / block_length)


def active_block(
    length: int, block_length: int | None, block_index: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool ``[L]``: the positions of block ``block_index``, counted left to right (semi-autoregressive order)."""
    size = length if block_length is None else block_length
    positions = torch.arange(length, device=device)
    return (positions >= block_index * size) & (positions < (block_index + 1) * size)


def block_steps(steps: int, n_blocks: int) -> list[int]:
    """Split ``steps`` among ``n_blocks`` blocks: ``steps // n_blocks`` each, one more for the first ``remainder``."""
    if steps < n_blocks:
        raise ValueError(f"steps ({steps}) must be at least the number of blocks ({n_blocks}): one step per block")
    base, extra = divmod(steps, n_blocks)
    return [base + (b < extra) for b in range(n_blocks)]


def block_grid(ts: torch.Tensor, steps: int) -> torch.Tensor:
    """The time grid ``ts`` ``[T + 1]`` (1 -> ~0) resampled to ``steps + 1`` points by linear interpolation.

    Every block runs the whole schedule, from ``ts[0]`` to ``ts[-1]``, in its share of the steps (as LLaDA's
    semi-autoregressive sampling does); the shape of the grid is kept, and ``steps = T`` returns ``ts`` itself.
    """
    if steps == len(ts) - 1:
        return ts
    where = torch.linspace(0, len(ts) - 1, steps + 1, dtype=torch.float64, device=ts.device)  # fractional indices
    lo = where.floor().long().clamp_max(len(ts) - 2)
    frac = (where - lo).to(ts.dtype)
    return (1 - frac) * ts[lo] + frac * ts[lo + 1]  # exact at whole indices, so the end points are kept

"""Parallel-decoding selectors (docs/math.md §7) and the `parallel` sampler built on them."""

import inspect
import math

import pytest
import torch

from cdlm.config import compose, load_group
from cdlm.objectives.schedules import build_schedule
from cdlm.samplers import SAMPLERS, check_knobs, get_sampler
from cdlm.samplers.grids import linear_grid
from cdlm.samplers.selectors import (
    active_block,
    block_grid,
    block_steps,
    explore_uncertain,
    num_blocks,
    prompt_groups,
    prophet_ready,
    rectify,
    remask,
    remask_sigma,
    repel,
    running_remask,
    select_threshold,
    select_topk,
    topk_count,
)
from cdlm.types import SamplerStep
from tests.toys import GaussianToy


class GapToy:
    """A network-free masked objective: at position ``l`` the top token is ``l % V``, ahead of every other token
    by a logit gap of ``gap + 0.01 l`` (distinct confidences, mean gap within 0.01 L of ``gap``)."""

    space = "discrete"
    time_conditioning = False

    def __init__(self, gap: float, vocab_size: int = 7) -> None:
        self.gap, self.vocab_size, self.mask_id = gap, vocab_size, vocab_size
        self.schedule = build_schedule("loglinear")

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(z.shape[1])
        logits = torch.zeros(*z.shape, self.vocab_size)
        logits[:, pos, pos % self.vocab_size] = self.gap + 0.01 * pos
        return logits.log_softmax(-1)

    def prior(self, n, length, device, generator=None):
        return torch.full((n, length), self.mask_id, dtype=torch.long, device=device)


def run(obj, seed=0, n=3, length=24, steps=12, x=None, **knobs):
    """Run the `parallel` sampler; returns the samples and every step the callback saw."""
    steps_seen: list[SamplerStep] = []
    g = torch.Generator().manual_seed(seed)
    x = obj.prior(n, length, torch.device("cpu")) if x is None else x
    out = get_sampler("parallel", obj).fn(obj, x, linear_grid(steps), generator=g, callback=steps_seen.append, **knobs)
    return out, steps_seen


def states(x_start, steps_seen):
    return [x_start] + [s.x for s in steps_seen]


# ---- selectors as pure functions ----


def test_topk_count_follows_the_schedule():
    n = torch.tensor([10, 0, 7, 1])
    assert topk_count(n, 0.5, 0.75).tolist() == [5, 0, 4, 1]  # n/2, half rounds up
    assert topk_count(n, 0.5, 0.5).tolist() == [0, 0, 0, 0]
    assert topk_count(n, 0.5, 0.75, last=True).tolist() == [10, 0, 7, 1]  # the last step empties the row
    assert topk_count(n, 0.5, 0.75, sigma=0.25).tolist() == [8, 0, 5, 1]  # ReMDM unmasks 3/4 instead of 1/2
    many = torch.arange(50)
    for a_t, a_s in [(0.0, 0.01), (0.3, 0.9), (0.9, 1.0)]:
        k = topk_count(many, a_t, a_s, sigma=min(0.2, (1 - a_s) / max(a_t, 1e-9)))
        assert (k >= 0).all() and (k <= many).all()


def test_select_topk_commits_exactly_k_candidates():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        conf = torch.rand(6, 30, generator=g, dtype=torch.float64)
        candidates = torch.rand(6, 30, generator=g) < 0.4
        candidates[0] = False  # a row with nothing left
        conf = conf.masked_fill(~candidates, -torch.inf)
        k = torch.randint(0, 20, (6,), generator=g)
        chosen = select_topk(conf, k)
        assert torch.equal(chosen.sum(-1), torch.minimum(k, candidates.sum(-1)))
        assert not (chosen & ~candidates).any()
        for row in range(6):  # every chosen position is at least as confident as every candidate left out
            left_out = conf[row][candidates[row] & ~chosen[row]]
            if chosen[row].any() and left_out.numel():
                assert conf[row][chosen[row]].min() >= left_out.max()


def test_select_threshold_commits_top1_plus_confident_candidates():
    conf = torch.tensor(
        [
            [0.2, 0.95, 0.5, 0.91, -torch.inf],  # two above tau
            [0.3, 0.1, 0.2, 0.4, 0.35],  # none above tau: top-1 only
            [-torch.inf] * 5,  # no candidates
            [0.97, -torch.inf, 0.99, 0.1, 0.2],  # -inf entries are never chosen
        ],
        dtype=torch.float64,
    )
    chosen = select_threshold(conf, tau=0.9)
    expected = [[0, 1, 0, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]]
    assert chosen.long().tolist() == expected
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(64, 40, generator=g, dtype=torch.float64)
    candidates = torch.rand(64, 40, generator=g) < 0.3
    chosen = select_threshold(conf.masked_fill(~candidates, -torch.inf), tau=0.8)
    has = candidates.any(-1)
    assert (chosen.sum(-1)[has] >= 1).all() and not chosen[~has].any() and not (chosen & ~candidates).any()
    assert not (candidates & (conf >= 0.8) & ~chosen).any()


def test_prophet_ready_uses_the_mean_gap_over_candidates_by_tercile():
    gap = torch.tensor([[6.0, 6.0, 100.0], [3.0, 3.0, 3.0], [8.0, 8.0, 8.0], [9.0, 9.0, 9.0], [2.0, 10.0, 6.0]])
    candidates = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    # row 0: the huge gap is not a candidate, so its mean is 6; row 3 has no candidates and is never ready;
    # row 4: the mean (6), not the smallest gap (2), decides
    assert prophet_ready(gap, candidates, 0.1).tolist() == [False, False, True, False, False]  # needs 7.5
    assert prophet_ready(gap, candidates, 0.5).tolist() == [True, False, True, False, True]  # needs 5.0
    assert prophet_ready(gap, candidates, 0.9).tolist() == [True, True, True, False, True]  # needs 2.5
    assert prophet_ready(torch.full((1, 4), 2.0), torch.ones(1, 4, dtype=torch.bool), 1.0).tolist() == [False]


def test_remask_touches_only_candidates_at_rate_prob():
    g = torch.Generator().manual_seed(0)
    mask_id = 9
    x = torch.randint(0, 9, (400, 50), generator=g)
    x[:, :5] = mask_id  # already masked: never candidates
    candidates = (torch.rand(400, 50, generator=g) < 0.5) & (x != mask_id)
    out = remask(x, candidates, 0.3, mask_id, torch.Generator().manual_seed(1))
    flipped = out != x
    assert (out[flipped] == mask_id).all() and not (flipped & ~candidates).any()
    rate = flipped.sum().item() / candidates.sum().item()  # ~9,000 candidates: std of the rate ~0.005
    assert abs(rate - 0.3) < 0.02
    assert torch.equal(remask(x, candidates, 0.0, mask_id, g), x)
    assert remask_sigma(0.5, 0.99, 0.1) == pytest.approx(0.02)  # the cap (1 - a_s) / a_t binds
    assert remask_sigma(0.5, 0.9, 0.02) == 0.02 and remask_sigma(0.5, 0.9, 0.0) == 0.0


def test_block_helpers():
    assert num_blocks(24, 8) == 3 and num_blocks(25, 8) == 4 and num_blocks(25, None) == 1
    assert active_block(10, 4, 2).nonzero().flatten().tolist() == [8, 9]
    assert active_block(10, None, 0).all()
    assert block_steps(10, 3) == [4, 3, 3] and sum(block_steps(128, 8)) == 128
    with pytest.raises(ValueError, match="at least the number of blocks"):
        block_steps(2, 3)
    ts = linear_grid(12)
    assert block_grid(ts, 12) is ts
    sub = block_grid(ts, 5)
    assert len(sub) == 6 and sub[0] == ts[0] and sub[-1] == ts[-1] and (sub.diff() < 0).all()


# ---- the `parallel` sampler ----


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"selector": "threshold"},
        {"selector": "prophet", "block_length": 8},
        {"selector": "threshold", "block_length": 8, "remask_eta": 0.1},
    ],
)
def test_parallel_is_complete_seeded_and_counts_nfe(masked_objective, monkeypatch, knobs):
    calls = []
    denoise = masked_objective.denoise
    monkeypatch.setattr(masked_objective, "denoise", lambda z, t: calls.append(1) or denoise(z, t))
    a, steps_a = run(masked_objective, 1, **knobs)
    assert steps_a[-1].nfe == len(calls) <= 12  # one network call = one NFE, within the step budget
    b, _ = run(masked_objective, 1, **knobs)
    c, _ = run(masked_objective, 2, **knobs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != masked_objective.mask_id).all() and a.max() < masked_objective.vocab_size
    assert [s.index for s in steps_a] == sorted({s.index for s in steps_a})  # increasing step indices


def test_cache_skips_calls_without_changing_samples(masked_objective):
    cached, seen_c = run(masked_objective, 0, steps=64)  # 24 positions, 64 steps: k = 0 at many steps
    uncached, seen_u = run(masked_objective, 0, steps=64, cache=False)
    assert torch.equal(cached, uncached)
    assert seen_c[-1].nfe < seen_u[-1].nfe == 64  # steps where no position changed reused p_theta


def test_topk_and_threshold_commit_counts(masked_objective):
    x = masked_objective.prior(3, 24, torch.device("cpu"))
    _, seen = run(masked_objective, 0, x=x, steps=12)
    grid, alpha = linear_grid(12), masked_objective.schedule.alpha
    for step, (before, after) in zip(seen, zip(states(x, seen), states(x, seen)[1:])):
        n = (before == masked_objective.mask_id).sum(-1)
        i, last = step.index, step.index == 11
        k = topk_count(n, alpha(grid[i]), alpha(grid[i + 1]), last=last)
        assert torch.equal(n - (after == masked_objective.mask_id).sum(-1), k)  # exactly k per row
    _, seen = run(masked_objective, 0, x=x, steps=12, selector="threshold")
    for before, after in zip(states(x, seen), states(x, seen)[1:]):
        left = (before == masked_objective.mask_id).sum(-1)
        assert ((after == masked_objective.mask_id).sum(-1) < left)[left > 0].all()  # at least one per row


def test_prophet_goes_all_in_once_the_gap_holds_and_not_before():
    toy = GapToy(gap=6.0)  # mean gap ~6.1: below 7.5 (first third), above 5.0 (second third)
    x = toy.prior(2, 20, torch.device("cpu"))
    out, seen = run(toy, 0, x=x, steps=10, selector="prophet")
    masks = [(s.x == toy.mask_id).sum().item() for s in seen]
    assert [s.index for s in seen] == [0, 1, 2, 3]  # progress 0.1, 0.2, 0.3 stay top-k; 0.4 commits all
    assert masks == [36, 32, 28, 0]  # k = 2, 2, 2 per row, then the remaining 14 per row at once
    assert seen[-1].nfe == 4
    filled = seen[2].x == toy.mask_id  # what the all-in step filled: the argmax at every position
    assert torch.equal(out[filled], (torch.arange(20) % 7).expand(2, 20)[filled])
    _, seen = run(toy, 0, x=x, steps=10, selector="topk")
    assert len(seen) == 10  # the same toy without early commit uses the whole budget
    _, seen = run(GapToy(gap=8.0), 0, x=x, steps=10, selector="prophet")
    assert len(seen) == 1 and seen[0].nfe == 1  # gap above 7.5 from the start: all-in at the first step


@pytest.mark.parametrize("selector", ["topk", "threshold"])
def test_blocks_write_only_in_the_active_block(masked_objective, selector):
    mask_id, block_length = masked_objective.mask_id, 8
    x = masked_objective.prior(3, 24, torch.device("cpu"))
    x[:, 9] = 4  # a prompt token inside block 1
    out, seen = run(masked_objective, 0, x=x, steps=12, selector=selector, block_length=block_length, remask_eta=0.2)
    current, remasked = 0, 0
    for before, after in zip(states(x, seen), states(x, seen)[1:]):
        changed = (before != after).any(0).nonzero().flatten()
        blocks = set((changed // block_length).tolist())
        assert len(blocks) <= 1  # one block per step
        if blocks:
            block = blocks.pop()
            assert block >= current  # left to right
            current = block
            assert not (before[:, : block * block_length] == mask_id).any()  # earlier blocks are complete
        remasked += ((before != mask_id) & (after == mask_id)).sum().item()
    assert remasked > 0 and (out[:, 9] == 4).all() and (out != mask_id).all()  # prompt kept, remasking happened


def test_remasking_never_touches_the_prompt(masked_objective):
    x = masked_objective.prior(3, 24, torch.device("cpu"))
    x[:, :6] = 2
    out, seen = run(masked_objective, 0, x=x, steps=16, remask_eta=0.3)
    assert all((s.x[:, :6] == 2).all() for s in seen) and (out != masked_objective.mask_id).all()
    revisited = sum(
        ((a != masked_objective.mask_id) & (b == masked_objective.mask_id)).sum().item()
        for a, b in zip(states(x, seen), states(x, seen)[1:])
    )
    assert revisited > 0


def test_ancestral_remdm_knob(masked_objective):
    spec = get_sampler("ancestral", masked_objective)
    x = masked_objective.prior(3, 24, torch.device("cpu"))
    x[:, :4] = 1

    def ancestral(**knobs):
        seen: list[SamplerStep] = []
        g = torch.Generator().manual_seed(0)
        return spec.fn(masked_objective, x, linear_grid(16), generator=g, callback=seen.append, **knobs), seen

    assert torch.equal(ancestral()[0], ancestral(remask_eta=0.0)[0])  # off = the MDLM path
    out, seen = ancestral(remask_eta=0.3)
    assert (out != masked_objective.mask_id).all() and (out[:, :4] == 1).all()
    revisited = sum(
        ((a != masked_objective.mask_id) & (b.x == masked_objective.mask_id)).sum().item()
        for a, b in zip([x] + [s.x for s in seen], seen)
    )
    assert revisited > 0


def test_registry_configs_and_knob_errors(masked_objective):
    spec = get_sampler("parallel", masked_objective)
    assert SAMPLERS["parallel"].space == "discrete"
    with pytest.raises(ValueError, match="works on discrete objectives"):
        get_sampler("parallel", GaussianToy())
    defaults = {k: p.default for k, p in inspect.signature(spec.fn).parameters.items()}
    base = dict(load_group("sampler", "parallel"))
    assert base.pop("name") == "parallel" and set(base) - {"steps"} == set(spec.knobs())
    assert all(base[k] == defaults[k] for k in spec.knobs())
    for preset, key in [
        ("threshold", "selector"),
        ("prophet", "selector"),
        ("rcr", "selector"),
        ("semiar", "block_length"),
    ]:
        node = dict(load_group("sampler", preset))
        assert node.pop("name") == "parallel" and [k for k in base if node[k] != base[k]] == [key]
        check_knobs(spec, {k: v for k, v in node.items() if k != "steps"})
    remdm = dict(load_group("sampler", "remdm"))
    assert remdm.pop("name") == "ancestral" and remdm.pop("steps") == 128 and remdm["remask_eta"] == 0.02
    check_knobs(get_sampler("ancestral"), remdm)
    assert compose(["sampler=prophet", "sampler.tau=0.8"]).sampler.selector == "prophet"
    with pytest.raises(ValueError, match="selector must be one of"):
        run(masked_objective, selector="greedy")
    with pytest.raises(ValueError, match="at least the number of blocks"):
        run(masked_objective, steps=2, block_length=8)


# ---- RCR: MDPO's running-confidence remasking ----


def test_running_remask_picks_the_least_confident_revisable_tokens():
    running = torch.tensor([[0.9, 0.2, 0.5, 0.1], [0.3, 0.3, 0.8, 0.7]], dtype=torch.float64)
    revisable = torch.tensor([[True, True, True, False], [True, True, True, True]])
    chosen = running_remask(running, revisable, torch.tensor([2, 1]))
    assert chosen.tolist() == [[False, True, True, False], [True, False, False, False]]  # 0.1 is not revisable


def test_rcr_keeps_top_k_counts_revises_earlier_tokens_and_never_a_prompt(masked_objective):
    x = masked_objective.prior(3, 24, torch.device("cpu"))
    x[:, :4] = torch.arange(4)  # a prompt
    out, seen = run(masked_objective, 0, x=x, steps=12, selector="rcr")
    grid, alpha, mask = linear_grid(12), masked_objective.schedule.alpha, masked_objective.mask_id
    revised = False
    for step, (before, after) in zip(seen, zip(states(x, seen), states(x, seen)[1:])):
        n = (before == mask).sum(-1)
        k = topk_count(n, alpha(grid[step.index]), alpha(grid[step.index + 1]), last=step.index == 11)
        assert torch.equal(n - (after == mask).sum(-1), k)  # the top-k schedule's count per row
        assert torch.equal(after[:, :4], x[:, :4])  # the prompt stays
        revised |= bool(((before != mask) & (after == mask)).any())  # a token drawn earlier went back to [MASK]
    assert revised and (out != mask).all()


def test_rcr_with_fixed_confidences_and_argmax_is_top_k():
    """With confidences that do not depend on the state and argmax draws, the least confident tokens RCR remasks
    are exactly those top-k would not have committed yet: the same samples."""
    toy = GapToy(gap=1.0)
    x = toy.prior(2, 20, torch.device("cpu"))
    a, _ = run(toy, 0, x=x, steps=8, selector="rcr", temperature=0)
    b, _ = run(toy, 0, x=x, steps=8, temperature=0)
    assert torch.equal(a, b)


# ---- ETE: explore-then-exploit; CCD: history-rectified confidence ----


def test_explore_uncertain_adds_the_most_uncertain_candidates_up_to_the_budget():
    entropy = torch.tensor([[0.1, 2.0, 1.5, 0.5, 3.0], [0.1, 2.0, 1.5, 0.5, 3.0]])
    candidates = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    commit = torch.tensor([[True, False, False, False, False], [True, False, False, False, False]])
    chosen = explore_uncertain(entropy, candidates, commit, budget=3.0)
    # row 0: 0.1 committed; 2.0 brings 2.1 < 3, then 1.5 passes it (the last added may); 3.0 is not a candidate
    assert chosen[0].tolist() == [True, True, True, False, False]
    assert chosen[1].tolist() == [True, False, False, False, True]  # 3.0 alone reaches the budget
    assert torch.equal(explore_uncertain(entropy, candidates, commit, budget=0.0), commit)
    assert torch.equal(explore_uncertain(entropy, candidates, commit, budget=99.0), candidates)


def test_rectify_averages_a_positions_laws_over_its_candidate_steps():
    history = torch.zeros(1, 2, 3)
    first = torch.tensor([[[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]]]).log()
    rows = torch.tensor([[True, False]])
    out = rectify(history, first, rows, decay=0.5).exp()
    torch.testing.assert_close(out[0, 0], torch.tensor([0.8, 0.1, 0.1]))  # the first update takes p whole
    assert (history[0, 1] == 0).all()  # not a candidate: untouched
    second = torch.tensor([[[0.1, 0.8, 0.1], [0.2, 0.3, 0.5]]]).log()
    out = rectify(history, second, torch.tensor([[True, True]]), decay=0.5).exp()
    torch.testing.assert_close(out[0, 0], torch.tensor([0.45, 0.45, 0.1]))  # a one-step switch is not trusted
    torch.testing.assert_close(out[0, 1], torch.tensor([0.2, 0.3, 0.5]))


@pytest.mark.parametrize("selector", ["ete", "ccd"])
def test_ete_and_ccd_finish_keep_prompts_and_blocks(masked_objective, selector):
    x = masked_objective.prior(3, 24, torch.device("cpu"))
    x[:, :4] = torch.arange(4)  # a prompt
    out, seen = run(masked_objective, 0, x=x, steps=12, selector=selector, block_length=8)
    mask = masked_objective.mask_id
    assert (out != mask).all() and torch.equal(out[:, :4], x[:, :4])
    for before, after in zip(states(x, seen), states(x, seen)[1:]):
        changed = (before != after).any(0).nonzero().flatten()
        assert len(changed) == 0 or int(changed.max()) // 8 == int(changed.min()) // 8  # one block per step
        assert ((before == mask) | (before == after)).all()  # commits only: nothing is revised
        assert ((before == mask) & (after != mask)).sum(-1).min() >= 1 or (before != mask).all()


def test_ete_commits_more_per_round_than_threshold_and_budget_zero_is_threshold():
    toy = GapToy(gap=1.0)  # nothing reaches tau = 0.9: threshold commits the top-1 alone
    x = toy.prior(2, 20, torch.device("cpu"))
    _, plain = run(toy, 0, x=x, steps=20, selector="threshold")
    _, explored = run(toy, 0, x=x, steps=20, selector="ete", ete_budget=4.0)
    assert explored[-1].nfe < plain[-1].nfe == 20
    a, _ = run(toy, 0, x=x, steps=20, selector="ete", ete_budget=0.0)
    b, _ = run(toy, 0, x=x, steps=20, selector="threshold")
    assert torch.equal(a, b)


class SplitToy(GapToy):
    """A ``GapToy`` that is unsure (gap 1: confidence 0.31 at V = 7) before position ``sure_from`` and, from there on,
    sure (gap 8: confidence > 0.99) at the positions ``sure`` selects (every one by default)."""

    def __init__(self, sure_from: int, sure=lambda pos: pos >= 0) -> None:
        super().__init__(gap=1.0)
        self.sure_from, self.sure = sure_from, sure

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(z.shape[1])
        gap = torch.where((pos >= self.sure_from) & self.sure(pos), 8.0, 1.0)  # [L]
        logits = torch.zeros(*z.shape, self.vocab_size)
        logits[:, pos, pos % self.vocab_size] = gap
        return logits.log_softmax(-1)


@pytest.mark.parametrize("selector", ["threshold", "ete", "ccd"])
def test_lookahead_commits_only_sure_positions_right_after_the_block(selector):
    toy = SplitToy(sure_from=8, sure=lambda pos: pos % 2 == 0)  # block 1: even positions sure, odd ones not
    x = toy.prior(2, 24, torch.device("cpu"))
    x[:, 10] = 3  # a prompt token inside the lookahead
    knobs = {"selector": selector, "block_length": 8, "ete_budget": 0.0}
    out, seen = run(toy, 0, x=x, steps=24, lookahead=8, **knobs)
    first = seen[0].x  # after block 0's first step
    committed = (x == toy.mask_id) & (first != toy.mask_id)  # [B, L]
    sure_ahead = torch.tensor([p % 2 == 0 and p != 10 for p in range(8, 16)])
    assert torch.equal(committed[:, 8:16], sure_ahead.expand(2, -1))  # the sure ones of block 1, at once
    assert not committed[:, 16:].any()  # nothing beyond the lookahead
    assert (first[:, 10] == 3).all() and (out[:, 10] == 3).all() and (out != toy.mask_id).all()
    _, plain = run(toy, 0, x=x, steps=24, **knobs)
    assert not ((x == toy.mask_id) & (plain[0].x != toy.mask_id))[:, 8:].any()  # without it: block 0 alone


def test_lookahead_saves_rounds_and_zero_is_off():
    toy = SplitToy(sure_from=8)  # blocks 1 and 2 sure: the lookahead finishes block 1 during block 0
    x = toy.prior(2, 24, torch.device("cpu"))
    _, plain = run(toy, 0, x=x, steps=24, selector="threshold", block_length=8)
    _, ahead = run(toy, 0, x=x, steps=24, selector="threshold", block_length=8, lookahead=8)
    assert ahead[-1].nfe == plain[-1].nfe - 1 == 9  # block 0: 8 rounds; block 1 done early; block 2: 1 round
    a, _ = run(toy, 3, x=x, steps=24, selector="ete", block_length=8, lookahead=0)
    b, _ = run(toy, 3, x=x, steps=24, selector="ete", block_length=8)
    assert torch.equal(a, b)


def test_lookahead_on_a_network_keeps_prompts_and_only_commits(masked_objective):
    x = masked_objective.prior(3, 24, torch.device("cpu"))
    x[:, :4] = torch.arange(4)  # a prompt
    mask = masked_objective.mask_id
    for kv_cache in ("none", "prefix", "delayed"):
        out, seen = run(
            masked_objective, 0, x=x, steps=12, selector="ete", block_length=8, lookahead=8, tau=0.05, kv_cache=kv_cache
        )
        assert (out != mask).all() and torch.equal(out[:, :4], x[:, :4])
        for before, after in zip(states(x, seen), states(x, seen)[1:]):
            assert ((before == mask) | (before == after)).all()  # commits only: nothing is revised


def test_lookahead_is_refused_where_it_cannot_apply(masked_objective):
    x = masked_objective.prior(1, 16, torch.device("cpu"))
    for knobs, needle in (
        ({"selector": "topk", "lookahead": 4}, "threshold rule"),
        ({"selector": "ete", "lookahead": 4, "kv_cache": "dual", "block_length": 8}, "dual"),
        ({"selector": "ete", "lookahead": -1}, "integer >= 0"),
    ):
        with pytest.raises(ValueError, match=needle):
            run(masked_objective, 0, x=x, steps=4, **knobs)


def test_ccd_with_no_memory_is_threshold():
    toy = GapToy(gap=3.0)
    x = toy.prior(2, 20, torch.device("cpu"))
    a, _ = run(toy, 1, x=x, steps=10, selector="ccd", ccd_decay=0.0)
    b, _ = run(toy, 1, x=x, steps=10, selector="threshold")
    assert torch.equal(a, b)


# ---- batch repulsion between the samples of one prompt ----


def test_repel_lowers_tokens_the_rest_of_the_group_holds():
    x = torch.tensor([[1, 7], [1, 7], [2, 7], [0, 7]])  # mask_id 7; rows 0-2 one group, row 3 another
    groups = torch.tensor([0, 0, 0, 1])
    logp = torch.full((4, 2, 3), 1 / 3).log()
    rows = torch.ones(4, 2, dtype=torch.bool)
    out = repel(logp, x, groups, rows, strength=2.0, mask_id=7).exp()
    # row 2 sees token 1 at position 0 in both others: weight exp(-2) on it; row 0 sees one of two others
    expected = torch.tensor([1.0, math.exp(-2.0), 1.0])
    torch.testing.assert_close(out[2, 0], expected / expected.sum())
    expected = torch.tensor([1.0, math.exp(-1.0), math.exp(-1.0)])
    torch.testing.assert_close(out[0, 0], expected / expected.sum())
    torch.testing.assert_close(out[3], logp[3].exp())  # alone in its group
    torch.testing.assert_close(out[:, 1], logp[:, 1].exp())  # nobody holds position 1 yet
    assert prompt_groups(torch.tensor([[7, 3], [7, 7], [7, 3]])).tolist() in ([0, 1, 0], [1, 0, 1])


def test_repulsion_reduces_duplicate_samples_of_one_prompt():
    toy = GapToy(gap=2.0, vocab_size=3)  # confident but not certain: plain draws repeat the top token
    x = toy.prior(16, 6, torch.device("cpu"))
    x[8:, 0] = 1  # two prompts: 8 rows unprompted, 8 rows starting with token 1

    def duplicates(out):
        rows = [tuple(r.tolist()) for r in out]
        return sum(len(g) - len(set(g)) for g in (rows[:8], rows[8:]))

    plain = sum(duplicates(run(toy, s, x=x, steps=6)[0]) for s in range(4))
    repelled_out = [run(toy, s, x=x, steps=6, repulsion=4.0)[0] for s in range(4)]
    assert sum(duplicates(o) for o in repelled_out) < 0.5 * plain, plain
    assert all(torch.equal(o[8:, 0], x[8:, 0]) for o in repelled_out)

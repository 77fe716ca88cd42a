"""NAP's left-to-right diagnostic (cdlm/metrics/decoding_order.py) and self-BLEU (cdlm/metrics/diversity.py): known
values on orders and sample sets built by hand, and the callback on a real masked sampler."""

from __future__ import annotations

import pytest
import torch

from cdlm.metrics.decoding_order import DecodingOrder, average_ranks, left_to_right
from cdlm.metrics.diversity import self_bleu
from cdlm.module import DiffusionLM
from cdlm.types import SamplerStep
from tests.exact import LAWS, install_oracle
from tests.test_exact_samplers import build


def test_left_to_right_is_one_for_ar_order_minus_one_reversed_and_about_zero_for_random_order():
    generated = torch.ones(1, 8, dtype=torch.bool)
    assert left_to_right(torch.arange(8)[None], generated) == pytest.approx(1.0)
    assert left_to_right(torch.arange(8).flip(0)[None], generated) == pytest.approx(-1.0)
    torch.manual_seed(0)
    random = torch.stack([torch.randperm(32) for _ in range(400)])
    assert abs(left_to_right(random, torch.ones_like(random, dtype=torch.bool))) < 0.02
    blocks = torch.tensor([[0, 0, 1, 1, 2, 2]])  # semi-AR blocks of 2, both tokens of a block at once
    assert 0.9 < left_to_right(blocks, torch.ones_like(blocks, dtype=torch.bool)) < 1.0
    assert left_to_right(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)) == 0.0
    assert average_ranks(torch.tensor([5.0, 1.0, 5.0, 3.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


def test_the_callback_records_last_commits_and_leaves_the_prompt_out():
    mask = 9
    states = [[4, 9, 9, 9], [4, 1, 9, 9], [4, 9, 2, 9], [4, 5, 2, 3]]  # position 1 remasked, then recommitted
    order = DecodingOrder(mask, fixed=torch.tensor([[True, False, False, False]]))
    for i, ids in enumerate(states):
        order(SamplerStep(i, 1.0 - i / 4, torch.tensor([ids]), None, i + 1))
    assert order.value() == pytest.approx(left_to_right(torch.tensor([[3, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)))
    # ARness@1: position 1 at step 1 (no mask left of it), position 2 at step 2 (position 1, remasked, is left of
    # it: not AR), positions 1 and 3 at step 3 (no mask left): 3 of 4 commits; the prompt is no commit
    assert order.commits == 4 and order.arness() == 0.75


def test_arness_is_one_for_ar_order_and_small_for_random_order():
    mask, length = 99, 64
    ar, shuffled = DecodingOrder(mask), DecodingOrder(mask)
    order = torch.randperm(length, generator=torch.Generator().manual_seed(0))
    for i in range(length):
        left_to_right_state = torch.where(torch.arange(length) <= i, 1, mask)[None]
        random_state = torch.full((1, length), mask)
        random_state[0, order[: i + 1]] = 1
        ar(SamplerStep(i, 0.0, left_to_right_state, None, i + 1))
        shuffled(SamplerStep(i, 0.0, random_state, None, i + 1))
    assert ar.arness() == 1.0 and shuffled.arness() < 0.15


def test_semi_autoregressive_blocks_of_one_token_decode_left_to_right_and_top_k_does_not():
    objective = build("cdlm.objectives.masked.MaskedDiffusion")
    install_oracle(objective, LAWS["correlated"]())
    model = DiffusionLM(objective)
    ar = DecodingOrder(objective.mask_id)
    model.generate(16, 4, "parallel", 4, seed=0, dtype=None, callback=ar, block_length=1)
    assert ar.value() == pytest.approx(1.0)
    free = DecodingOrder(objective.mask_id)
    model.generate(16, 4, "ancestral", 4, seed=0, dtype=None, callback=free)
    assert free.value() < 0.9


def test_self_bleu_is_one_for_copies_and_zero_for_disjoint_samples():
    copies = torch.arange(10).repeat(3, 1)
    assert self_bleu(copies) == pytest.approx(1.0)
    disjoint = torch.arange(30).view(3, 10)
    assert self_bleu(disjoint) == 0.0
    assert self_bleu(copies[:1]) is None
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 5:] = False  # a row up to its EOS: shorter, still all shared n-grams, so only the brevity penalty acts
    assert 0 < self_bleu(copies, mask) < 1

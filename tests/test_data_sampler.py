"""``ResumableSampler``: the shuffling loader's order, rank shards that make up the one-process batch, a position
that resumes exactly and survives a change of the number of ranks."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from cdlm.data.sampler import ResumableSampler

N, B = 103, 8


def epochs(sampler: ResumableSampler, count: int) -> list[list[int]]:
    """The rows of ``count`` successive epochs (a new iterator per epoch, as a training loop makes)."""
    return [list(sampler) for _ in range(count)]


def test_one_process_order_is_the_shuffling_loaders():
    loader = StatefulDataLoader(
        list(range(N)), batch_size=B, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3)
    )
    expected = [torch.cat(list(loader)).tolist() for _ in range(4)]
    assert epochs(ResumableSampler(N, B, seed=3), 4) == expected


def test_rank_batches_together_are_the_one_process_batch():
    world = 2
    single = epochs(ResumableSampler(N, B * world, seed=1), 3)
    ranks = [epochs(ResumableSampler(N, B, seed=1, rank=r, world_size=world), 3) for r in range(world)]
    for e in range(3):
        assert len(ranks[0][e]) == len(ranks[1][e]) == len(single[e]) // world
        for step in range(len(single[e]) // (B * world)):
            together = {i for r in range(world) for i in ranks[r][e][step * B : (step + 1) * B]}
            assert together == set(single[e][step * B * world : (step + 1) * B * world])


def test_position_resumes_exactly_mid_epoch_and_at_an_epoch_end():
    for stop in (5, 3 * (N // B * B)):  # inside epoch 0, and the end of epoch 2
        reference = ResumableSampler(N, B, seed=2)
        stream = [i for _ in range(5) for i in reference]
        first = ResumableSampler(N, B, seed=2)
        taken = []
        while len(taken) < stop:
            for i in first:
                taken.append(i)
                if len(taken) == stop:
                    break
        resumed = ResumableSampler(N, B, seed=2)
        resumed.load_state_dict(first.state_dict())
        rest = [i for _ in range(3) for i in resumed][: len(stream) - stop]
        assert taken + rest == stream[: len(taken) + len(rest)]


def test_position_is_kept_over_all_ranks_when_their_number_changes():
    two = ResumableSampler(N, B, seed=0, rank=0, world_size=2)
    it = iter(two)
    for _ in range(2 * B):
        next(it)
    state = two.state_dict()
    assert state == {"epoch": 0, "rows": 4 * B}
    one = ResumableSampler(N, B, seed=0)
    one.load_state_dict(state)
    assert one.yielded == 4 * B


def test_plain_dataloader_accepts_it():
    loader = DataLoader(list(range(N)), batch_size=B, sampler=ResumableSampler(N, B), drop_last=True)
    assert len(loader) == N // B and len(torch.cat(list(loader))) == N // B * B

"""Training noise per global row (cdlm/draws.py): a row's draws do not depend on which rows share its batch."""

import pytest
import torch

from cdlm import draws


def take(rows: list[int], micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    with draws.row_draws(7, 3, micro, rows, torch.device("cpu")):
        return (
            draws.randn(len(rows), 5, 2),
            draws.rand(len(rows), 5),
            draws.randn_like(torch.zeros(len(rows), 4, dtype=torch.float64)),
            draws.coin(0.5),
        )


def test_rows_draw_the_same_whatever_batch_they_are_in():
    whole = take([0, 1, 2, 3])
    even, odd = take([0, 2]), take([1, 3])  # rank 0 and rank 1 of 2 reading every other row
    for full, a, b in zip(whole[:3], even[:3], odd[:3], strict=True):
        assert torch.equal(full[0::2], a) and torch.equal(full[1::2], b)
    assert whole[2].dtype == torch.float64
    assert whole[3] == even[3] == odd[3]  # the per-batch coin is every rank's
    assert not torch.equal(take([0, 1, 2, 3])[0], take([4, 5, 6, 7])[0])


def test_coins_follow_the_micro_batch_and_are_fair():
    coins = [take([0], micro)[3] for micro in range(400)]
    assert 160 < sum(coins) < 240


def test_outside_a_step_the_global_generator_draws():
    torch.manual_seed(0)
    expected = torch.randn(3, 2)
    torch.manual_seed(0)
    assert torch.equal(draws.randn(3, 2), expected)


def test_a_draw_without_the_batch_first_is_refused():
    with draws.row_draws(0, 0, 0, [0, 1], torch.device("cpu")), pytest.raises(RuntimeError, match="batch dimension"):
        draws.randn(3, 2)

import pytest
import torch

from cdlm.objectives.entropy_rate import EntropyRateSchedule
from cdlm.objectives.gumbel_schedule import GumbelSchedule
from cdlm.objectives.noise_schedule import NoiseSchedule
from cdlm.objectives.schedules import SCHEDULES, build_schedule


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_derivative_matches_autograd(name):
    schedule = build_schedule(name, eps=1e-3)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(schedule.alpha(t).sum(), t)
    torch.testing.assert_close(schedule.dalpha(t.detach()), grad)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_end_points_and_monotone(name):
    schedule = build_schedule(name, eps=1e-3)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert alpha[0] == pytest.approx(1.0)
    assert alpha[-1] < 2e-3
    assert (alpha.diff() < 0).all()
    assert (schedule.weight(t[1:]) > 0).all()


def test_known_values():
    loglinear, cosine = build_schedule("loglinear", 1e-3), build_schedule("cosine", 1e-3)
    t = torch.tensor([0.5], dtype=torch.float64)
    assert loglinear.alpha(t).item() == pytest.approx(1 - 0.999 * 0.5)
    assert loglinear.weight(t).item() == pytest.approx(0.999 / (0.999 * 0.5))  # ~ 1/t
    assert cosine.alpha(t).item() == pytest.approx(1 - torch.cos(torch.tensor(torch.pi / 2 * (1 - 0.4995))).item())


def test_unknown_schedule_lists_valid():
    with pytest.raises(ValueError, match="cosine"):
        build_schedule("linearish")


def test_mask_and_noise_schedules_are_different_kinds():
    """A masked objective's ``schedule`` gives ``alpha(t)``; a continuous one's gives ``sigma(t)`` (a NoiseSchedule)."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for schedule in (GumbelSchedule(), EntropyRateSchedule(bins=8, fifo_size=8)):
        assert isinstance(schedule, NoiseSchedule)
        sigma = schedule.sigma_of_t(t)
        assert sigma.dtype == torch.float64 and (sigma.diff() > 0).all() and isinstance(schedule.logs(), dict)
    assert not any(isinstance(build_schedule(name), NoiseSchedule) for name in SCHEDULES)

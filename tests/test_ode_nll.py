"""The ODE likelihood bound (docs/math.md §6) on the exact Gaussian toy, where ``p_sigma`` is known in closed form."""

import math

import pytest
import torch

from cdlm.objectives.ode_likelihood import gaussian_log_density, log_sigma_grid, ode_log_density, ode_nll
from cdlm.objectives.ve import VEObjective, row_sigma, training_u
from tests.toys import GaussianToy


def exact_log_density(obj: GaussianToy, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """``log N(x; mu, (s^2 + sigma_min^2) I)`` ``[B]`` over the valid positions."""
    return gaussian_log_density(x.double(), obj.mu, obj.s**2 + obj.sigma_min**2, padding)


def test_log_sigma_grid():
    grid = log_sigma_grid(0.01, 100.0, 4)
    torch.testing.assert_close(grid, torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64))


def test_ode_log_density_matches_the_exact_density():
    # One Hutchinson probe per sequence is unbiased; compare means over 8k sequences (1% = 0.4 nats).
    obj = GaussianToy(s=10.0)
    g = torch.Generator().manual_seed(0)
    n, length = 8192, 4
    x = obj.mu + math.sqrt(obj.s**2 + obj.sigma_min**2) * torch.randn(n, length, obj.dim, generator=g)
    padding = torch.ones(n, length, dtype=torch.bool)
    padding[: n // 2, 3] = False  # a padded position in half the rows: masked out of the probe and of every sum
    estimate = ode_log_density(obj, x, steps=64, generator=g, padding=padding)  # [B]
    exact = exact_log_density(obj, x, padding)
    assert estimate.dtype == torch.float64 and estimate.shape == (n,)
    error = (estimate.mean() - exact.mean()).abs() / exact.mean().abs()
    print(f"relative error of the mean log-density: {error:.2e}")
    assert error < 0.01, f"relative error {error:.4f}"
    # What is left is Heun's quadrature error (the identity part of div f is exact, the Jacobian trace of this
    # isotropic toy is exact under a Rademacher probe): second order, so doubling the steps cuts it ~4x.
    finer = ode_log_density(obj, x, steps=128, generator=g, padding=padding)
    assert (finer.mean() - exact.mean()).abs() < 0.35 * (estimate.mean() - exact.mean()).abs()


def test_ode_log_density_per_sequence():
    # Per sequence, averaging 1024 probes. s = 30 makes the probe noise small (~0.10 nats per row of ~ -58 nats;
    # 1% = 0.58) while the ODE still runs over sigma in [0.01, 50]; a wrong sign would be off by ~16 nats.
    obj = GaussianToy(s=30.0)
    g = torch.Generator().manual_seed(1)
    x = obj.mu + obj.s * torch.randn(4, 4, obj.dim, generator=g)
    padding = torch.ones(4, 4, dtype=torch.bool)
    repeats = 1024
    estimate = ode_log_density(obj, x.repeat(repeats, 1, 1), steps=64, generator=g, padding=padding.repeat(repeats, 1))
    estimate = estimate.view(repeats, 4).mean(0)  # [4]
    exact = exact_log_density(obj, x, padding)
    error = ((estimate - exact).abs() / exact.abs()).max()
    print(f"max relative error per sequence: {error:.2e}")
    assert error < 0.01


def test_ode_nll_on_the_toy():
    obj = GaussianToy(ode_steps=8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, obj.vocab_size, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    out = ode_nll(obj, batch, steps=8, generator=torch.Generator().manual_seed(7))
    assert out.nll.shape == (6, 5) and torch.isfinite(out.nll).all() and torch.isfinite(out.loss)
    assert (out.nll[mask == 0] == 0).all() and torch.equal(out.mask, mask.bool())
    torch.testing.assert_close(out.loss, out.nll.sum() / mask.sum())
    terms = out.logs["decoder_nll"] + out.logs["ode_nll"] + out.logs["log_q"]
    torch.testing.assert_close(out.loss, terms)
    per_row = out.nll.sum(1) / mask.sum(1)  # every valid token of a row carries the same share
    torch.testing.assert_close(out.nll, per_row[:, None] * mask)
    assert out.logs["decoder_nll"] < 0.01  # the codebook is far apart at sigma_min: the decoder is near certain
    again = ode_nll(obj, batch, steps=8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.nll, again.nll)  # seeded
    assert torch.isfinite(obj.nll(batch).loss)  # the toy's nll() goes through the same bound


def test_ode_nll_ignores_padding_content():
    # Padded positions never enter the bound: changing their ids leaves it unchanged under the same seed.
    obj = GaussianToy()
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    other = ids.clone()
    other[mask == 0] = 5
    a = ode_nll(obj, {"input_ids": ids, "attention_mask": mask}, steps=8, generator=torch.Generator().manual_seed(3))
    b = ode_nll(obj, {"input_ids": other, "attention_mask": mask}, steps=8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.nll, b.nll)


def test_ode_nll_under_inference_mode():
    # Lightning runs validation under torch.inference_mode; the divergence still needs its vector-Jacobian product.
    obj = GaussianToy()
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    expected = ode_nll(obj, batch, steps=4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = ode_nll(obj, batch, steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.nll, expected.nll)


class DeclaredToy(VEObjective, GaussianToy):
    """The toy with ``prior`` and ``nll`` from ``VEObjective``: it only declares the numbers (and the width ``D``)."""

    @property
    def state_width(self) -> int:
        return self.dim


def test_ve_objective_prior_and_bound_from_declared_numbers():
    obj, toy = DeclaredToy(ode_steps=4), GaussianToy(ode_steps=4)
    draw = obj.prior(5, 3, torch.device("cpu"), generator=torch.Generator().manual_seed(2))  # [5, 3, D]
    same = toy.prior(5, 3, torch.device("cpu"), generator=torch.Generator().manual_seed(2))  # the toy's own formula
    assert draw.shape == (5, 3, obj.dim) and draw.dtype == torch.float32 and torch.equal(draw, same)
    batch = {"input_ids": torch.randint(0, obj.vocab_size, (3, 4), generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(0)
    bound = obj.nll(batch)
    torch.manual_seed(0)
    assert torch.equal(bound.nll, ode_nll(toy, batch, steps=4).nll)


@pytest.mark.parametrize("sigma", [0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.full((4,), 0.5)])
def test_row_sigma_is_float64_per_row(sigma):
    out = row_sigma(sigma, torch.zeros(4, 2, 3))
    assert out.shape == (4,) and out.dtype == torch.float64 and (out == 0.5).all()


def test_training_u_reads_the_batch_or_draws_from_the_global_rng():
    ids = torch.zeros(3, 5, dtype=torch.long)
    u = torch.tensor([0.1, 0.2, 0.3])
    assert training_u({"input_ids": ids, "u": u}) is u
    torch.manual_seed(7)
    drawn = training_u({"input_ids": ids})
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))

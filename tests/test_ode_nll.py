"""The ODE likelihood bound (docs/math.md §6) on the exact Gaussian toy, where ``p_sigma`` is known in closed form."""

import math

import pytest
import torch

from cdlm.checks import ArgumentError
from cdlm.objectives.bitstream import Bitstream
from cdlm.objectives.embedding_flow import EmbeddingFlow
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.flow_map import FlowMap
from cdlm.objectives.ode_likelihood import (
    gaussian_log_density,
    log_sigma_grid,
    ode_log_densities,
    ode_log_density,
    ode_nll,
    rademacher_probes,
    sequence_terms,
)
from cdlm.objectives.ve import VEObjective, row_sigma, training_u
from tests.conftest import tiny_backbone
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


# ---- several Hutchinson probes on one trajectory, and the bound's standard error (docs/math.md §6) ---------------
class MixingToy(GaussianToy):
    """The toy with a linear denoiser that mixes the ``D`` coordinates of a position: ``D(x) = mu + c(sigma) M (x -
    mu)``, ``c = s^2 / (s^2 + sigma^2)``, so ``dD/dx = c(sigma) M`` per position. Hutchinson's ``u^T (dD/dx) u`` is
    exact for every Rademacher probe when ``M`` is diagonal and noisy otherwise. Elementwise products and a sum over
    ``D`` (no BLAS), so its values are reproducible bit for bit."""

    def __init__(self, mixing: torch.Tensor, **kwargs: object) -> None:
        super().__init__(dim=mixing.shape[0], **kwargs)
        self.mixing = mixing  # M [D, D]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        shrink = (self.s**2 / (self.s**2 + sigma.to(x.dtype) ** 2))[:, None, None]  # [B, 1, 1]
        mixed = ((x - self.mu)[..., None, :] * self.mixing.to(x.dtype)).sum(-1)  # M (x - mu) [B, L, D]
        return self.mu + shrink * mixed


class MixingVE(VEObjective, MixingToy):
    """``MixingToy`` with ``VEObjective.nll`` (``ode_steps``, ``ode_rows``, ``ode_probes``)."""

    @property
    def state_width(self) -> int:
        return self.dim


MIXING = torch.tensor([[1.0, 0.5, -0.25], [0.25, 0.8, 0.5], [-0.5, 0.25, 1.2]])  # not diagonal, not symmetric
DIAGONAL = torch.diag(torch.tensor([1.0, 0.3, 1.7]))


def jacobian_weight(obj: MixingToy, steps: int) -> float:
    """``K``: the Heun sum of ``c(sigma) / sigma`` on the solve's grid, so that a probe ``u`` adds
    ``-K sum_l u_l^T M u_l`` to ``log p`` (the Jacobian part ``-u^T (dD/dx) u / sigma``, integrated)."""
    sigmas = log_sigma_grid(obj.sigma_min, obj.sigma_max, steps)
    rate = obj.s**2 / (obj.s**2 + sigmas**2) / sigmas  # [steps + 1]
    return float((0.5 * (sigmas[1:] - sigmas[:-1]) * (rate[1:] + rate[:-1])).sum())


def test_one_probe_is_bit_identical_to_the_solve_before_probes():
    # Values of the one-probe code before `probes` existed (same seeds), as float.hex: probes=1 must reproduce them.
    obj = MixingToy(MIXING)
    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 4, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask}
    for probes in ({}, {"probes": 1}):
        out = ode_nll(obj, batch, steps=6, generator=torch.Generator().manual_seed(11), rows=1, **probes)
        assert [float(v).hex() for v in out.nll[:, 0]] == ["0x1.4bcc100000000p+10", "0x1.1601660000000p+8"]
        assert float(out.loss).hex() == "0x1.d2df560000000p+9"
        logs = {k: float(v).hex() for k, v in out.logs.items()}  # no nll_se with one probe
        assert logs == {"decoder_nll": "0x0.0p+0", "ode_nll": "0x1.cdeb9a0000000p+9", "log_q": "0x1.3cef440000000p+3"}
        g = torch.Generator().manual_seed(3)
        x = 0.5 + 2 * torch.randn(3, 4, 3, generator=g)
        padding = torch.ones(3, 4, dtype=torch.bool)
        padding[1, 2:] = False
        log_p = ode_log_density(obj, x, steps=5, generator=g, padding=padding, **probes)  # [3] float64
        expected = ["-0x1.df7fbecf0bf32p+13", "-0x1.0a045f6103dd2p+11", "-0x1.243aeeb807a62p+13"]
        assert [float(v).hex() for v in log_p] == expected


@pytest.mark.parametrize("network", [False, True])
def test_probes_share_one_trajectory_and_match_one_probe_solves(network: bool):
    # R probes from one solve = R one-probe solves drawing the same probes (one generator, probes drawn in turn):
    # the trajectory is the same, each probe's integral too; the bound is their mean.
    if network:
        torch.manual_seed(0)
        obj = OneHotFlow(tiny_backbone(), vocab_size=11, ode_steps=2).eval()  # vjps through a real network
        x = torch.softmax(3 * torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(4)), -1)
    else:
        obj = MixingToy(MIXING)
        x = 0.5 + 2 * torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(4))
    padding = torch.ones(3, 5, dtype=torch.bool)
    padding[2, 3:] = False
    R = 4
    several = ode_log_densities(obj, x, steps=3, generator=torch.Generator().manual_seed(9), padding=padding, probes=R)
    g = torch.Generator().manual_seed(9)
    single = torch.stack([ode_log_density(obj, x, steps=3, generator=g, padding=padding) for _ in range(R)])  # [R, B]
    assert several.shape == (R, 3) and several.dtype == torch.float64
    torch.testing.assert_close(several, single, rtol=1e-12, atol=1e-9)
    assert (several.std(0) > 0).all()  # the probes differ
    mean = ode_log_density(obj, x, steps=3, generator=torch.Generator().manual_seed(9), padding=padding, probes=R)
    torch.testing.assert_close(mean, single.mean(0), rtol=1e-12, atol=1e-9)


def test_each_probe_adds_its_own_exact_jacobian_term():
    # Linear toy: log p_r = common - K sum_l u_rl^T M u_rl, with the probes u_r redrawn from the same seed.
    obj, steps, R = MixingToy(MIXING), 4, 5
    x = 0.5 + 2 * torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0))
    padding = torch.tensor([[True, True, True], [True, False, False]])
    log_p = ode_log_densities(obj, x, steps, torch.Generator().manual_seed(1), padding, probes=R)  # [R, B]
    u = rademacher_probes(x.shape, R, padding, torch.Generator().manual_seed(1)).double()  # [R, B, L, D]
    quadratic = torch.einsum("rbli,ij,rblj->rb", u, MIXING.double(), u)  # sum_l u_l^T M u_l [R, B]
    expected = -jacobian_weight(obj, steps) * (quadratic - quadratic[0])
    torch.testing.assert_close(log_p - log_p[0], expected, rtol=1e-5, atol=1e-5)


def test_standard_error_is_zero_for_a_diagonal_jacobian():
    # u^T (dD/dx) u = tr dD/dx for every Rademacher probe when dD/dx is diagonal: every probe gives the same bound.
    obj = MixingVE(DIAGONAL, ode_steps=4)
    obj.ode_probes = 6
    batch = {"input_ids": torch.randint(0, obj.vocab_size, (4, 5), generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(0)
    out = obj.nll(batch)
    assert out.logs["nll_se"].dtype == torch.float64 and out.logs["nll_se"].dim() == 0
    assert out.logs["nll_se"] < 1e-9 * out.loss.abs()


def test_standard_error_matches_hutchinson_and_shrinks_as_one_over_sqrt_probes():
    # Non-diagonal M: per position, u^T M u - tr M = sum_{i<j} (M_ij + M_ji) u_i u_j, a sum of uncorrelated +-1 terms,
    # so each probe's bound per token has std K sqrt(n S) / n (n tokens, S = sum_{i<j} (M_ij + M_ji)^2).
    obj = MixingVE(MIXING, ode_steps=4)
    ids = torch.randint(0, obj.vocab_size, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[3, 2:] = 0
    batch, n = {"input_ids": ids, "attention_mask": mask}, int(mask.sum())
    sym = MIXING + MIXING.T
    S = float(sym.triu(1).square().sum())
    std = jacobian_weight(obj, obj.ode_steps) * math.sqrt(n * S) / n  # nats/token, one probe
    se = {}
    for R in (4, 16, 256):
        obj.ode_probes = R
        draws = []
        for seed in range(16 if R < 256 else 1):
            torch.manual_seed(seed)
            out = obj.nll(batch)
            draws.append(float(out.logs["nll_se"]))
        se[R] = sum(draws) / len(draws)
        print(f"R = {R}: mean SE {se[R]:.4f}, sqrt(R) SE {se[R] * math.sqrt(R):.4f}, predicted std {std:.4f}")
    assert abs(se[256] * 16 / std - 1) < 0.2  # 256 probes: the sample std is within ~5% of the truth
    assert 1.5 < se[4] / se[16] < 2.6  # ~ sqrt(16 / 4) (E[sample std] is ~8% low at R = 4)
    assert all(0 < v for v in se.values())


def test_several_probes_through_the_ode_nll():
    # The bound is the mean of the per-probe bounds; logs["nll_se"] is their std / sqrt(R), recomputed here from the
    # per-sequence terms of the same draws; rows (chunked solves) and inference mode keep working.
    obj, R = MixingToy(MIXING), 3
    ids = torch.randint(0, obj.vocab_size, (3, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.inference_mode():
        out = ode_nll(obj, batch, steps=3, generator=torch.Generator().manual_seed(5), rows=2, probes=R)
    g = torch.Generator().manual_seed(5)
    parts = [sequence_terms(obj, i, m.bool(), 3, g, R) for i, m in zip(ids.split(2), mask.split(2))]
    decoder, log_p, log_q = (torch.cat(t, dim=-1) for t in zip(*parts))  # [B], [R, B], [B]
    bounds = (decoder - log_p + log_q).sum(-1) / mask.sum()  # [R] per-probe bounds per token
    torch.testing.assert_close(out.loss, bounds.mean().float())
    torch.testing.assert_close(out.logs["nll_se"], bounds.std() / math.sqrt(R))
    assert out.logs["nll_se"].dtype == torch.float64 and out.logs["nll_se"] > 0
    terms = out.logs["decoder_nll"] + out.logs["ode_nll"] + out.logs["log_q"]
    torch.testing.assert_close(out.loss, terms)


def test_ode_probes_setting_on_every_continuous_objective():
    torch.manual_seed(0)
    objectives = {
        "flow": lambda **k: OneHotFlow(tiny_backbone(), vocab_size=11, **k),
        "flow_map": lambda **k: FlowMap(tiny_backbone(), vocab_size=11, **k),
        "langflow": lambda **k: EmbeddingFlow(tiny_backbone(), vocab_size=11, **k),
        "bitstream": lambda **k: Bitstream(tiny_backbone(), vocab_size=11, **k),
    }
    for name, build in objectives.items():
        assert build().ode_probes == 1, name
        for bad in (0, -2, 1.5, True):
            with pytest.raises(ArgumentError, match=f"ode_probes must be an integer >= 1, got {bad!r}"):
                build(ode_probes=bad)
    with pytest.raises(ArgumentError, match="probes must be an integer >= 1, got 0"):
        ode_nll(GaussianToy(), {"input_ids": torch.zeros(1, 2, dtype=torch.long)}, steps=2, probes=0)
    flow = objectives["flow"](ode_steps=2, ode_probes=3).eval()
    batch = {"input_ids": torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))}
    out = flow.nll(batch)
    assert out.logs["nll_se"].dtype == torch.float64 and torch.isfinite(out.logs["nll_se"]) and out.logs["nll_se"] > 0
    assert "nll_se" not in objectives["flow"](ode_steps=2).eval().nll(batch).logs

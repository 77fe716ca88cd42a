"""FLM (Lee et al. 2026, "Flow map language models"): one-hot flow matching and its time warp (docs/math.md §2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cdlm.models.backbone import Backbone
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.time_warps import OneHotTimeWarp, alpha_onehot
from cdlm.samplers.continuous import euler_step
from cdlm.types import ContinuousObjective
from tests.conftest import tiny_backbone
from tests.runs import LossRecorder, fit

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_alpha_onehot_flow.json"
# a few values of the reference file (dense quadrature), so the check runs without shared/: (K, c, alpha)
EMBEDDED = [
    (4, 0.1, 0.039228),
    (4, 0.5, 0.402709),
    (85, 0.6, 0.183919),
    (85, 0.7, 0.455539),
    (4096, 0.7, 0.108421),
    (4096, 0.8, 0.640462),
    (50257, 0.7, 0.033277),
    (50257, 0.8, 0.412737),
    (50257, 0.9, 0.999997),
]


def reference_values() -> list[tuple[int, float, float]]:
    if not REFERENCE.exists():
        return EMBEDDED
    table = json.loads(REFERENCE.read_text())["alpha"]
    return [(int(K), float(c), a) for K, row in table.items() for c, a in row.items()] + EMBEDDED


def flow(**kwargs) -> OneHotFlow:
    torch.manual_seed(0)
    return OneHotFlow(tiny_backbone(), vocab_size=11, **kwargs)


def test_alpha_matches_the_dense_quadrature_reference() -> None:
    values = reference_values()
    for K in sorted({K for K, _, _ in values}):
        c = torch.tensor([c for k, c, _ in values if k == K], dtype=torch.float64)
        expected = torch.tensor([a for k, _, a in values if k == K], dtype=torch.float64)
        torch.testing.assert_close(alpha_onehot(c, K), expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(OneHotTimeWarp(K).alpha_of_c(c), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("K", [2, 85, 2048])
def test_alpha_and_c_of_t_are_monotone_with_the_right_end_points(K: int) -> None:
    warp = OneHotTimeWarp(K)
    c = torch.linspace(0, 1, 2001, dtype=torch.float64)
    alpha = warp.alpha_of_c(c)
    assert alpha.dtype == torch.float64 and (alpha.diff() >= 0).all()
    assert alpha[0].item() == 0.0 and alpha[-1].item() == 1.0 and alpha_onehot(torch.zeros(1), K).item() == 0.0
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    c_t = warp.c_of_t(t)
    assert (c_t.diff() <= 0).all() and c_t[-1].item() == 0.0 and warp.alpha_of_c(c_t[:1]).item() == 1.0
    inner = t[20:-20]  # the inverse is exact up to interpolation: alpha(c(t)) = 1 - t
    torch.testing.assert_close(warp.alpha_of_c(warp.c_of_t(inner)), 1 - inner, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("K", "ts"), [(4, (0.25, 0.5, 0.75)), (84, (0.25, 0.5, 0.75)), (4096, (0.6,))])
def test_c_of_t_reveals_tokens_at_rate_one_minus_t_by_monte_carlo(K: int, ts: tuple[float, ...]) -> None:
    g = torch.Generator().manual_seed(K)
    warp = OneHotTimeWarp(K)
    for t in ts:
        c = float(warp.c_of_t(torch.tensor(t)))
        p = (1 - t) * (K - 1) / K + 1 / K  # the argmax hit rate if c(t) is right
        n = math.ceil(1.2 * (4 * K / (K - 1) * math.sqrt(p * (1 - p)) / 0.01) ** 2)  # 0.01 = 4.4 standard errors
        hits = 0
        for start in range(0, n, 4096):
            z = (1 - c) * torch.randn(min(4096, n - start), K, generator=g)  # [N, K], true token 0
            z[:, 0] += c
            hits += int((z.argmax(-1) == 0).sum())
        alpha_mc = K / (K - 1) * (hits / n - 1 / K)
        assert abs(alpha_mc - (1 - t)) < 0.01, (K, t, alpha_mc)


def test_ve_euler_step_is_flms_native_euler_step() -> None:
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 5, 7
    x0_hat = torch.randn(B, L, V, generator=g, dtype=torch.float64).softmax(-1)  # on the simplex
    c = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    c_next = torch.tensor([0.3, 0.45, 0.99], dtype=torch.float64)
    z = c[:, None, None] * torch.randn(B, L, V, generator=g, dtype=torch.float64).softmax(-1)
    z = z + (1 - c[:, None, None]) * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    native = z + ((c_next - c) / (1 - c))[:, None, None] * (x0_hat - z)  # FLM: z <- z + (c' - c)(x0_hat - z)/(1-c)
    sigma, sigma_next = (1 - c) / c, (1 - c_next) / c_next
    for i in range(B):  # sigma as a python float, one row at a time
        ve = euler_step(z[i : i + 1] / c[i], x0_hat[i : i + 1], float(sigma[i]), float(sigma_next[i]))
        torch.testing.assert_close(c_next[i] * ve[0], native[i], atol=1e-6, rtol=0)


def test_sigma_is_increasing_float64_and_bounded() -> None:
    objective = flow()
    assert isinstance(objective, ContinuousObjective)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    sigma = objective.sigma(t)
    assert sigma.dtype == torch.float64 and (sigma.diff() >= 0).all() and sigma.isfinite().all()
    assert math.isclose(sigma[0].item(), objective.sigma_min) and math.isclose(sigma[-1].item(), objective.sigma_max)
    assert 0 < objective.sigma_min < 0.5 < 100 < objective.sigma_max
    big = OneHotFlow(tiny_backbone(), vocab_size=2048)
    assert math.isclose(big.sigma_min, 0.124, rel_tol=0.01) and math.isclose(big.sigma_max, 170.2, rel_tol=0.01)


def test_loss_shape_padding_and_gradient() -> None:
    objective = flow()
    ids = torch.randint(11, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 8:] = False
    batch = {"input_ids": ids, "attention_mask": mask, "u": torch.tensor([0.1, 0.5, 0.9])}
    torch.manual_seed(1)
    out = objective.loss(batch)
    assert out.loss.ndim == 0 and out.loss.isfinite() and out.nll.shape == (3, 12)
    assert (out.nll[1, 8:] == 0).all() and (out.nll[mask] > 0).all()
    assert 0 < out.logs["c"].item() < 1
    torch.manual_seed(1)
    other = objective.loss({**batch, "input_ids": torch.where(mask, ids, 3)})  # padded ids must not matter
    torch.testing.assert_close(other.loss, out.loss)
    out.loss.backward()
    for p in (objective.embed.weight, objective.head.weight):
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0


def test_sampling_view_denoise_prior_decode() -> None:
    objective = flow(soft_cap=30.0).eval()
    x = objective.prior(2, 6, torch.device("cpu"), generator=torch.Generator().manual_seed(0))  # [2, 6, 11]
    assert x.shape == (2, 6, 11)
    for sigma in (objective.sigma_max, 1.0, objective.sigma_min):
        x0 = objective.denoise(x, torch.full((2,), sigma, dtype=torch.float64))
        assert x0.shape == (2, 6, 11) and x0.dtype == torch.float32 and (x0 >= 0).all()
        torch.testing.assert_close(x0.sum(-1), torch.ones(2, 6))
    ids = torch.randint(11, (2, 6))
    assert objective.decode(objective.clean_state(ids)).equal(ids)
    nll = objective.decoder_nll(objective.clean_state(ids), ids)
    assert nll.shape == (2, 6) and nll.isfinite().all()


def test_nll_is_the_ode_bound_per_token() -> None:
    objective = flow(ode_steps=2).eval()
    ids = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 6:] = False
    out = objective.nll({"input_ids": ids, "attention_mask": mask})
    assert out.nll.shape == (2, 8) and out.nll.isfinite().all() and (out.nll[0, 6:] == 0).all()


def test_tiny_flow_run_learns_and_samples(tmp_path) -> None:
    recorder = LossRecorder()
    overrides = ("objective=flow", "sampler=euler", "trainer.max_steps=40", "module.lr=3e-3", "objective.ode_steps=4")
    module, _, _ = fit(tmp_path, *overrides, callbacks=(recorder,))
    losses = [recorder.losses[k] for k in sorted(recorder.losses)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    for sampler in ("euler", "heun", "churn"):
        ids, texts = module.generate(2, 16, sampler, steps=8, seed=0)
        assert ids.shape == (2, 16) and len(texts) == 2 and all(isinstance(s, str) and s for s in texts)


def test_noisy_input_has_the_distribution_of_z_at_e():
    """Training draws ``z @ E`` directly in width W: mean ``c E[x]`` and covariance ``(1 - c)^2 E^T E`` per token."""
    torch.manual_seed(0)
    obj = OneHotFlow(Backbone(width=16, depth=1, heads=2, cond_width=8), vocab_size=50)
    x = torch.full((20_000, 1), 7)
    c = torch.full((20_000, 1, 1), 0.25)
    with torch.no_grad():
        h = obj.noisy_input(x, c).reshape(-1, 16)  # [N, W]
        E = obj.embed.weight
        torch.testing.assert_close(h.mean(0), 0.25 * E[7], atol=4 * 0.75 * E.norm(dim=0).max() / 141, rtol=0)
        cov = torch.cov(h.T)
        expected = 0.75**2 * E.T @ E
        assert (cov - expected).abs().max() < 0.05 * expected.abs().max()


def test_matched_filter_with_a_silent_network_is_the_exact_posterior_and_its_bound_is_log_v() -> None:
    objective = flow(matched_filter=True, ode_steps=16).eval()
    torch.nn.init.zeros_(objective.head.weight)  # the network says nothing: logits = the filter alone
    ids = torch.randint(11, (16, 8), generator=torch.Generator().manual_seed(0))
    x0 = objective.clean_state(ids)
    for sigma in (0.3, 2.0):
        x = x0 + sigma * torch.randn_like(x0)
        exact = torch.distributions.Normal(x[..., None, :], sigma).log_prob(torch.eye(11)).sum(-1).softmax(-1)
        torch.testing.assert_close(objective.denoise(x, torch.full((16,), sigma)), exact.float(), rtol=1e-4, atol=1e-5)
    # iid uniform tokens under the exact posterior: the ODE bound (docs/math.md §6) is log V up to its slack
    out = objective.nll({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert abs(out.loss.item() - math.log(11)) < 0.3, out.loss.item()


def test_decoder_includes_the_exact_likelihood_at_sigma_min() -> None:
    objective = flow().eval()  # FLM as published: the network alone reads x @ E
    ids = torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(1))
    x = objective.clean_state(ids) + objective.sigma_min * torch.randn(4, 8, 11)
    assert objective.decoder_nll(x, ids).mean() < 0.01  # near-certain at sigma_min = 0.124 (V = 11)


def test_matched_filter_run_learns(tmp_path) -> None:
    recorder = LossRecorder()
    overrides = (
        "objective=flow",
        "sampler=euler",
        "objective.matched_filter=true",
        "trainer.max_steps=30",
        "module.lr=3e-3",
    )
    fit(tmp_path, *overrides, "objective.ode_steps=4", callbacks=(recorder,))
    losses = [recorder.losses[k] for k in sorted(recorder.losses)]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

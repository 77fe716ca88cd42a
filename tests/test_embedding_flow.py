"""LangFlow (Chen et al. 2026): embedding-space VP diffusion with the learnable Gumbel schedule (docs/math.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.objectives.embedding_flow import EmbeddingFlow, c_skip
from cdlm.objectives.gumbel_schedule import GumbelSchedule
from cdlm.objectives.noise_schedule import NoiseSchedule
from cdlm.samplers.continuous import euler_step
from cdlm.types import ContinuousObjective
from tests.conftest import tiny_backbone
from tests.runs import LossRecorder, fit, prompted_bounds

EULER_GAMMA = 0.5772156649


def langflow(**kwargs) -> EmbeddingFlow:
    torch.manual_seed(0)
    return EmbeddingFlow(tiny_backbone(), vocab_size=11, **kwargs)


def vp(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha, s`` of the VP path at ``gamma``: ``alpha^2 = sigmoid(-gamma)``, ``s^2 = sigmoid(gamma)``."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def test_skip_is_the_exact_factorised_gaussian_posterior() -> None:
    g = torch.Generator().manual_seed(0)
    V, D = 13, 24
    E = torch.randn(V, D, generator=g, dtype=torch.float64)
    E = math.sqrt(D) * E / E.norm(dim=-1, keepdim=True)  # [V, D], equal norms
    for gamma in (-3.0, 0.0, 2.5, 6.0):
        gamma_t = torch.tensor(gamma, dtype=torch.float64)
        alpha, s = vp(gamma_t)
        x = torch.randint(V, (50,), generator=g)
        z = alpha * E[x] + s * torch.randn(50, D, generator=g, dtype=torch.float64)  # [N, D]
        skip = torch.softmax(c_skip(gamma_t) * z @ E.T, dim=-1)  # [N, V]
        posterior = torch.softmax(-(z[:, None] - alpha * E[None]).square().sum(-1) / (2 * s**2), dim=-1)
        torch.testing.assert_close(skip, posterior, atol=1e-6, rtol=0)


def test_gamma_is_the_gumbel_inverse_cdf() -> None:
    loc, scale = 1.3, 0.7
    schedule = GumbelSchedule(loc, scale)
    u = torch.rand(1000, dtype=torch.float64).clamp(1e-5, 1 - 1e-5)
    torch.testing.assert_close(schedule.gamma(u), loc - scale * torch.log(-torch.log(u)))
    draws = schedule.gamma(torch.rand(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert abs(draws.mean().item() - (loc + EULER_GAMMA * scale)) < 0.01  # standard error ~0.002
    assert schedule.gamma(torch.tensor([0.0, 1.0])).isfinite().all()  # clamped at the 1e-5 quantiles


def test_sigma_is_increasing_float64_and_bounded_by_min_max() -> None:
    objective = langflow()
    assert isinstance(objective, ContinuousObjective)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    sigma = objective.sigma(t)
    assert sigma.dtype == torch.float64 and (sigma.diff() > 0).all()
    assert math.isclose(sigma[0].item(), objective.sigma_min) and math.isclose(sigma[-1].item(), objective.sigma_max)
    torch.testing.assert_close(2 * sigma.log(), objective.schedule.gamma(t))
    assert isinstance(objective.schedule, NoiseSchedule) and objective.state_width == objective.dim


def test_fit_rule_recovers_a_gumbel_shaped_ce_curve() -> None:
    torch.manual_seed(0)
    true_loc, true_scale, true_amp = 2.0, 1.3, 5.0
    schedule = GumbelSchedule(3.0, 0.852, amplitude=7.0)
    optimizer = torch.optim.Adam(schedule.parameters(), lr=0.03)
    n = 256
    for _ in range(400):
        u = (torch.rand(()) + torch.arange(n) / n) % 1.0  # low-discrepancy, as in training
        gamma = schedule.gamma(u)  # drawn with the current (detached) parameters
        ce = true_amp * torch.exp(-torch.exp(-(gamma - true_loc) / true_scale)) + 0.1 * torch.randn(n)
        optimizer.zero_grad()
        schedule.fit_loss(gamma, ce).backward()
        optimizer.step()
    assert abs(schedule.loc.item() - true_loc) < 0.2
    assert abs(schedule.scale.item() / true_scale - 1) < 0.2


def test_ve_euler_step_is_the_ddim_step_in_gamma_space() -> None:
    g = torch.Generator().manual_seed(0)
    x0_hat = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    for gamma, gamma_next in ((6.0, 4.0), (2.0, -1.0), (0.5, 0.4)):
        gamma_t, gamma_n = torch.full((3,), gamma, dtype=torch.float64), torch.full((3,), gamma_next).double()
        (alpha, s), (alpha_n, s_n) = (v[:, None, None] for v in vp(gamma_t)), (v[:, None, None] for v in vp(gamma_n))
        z = alpha * x0_hat + s * torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
        z_next = alpha_n * x0_hat + s_n * (z - alpha * x0_hat) / s  # DDIM (eta = 0)
        sigma, sigma_next = (gamma_t / 2).exp(), (gamma_n / 2).exp()
        x_next = euler_step(z / alpha, x0_hat, sigma, sigma_next)
        torch.testing.assert_close(x_next, z_next / alpha_n, atol=1e-6, rtol=0)


def test_self_conditioning_map_is_zero_at_init() -> None:
    objective = langflow().eval()
    z, x_sc = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    assert torch.equal(objective.self_cond(torch.cat([z, x_sc], dim=-1)), torch.zeros_like(z))
    gamma = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(objective.logits(z, gamma, x_sc), objective.logits(z, gamma, torch.zeros_like(z)))


def test_loss_shape_padding_and_schedule_gradients_only_through_the_fit() -> None:
    objective = langflow(self_condition=1.0)
    ids = torch.randint(11, (4, 8))
    padding = torch.ones(4, 8, dtype=torch.bool)
    padding[1, 5:] = False
    out = objective.loss({"input_ids": ids, "attention_mask": padding, "u": torch.tensor([0.1, 0.4, 0.6, 0.9])})
    assert out.nll.shape == (4, 8) and out.loss.ndim == 0 and out.loss.isfinite()
    assert (out.nll[~padding] == 0).all() and (out.nll[padding] > 0).all()
    assert {"loc", "scale", "A", "ce", "fit_loss"} <= set(out.logs)
    schedule = list(objective.schedule.parameters())
    ce_part = out.nll.sum() / padding.sum()  # the CE term of the loss, without the schedule's fit
    ce_grads = torch.autograd.grad(ce_part, schedule, retain_graph=True, allow_unused=True)
    assert all(g is None or (g == 0).all() for g in ce_grads)
    fit_grads = torch.autograd.grad(out.loss, schedule, retain_graph=True)
    assert all(g.abs() > 0 for g in fit_grads)
    out.loss.backward()
    assert objective.embed.weight.grad.abs().sum() > 0 and objective.head.weight.grad.abs().sum() > 0


def test_a_frozen_schedule_gets_no_gradient_and_keeps_its_values() -> None:
    objective = langflow(learn_schedule=False)
    before = [p.detach().clone() for p in objective.schedule.parameters()]
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(11, (4, 8))
    out = objective.loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "u": torch.rand(4)})
    assert out.logs["fit_loss"] == 0
    out.loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in objective.schedule.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, objective.schedule.parameters()))
    assert objective.head.weight.grad.abs().sum() > 0  # the network still learns
    with pytest.raises(ValueError, match="learn_schedule"):
        langflow(learn_schedule="no")


def test_denoise_prior_and_decoding_shapes() -> None:
    objective = langflow().eval()
    x = objective.prior(2, 7, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 7, 32)
    x0_hat = objective.denoise(x.double(), torch.full((2,), objective.sigma_max, dtype=torch.float64))
    assert x0_hat.shape == x.shape and x0_hat.dtype == torch.float64
    assert (x0_hat.norm(dim=-1) <= math.sqrt(32) + 1e-6).all()  # a convex mix of norm-sqrt(D) embeddings
    ids = torch.randint(11, (2, 7))
    clean = objective.clean_state(ids)
    torch.testing.assert_close(clean.norm(dim=-1), torch.full((2, 7), math.sqrt(32)))
    assert torch.equal(objective.decode(clean), ids)  # sigma_min is small enough to read clean embeddings back
    assert objective.decoder_nll(clean, ids).shape == (2, 7)


def test_ode_bound_of_the_exact_posterior_denoiser_is_log_v() -> None:
    # At init the head and W_sc are zero, so denoise is the exact posterior mean for iid uniform tokens: the ODE
    # bound (docs/math.md §6) of such data must come out at log V nats per token, up to the dequantisation gap.
    objective = langflow(ode_steps=16).eval()
    ids = torch.randint(11, (16, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = objective.nll(batch)
    assert out.nll.shape == (16, 8)
    assert abs(out.loss.item() - math.log(11)) < 0.3, out.loss.item()


def test_tiny_run_learns_and_samples_with_every_continuous_sampler(tmp_path) -> None:
    recorder = LossRecorder()
    overrides = ("objective=langflow", "sampler=euler", "trainer.max_steps=40", "module.lr=3e-3")
    module, _, _ = fit(tmp_path, *overrides, "objective.ode_steps=4", callbacks=(recorder,))
    losses = list(recorder.losses.values())
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
    for sampler in ("euler", "heun", "churn"):
        ids, texts = module.generate(2, 16, sampler, steps=8, seed=0)
        assert ids.shape == (2, 16) and len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_the_analytic_skip_can_be_left_out_of_the_logits():
    """``analytic_skip=False`` (the ablation of docs/math.md §3): the logits are the network's alone, so at
    initialisation (zero head) they are uniform, where the skip makes them the factorised posterior."""
    from cdlm.checks import ArgumentError

    torch.manual_seed(0)
    on = EmbeddingFlow(tiny_backbone(), 16)
    off = EmbeddingFlow(tiny_backbone(), 16, analytic_skip=False)
    off.load_state_dict(on.state_dict())
    z, gamma = torch.randn(2, 5, 32), torch.zeros(2)
    x_sc = torch.zeros(2, 5, 32)
    assert torch.equal(off.logits(z, gamma, x_sc), torch.zeros(2, 5, 16))
    assert on.logits(z, gamma, x_sc).abs().max() > 1
    with pytest.raises(ArgumentError, match="analytic_skip"):
        EmbeddingFlow(tiny_backbone(), 16, analytic_skip="no")


def test_clean_spans_are_prefixes_or_scattered_and_never_padding():
    from cdlm.objectives.clean_spans import clean_spans

    torch.manual_seed(0)
    padding = torch.ones(400, 12, dtype=torch.bool)
    padding[:, 10:] = False
    assert not clean_spans(padding, 0.0).any()
    spans = clean_spans(padding, 0.5)
    assert not (spans & ~padding).any()
    given = spans.any(1)
    assert 0.4 < given.float().mean() < 0.6  # about half of the rows are conditioned
    counts = spans.sum(1)
    prefix = torch.tensor([spans[r].equal(torch.arange(12) < counts[r]) for r in range(400)]) & given
    assert prefix.sum() > 80 and (given & ~prefix).sum() > 40  # both kinds occur
    assert counts[prefix].min() >= 1 and (counts[prefix] <= 9).float().mean() > 0.8  # prefixes leave tokens to predict


def test_conditional_training_scores_only_the_free_positions_and_reads_given_ones_clean():
    from cdlm.checks import ArgumentError
    from cdlm.prompts import Prompt, given

    model = langflow(condition_rate=1.0)
    ids = torch.randint(0, 11, (6, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "u": torch.rand(6)}
    out = model.loss(batch)
    assert out.mask.sum() < 60 and (out.nll[~out.mask] == 0).all()
    # a prompt given to the sampler: the logits are those of the clean embeddings, flagged
    z, gamma, x_sc = torch.randn(2, 10, 32), torch.full((2,), 3.0), torch.zeros(2, 10, 32)
    fixed = torch.zeros(2, 10, dtype=torch.bool)
    fixed[:, :4] = True
    with torch.no_grad():
        model.clean_flag.fill_(0.5)
        explicit = model.logits(z, gamma, x_sc, None, Prompt(ids[:2], fixed))
        with given(Prompt(ids[:2], fixed)):
            read = model.logits(z, gamma, x_sc)
        plain = model.logits(z, gamma, x_sc)
    assert torch.equal(read, explicit) and not torch.allclose(read, plain)
    assert not hasattr(langflow(), "clean_flag")  # no conditioning: the checkpoint keys are unchanged
    with pytest.raises(ValueError, match="condition_rate > 0"):
        langflow().conditional_nll(batch, fixed)
    with pytest.raises(ArgumentError, match="condition_rate"):
        langflow(condition_rate=1.5)


def test_a_conditionally_trained_run_bounds_tokens_given_their_prompt_lower(tmp_path) -> None:
    """Clean spans in training (``objective.condition_rate``): the run keeps a prompt when sampling, and its ODE
    bound of the second half of each validation row given the first half is below its unconditional bound."""
    overrides = ("objective=langflow", "sampler=euler", "trainer.max_steps=60", "module.lr=3e-3")
    module, _, datamodule = fit(tmp_path, *overrides, "objective.ode_steps=8", "objective.condition_rate=0.5")
    ids, texts = module.generate(2, 16, "euler", steps=8, prompt="KING")
    assert all(t.startswith("KING") for t in texts)
    conditional, unconditional = prompted_bounds(module, datamodule)
    assert conditional < unconditional - 0.1, (conditional, unconditional)

"""MDLM objective: SUBS, the NELBO against exact enumeration, shapes and gradients."""

import itertools
import math

import pytest
import torch

from cdlm.objectives.masked import MaskedDiffusion
from tests.conftest import tiny_backbone


@torch.no_grad()
def test_subs_carries_visible_tokens_and_never_predicts_mask(masked_objective):
    obj = masked_objective
    z = torch.tensor([[3, obj.mask_id, 7, obj.mask_id]])
    logp = obj.denoise(z, torch.tensor([0.5]))  # [1, 4, V]
    assert logp.shape == (1, 4, obj.vocab_size)  # no [MASK] column at all
    probs = logp.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4))
    assert probs[0, 0, 3] == pytest.approx(1.0) and probs[0, 2, 7] == pytest.approx(1.0)
    assert (probs[0, 1] > 0).all()  # masked positions get a full distribution


def test_loss_shapes_and_padding_ignored(masked_objective):
    x = torch.randint(0, 11, (3, 16))
    pad = torch.ones_like(x, dtype=torch.bool)
    pad[1, 10:] = False
    out = masked_objective.loss({"input_ids": x, "attention_mask": pad, "u": torch.tensor([0.2, 0.5, 0.9])})
    assert out.nll.shape == (3, 16) and out.loss.ndim == 0
    assert (out.nll[1, 10:] == 0).all()
    out.loss.backward()
    assert all(p.grad is not None for p in masked_objective.head.parameters())


def exact_nelbo(obj: MaskedDiffusion, x: torch.Tensor, fixed: torch.Tensor | None = None) -> float:
    """Continuous-time NELBO of one sequence by enumerating every mask pattern and integrating over t; positions in
    ``fixed`` ``[1, L]`` are never masked (the conditional bound)."""
    fixed = torch.zeros_like(x, dtype=torch.bool) if fixed is None else fixed
    L = int((~fixed).sum())
    terms = []  # (number masked, sum of masked CE) per pattern
    for pattern in itertools.product([False, True], repeat=L):
        masked = torch.zeros_like(fixed)
        masked[~fixed] = torch.tensor(pattern)
        z = torch.where(masked, obj.mask_id, x)
        logp = obj.denoise(z, torch.tensor([0.5])).double()  # not time-conditioned: t is ignored
        ce = -logp.gather(-1, x[..., None])[..., 0]
        terms.append((int(masked.sum()), float((ce * masked).sum())))
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:]
    alpha, weight = obj.schedule.alpha(t), obj.schedule.weight(t)
    integrand = sum(((1 - alpha) ** k) * alpha ** (L - k) * ce for k, ce in terms) * weight
    return float(torch.trapezoid(integrand, t))


@torch.no_grad()
def test_nelbo_matches_exact_enumeration():
    """V = 3, L = 2, a fixed (random) denoiser: Monte Carlo ``nll`` equals the exact integral."""
    torch.manual_seed(0)
    obj = MaskedDiffusion(tiny_backbone(), vocab_size=3).eval()
    x = torch.tensor([[2, 0]])
    exact = exact_nelbo(obj, x)
    n = 200_000
    batch = {
        "input_ids": x.expand(n, 2),
        "attention_mask": torch.ones(n, 2, dtype=torch.bool),
        "u": (torch.arange(n, dtype=torch.float64) + 0.5) / n,
    }
    per_seq = obj.nll(batch).nll.double().sum(1)  # [n]
    estimate, stderr = per_seq.mean().item(), per_seq.std().item() / math.sqrt(n)
    assert abs(estimate - exact) < 4 * stderr + 1e-3, (estimate, exact, stderr)
    assert exact > 0


@torch.no_grad()
def test_conditional_nelbo_keeps_the_fixed_tokens_and_matches_exact_enumeration():
    """V = 3, L = 3, the first token given: the Monte Carlo ``conditional_nll`` equals the integral over the mask
    patterns of the two free positions only, and no term falls on the fixed position."""
    torch.manual_seed(0)
    obj = MaskedDiffusion(tiny_backbone(), vocab_size=3).eval()
    x, fixed = torch.tensor([[2, 0, 1]]), torch.tensor([[True, False, False]])
    exact = exact_nelbo(obj, x, fixed)
    n = 100_000
    batch = {
        "input_ids": x.expand(n, 3),
        "attention_mask": torch.ones(n, 3, dtype=torch.bool),
        "u": (torch.arange(n, dtype=torch.float64) + 0.5) / n,
    }
    out = obj.conditional_nll(batch, fixed.expand(n, 3))
    assert (out.nll[:, 0] == 0).all() and out.mask[:, 0].logical_not().all() and out.mask[:, 1:].all()
    per_seq = out.nll.double().sum(1)  # [n]
    estimate, stderr = per_seq.mean().item(), per_seq.std().item() / math.sqrt(n)
    assert abs(estimate - exact) < 4 * stderr + 1e-3, (estimate, exact, stderr)
    assert exact < exact_nelbo(obj, x) - 0.1  # the first token's own cost is not charged


@torch.no_grad()
def test_nelbo_upper_bounds_exact_nll_of_factorised_model():
    """With a denoiser that ignores context, the NELBO equals sum_l CE_l (MDLM, Sahoo et al. 2024, eq. 11)."""
    torch.manual_seed(0)
    obj = MaskedDiffusion(tiny_backbone(), vocab_size=3).eval()
    for p in obj.backbone.parameters():
        p.zero_()  # the backbone now returns the adaLN-normalised zeros: output independent of the input
    x = torch.tensor([[1, 2]])
    logp = obj.denoise(torch.full_like(x, obj.mask_id), torch.tensor([0.5])).double()
    exact_nll = float(-logp.gather(-1, x[..., None]).sum())
    assert exact_nelbo(obj, x) == pytest.approx(exact_nll, rel=2e-3)

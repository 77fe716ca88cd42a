"""The exact-posterior contract suite: every sampler, handed a perfect model of a known law, draws that law.

For every registered objective (``cdlm.components.OBJECTIVES``) and every sampler setting that fits it (each
registered sampler with its defaults, each shipped preset in ``configs/sampler``, and semi-autoregressive blocks), the
objective's network is replaced by the exact posterior of a tiny law (``tests/exact.py``): independent positions, and
a correlated law over six sequences that a sampler drawing positions independently would leave. A few thousand
sequences are drawn through the public ``DiffusionLM.generate``; their histogram must match the law by Pearson's
chi-square (p > 1e-3, fixed seeds) with no draw outside the support. Settings that are approximate by design
(several tokens committed per step from factorised marginals, greedy early commits) are declared in ``APPROXIMATE``
with the bound on their measured total-variation distance; few-step settings are measured by ``bench/exact_bias.py``.
A new objective or sampler is covered without editing this file (an objective with no oracle fails loudly).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from cdlm.components import OBJECTIVES
from cdlm.config import group_options, load_group
from cdlm.module import DiffusionLM
from cdlm.samplers import SAMPLERS
from tests.conftest import tiny_backbone
from tests.exact import LAWS, compare, install_oracle

V = 8  # tokens 0..7 (bitstream: exactly 3 bits)
N = 2000  # draws per setting
# "Many steps": ancestral MDLM draws positions that unmask at the same step from their marginals, which happens to a
# pair of the 4 positions with probability about 6 / steps; at 2048 steps that leaves the support in ~0.2% of draws.
MANY_STEPS = {"discrete": 2048, "continuous": 128, "autoregressive": 1}
P_MIN = 1e-3
OUTSIDE_MAX = 0.01  # the largest fraction of draws outside the support an exact-in-the-limit sampler may make

NEEDS_A_MODEL = ("edlm",)
# Settings that are approximate by design, with the largest total-variation distance accepted on these laws.
APPROXIMATE: dict[str, tuple[float, str]] = {
    "preset:threshold": (0.35, "commits every candidate above tau at once, each from its own marginal"),
    "preset:prophet": (0.45, "greedy early commit: once confident, fills the rest by argmax"),
    "preset:dual_cache": (0.35, "threshold commits with the dual cache (exact scores here: an oracle has no keys)"),
    "preset:ccd": (0.35, "threshold commits on the averaged law (measured tv 0.27 on the correlated law)"),
    "preset:ete": (0.65, "commits uncertain tokens together from their marginals: by design (measured tv 0.55)"),
    "preset:rcr": (0.7, "mode-seeking: at every step it redraws the masked tokens and keeps the surest draws"),
}


def build(path: str) -> torch.nn.Module:
    """The objective at ``path``, tiny and untrained (its network is replaced by the oracle)."""
    module_name, _, name = path.rpartition(".")
    torch.manual_seed(0)
    return getattr(importlib.import_module(module_name), name)(tiny_backbone(), V).eval()


def knob_key(sampler: str, steps: int, knobs: dict) -> tuple:
    spec = SAMPLERS[sampler]
    return sampler, steps, tuple(sorted({**spec.knob_defaults(), **knobs}.items()))


def many_steps(sampler: str, steps: int = 1) -> int:
    """At least ``MANY_STEPS`` of the sampler's space, within the steps it takes."""
    spec = SAMPLERS[sampler]
    most = float("inf") if spec.steps.high is None else spec.steps.high
    return int(min(max(steps, MANY_STEPS[spec.space]), most))


def sampler_cases() -> dict[str, tuple[str, int, dict]]:
    """Every registered sampler at its defaults, every shipped preset's options, semi-AR blocks of 2 and churn with
    Heun steps, each at many steps (``many_steps``); settings equal to an earlier one are dropped."""
    # edlm needs an energy model (another run): tests/test_edlm.py checks its law with the law itself as energy
    cases: dict[str, tuple[str, int, dict]] = {
        name: (name, many_steps(name), {}) for name in sorted(SAMPLERS) if name not in NEEDS_A_MODEL
    }
    for preset in group_options("sampler"):
        config = dict(load_group("sampler", preset))
        name, steps = config.pop("name"), config.pop("steps")
        if name in NEEDS_A_MODEL:
            continue
        cases[f"preset:{preset}"] = (name, many_steps(name, steps), config)
    cases["semiar:block_length=2"] = ("parallel", many_steps("parallel"), {"block_length": 2})
    cases["churn:heun"] = ("churn", many_steps("churn"), {"heun": True})
    unique, seen = {}, set()
    for case, (name, steps, knobs) in cases.items():
        key = knob_key(name, steps, knobs)
        if key not in seen:
            seen.add(key)
            unique[case] = (name, steps, knobs)
    return unique


CASES = sampler_cases()


def fitting(objective_path: str) -> list[str]:
    objective = build(objective_path)
    return [case for case, (name, _, _) in CASES.items() if SAMPLERS[name].fits(objective)]


PAIRS = [(path, case) for path in OBJECTIVES for case in fitting(path)]


def draw(objective: torch.nn.Module, case: str, length: int, seed: int = 0) -> torch.Tensor:
    name, steps, knobs = CASES[case]
    module = DiffusionLM(objective)
    ids, _ = module.generate(N, length, name, steps, seed=seed, dtype=None, **knobs)
    return ids


@pytest.mark.parametrize("law_name", sorted(LAWS))
@pytest.mark.parametrize(("objective_path", "case"), PAIRS, ids=[f"{p.rpartition('.')[2]}-{c}" for p, c in PAIRS])
def test_sampler_draws_the_law_of_an_exact_model(objective_path: str, case: str, law_name: str) -> None:
    law = LAWS[law_name]()
    objective = build(objective_path)
    install_oracle(objective, law)
    fit = compare(draw(objective, case, law.length), law)
    if case in APPROXIMATE:
        bound, why = APPROXIMATE[case]
        assert fit.tv <= bound, f"{case} ({why}): {fit}, more than the declared {bound}"
    else:
        assert fit.outside <= OUTSIDE_MAX and fit.p_value > P_MIN, f"{case} on {objective_path}, {law_name}: {fit}"


def test_every_objective_has_an_exact_oracle_and_a_sampler() -> None:
    for path in OBJECTIVES:
        objective = build(path)
        install_oracle(objective, LAWS["correlated"]())
        assert fitting(path), f"no registered sampler fits {path}"


def test_the_suite_detects_a_wrong_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampler that draws positions independently from their marginals fails the correlated law."""
    law = LAWS["correlated"]()
    objective = build("cdlm.objectives.masked.MaskedDiffusion")
    install_oracle(objective, law)
    marginals = objective.denoise(torch.full((N, law.length), V), torch.ones(N)).exp()  # [N, L, V]
    bad = compare(torch.distributions.Categorical(probs=marginals).sample(), law)
    assert bad.outside > OUTSIDE_MAX and bad.p_value < P_MIN


def test_the_suite_detects_the_trapezoid_in_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    """EDM's trapezoid written in sigma, which the second-order step replaced (docs/math.md §0), fails on FLM: its
    first interval spans a noise ratio of hundreds, and the correction scales the change of the estimate by half of
    it."""
    from cdlm.samplers import continuous

    def trapezoid(x, x0, x0_next, ratio, out=None, eps=None, scale=None) -> None:
        x0, x0_next = x0.double(), x0_next.double()
        x.copy_(x0 + ratio * (x - x0) + (1 / ratio - 1) / 2 * (x0_next - x0))  # x + (s' - s) (d + d') / 2
        if eps is not None:
            x.add_(eps.double() * scale)
        if out is not None:
            out.copy_(x)

    monkeypatch.setattr(continuous, "heun_correct_", trapezoid)
    law = LAWS["correlated"]()
    objective = build("cdlm.objectives.flow.OneHotFlow")
    install_oracle(objective, law)
    fit = compare(draw(objective, "heun", law.length), law)
    assert fit.p_value < P_MIN, fit

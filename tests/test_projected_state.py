"""The projected sampling state (cdlm.samplers.coordinates, docs/math.md §0 "Projected state"): FLM's network reads
its one-hot state only through ``x @ E``, so the continuous samplers keep ``y = x @ E`` ``[B, L, W]``; from the same
prior draw the projected and the full-state samplers take the same steps, and the projected draws have the law of
the projected full ones."""

from __future__ import annotations

import pytest
import torch

from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.flow_map import FlowMap
from cdlm.samplers import SAMPLERS
from cdlm.samplers.continuous import continuous_grid
from cdlm.samplers.coordinates import StateCoordinates
from tests.conftest import tiny_backbone

V, N, L = 96, 3, 10  # V > width (32): the projection applies


def objective(cls: type = OneHotFlow, **kwargs) -> OneHotFlow:
    torch.manual_seed(0)
    obj = cls(tiny_backbone(), V, **kwargs).eval()
    with torch.no_grad():  # weights away from adaLN-Zero's identity, so that every estimate depends on the input
        for p in obj.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return obj


def run(obj, sampler: str, steps: int, x: torch.Tensor, **knobs) -> tuple[torch.Tensor, list, list, list]:
    """Ids, the states and the clean estimates the callback saw, and the inputs the network read."""
    states, estimates, inputs = [], [], []

    def callback(step) -> None:
        states.append(step.x.clone())
        estimates.append(step.x0.clone())

    network = obj.network
    obj.network = lambda h, *args, **kwargs: inputs.append(h.clone()) or network(h, *args, **kwargs)
    try:
        ids = SAMPLERS[sampler].fn(obj, x, continuous_grid(steps), callback=callback, **knobs)
    finally:
        del obj.network
    return ids, states, estimates, inputs


@pytest.mark.parametrize(
    ("cls", "sampler", "steps"),
    [(OneHotFlow, "euler", 12), (OneHotFlow, "heun", 6), (FlowMap, "flowmap", 4), (FlowMap, "euler", 8)],
)
def test_the_projected_sampler_takes_the_full_samplers_steps(monkeypatch, cls, sampler, steps):
    obj = objective(cls)
    x = obj.prior(N, L, torch.device("cpu"), torch.Generator().manual_seed(1))  # [N, L, V]
    ids, states, estimates, inputs = run(obj, sampler, steps, x)
    E = obj.embed.weight.detach().double()
    assert states[0].shape == (N, L, 32)  # the sampler kept x @ E
    monkeypatch.setattr(type(obj), "state_projection", lambda self: None)
    full_ids, full_states, full_estimates, full_inputs = run(obj, sampler, steps, x)
    assert full_states[0].shape == (N, L, V) and len(inputs) == len(full_inputs)
    for h, h_full in zip(inputs, full_inputs, strict=True):  # the network read the same z @ E
        torch.testing.assert_close(h, h_full, rtol=1e-5, atol=1e-6)
    for y, x_full in zip(states, full_states, strict=True):
        torch.testing.assert_close(y, x_full @ E, rtol=1e-5, atol=1e-5)
    for a, b in zip(estimates, full_estimates, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(ids, full_ids)


def test_the_projected_prior_and_noise_have_the_law_of_the_projected_full_ones():
    obj = objective()
    projection = obj.state_projection()
    E = obj.embed.weight.detach().double()
    torch.testing.assert_close(projection.noise.double().T @ projection.noise.double(), E.T @ E, rtol=1e-5, atol=1e-7)
    y = obj.prior_projected(4000, 4, torch.device("cpu"), torch.Generator().manual_seed(2)).double().reshape(-1, 32)
    std2 = obj.sigma_max**2 + obj.data_scale**2
    mean = obj.data_mean * E.sum(0)
    spread = float(std2 * torch.linalg.matrix_norm(E.T @ E))
    assert float(torch.linalg.norm(y.mean(0) - mean)) < 0.05 * spread**0.5
    assert float(torch.linalg.matrix_norm(torch.cov(y.T) - std2 * E.T @ E)) < 0.05 * spread


def test_the_prior_is_drawn_projected_for_continuous_samplers_only_where_it_applies():
    from cdlm.samplers.coordinates import initial_state

    cpu = torch.device("cpu")
    assert initial_state(objective(), "continuous", 2, 5, cpu, None).shape == (2, 5, 32)
    assert objective(matched_filter=True).state_projection() is None  # the filter reads every coordinate
    assert initial_state(objective(matched_filter=True), "continuous", 2, 5, cpu, None).shape == (2, 5, V)
    wide = OneHotFlow(tiny_backbone(), 16)  # width 32 >= V: nothing to gain
    assert wide.state_projection() is None and initial_state(wide, "continuous", 2, 5, cpu, None).shape == (2, 5, 16)
    coordinates = StateCoordinates(objective(), torch.zeros(2, 5, V))
    assert coordinates.projected and coordinates.initial.shape == (2, 5, 32)


def test_churn_through_the_projection_samples_and_gamma_zero_is_euler():
    obj = objective()
    x = obj.prior_projected(N, L, torch.device("cpu"), torch.Generator().manual_seed(3))
    ids, states, _, _ = run(obj, "churn", 8, x, gamma=0.3, generator=torch.Generator().manual_seed(4))
    assert ids.shape == (N, L) and states[-1].shape == (N, L, 32) and all(torch.isfinite(s).all() for s in states)
    plain = run(obj, "churn", 8, x, gamma=0.0)[0]
    assert torch.equal(plain, run(obj, "euler", 8, x)[0])

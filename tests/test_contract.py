"""The sampler contract: every continuous sampler runs on every continuous objective it fits (docs/math.md §0).

A sampler with a ``requires`` protocol (``flowmap``: a two-time denoiser) must refuse the objectives without it."""

from __future__ import annotations

import pytest
import torch

from cdlm.objectives.bitstream import Bitstream
from cdlm.objectives.embedding_flow import EmbeddingFlow
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.flow_map import FlowMap
from cdlm.samplers import SAMPLERS, get_sampler
from cdlm.types import ContinuousObjective
from tests.conftest import tiny_backbone
from tests.toys import GaussianToy

V = 11


def fitted_bitstream() -> Bitstream:
    """A tiny bitstream objective whose entropy-rate table has been fitted on synthetic observations (no ramp, so
    its samplers use the learned table)."""
    schedule = {"warmup_batches": 1, "ramp_batches": 0, "fifo_size": 512, "bins": 16}
    objective = Bitstream(tiny_backbone(), V, schedule=schedule)
    sigma = torch.logspace(-2.5, 1.8, 512, dtype=torch.float64)
    objective.schedule.observe(sigma, 0.25 * sigma.square() / (1 + sigma.square()))  # refits at the 1st batch
    assert objective.schedule.fitted and objective.schedule.ramp() == 1.0
    return objective


OBJECTIVES = {
    "toy": lambda: GaussianToy(),
    "flow": lambda: OneHotFlow(tiny_backbone(), V),
    "flow_map": lambda: FlowMap(tiny_backbone(), V),
    "langflow": lambda: EmbeddingFlow(tiny_backbone(), V),
    "bitstream": fitted_bitstream,
    "bitstream_unfitted": lambda: Bitstream(tiny_backbone(), V),  # sampled under its warm-up law
}
CONTINUOUS = sorted(name for name, spec in SAMPLERS.items() if spec.space == "continuous")


def draw(objective, sampler: str, seed: int, **knobs) -> torch.Tensor:
    spec = get_sampler(sampler, objective)
    g = torch.Generator().manual_seed(seed)
    x = objective.prior(2, 8, torch.device("cpu"), generator=g)
    return spec.fn(objective, x, spec.grid(6, torch.device("cpu")), generator=g, **knobs)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("sampler", CONTINUOUS)
def test_every_continuous_sampler_runs_on_every_continuous_objective(name: str, sampler: str) -> None:
    torch.manual_seed(0)
    objective = OBJECTIVES[name]()
    if isinstance(objective, torch.nn.Module):
        objective.eval()
    assert isinstance(objective, ContinuousObjective)
    if not SAMPLERS[sampler].fits(objective):
        with pytest.raises(ValueError, match=f"samplers that fit {type(objective).__name__}"):
            get_sampler(sampler, objective)
        return
    ids = draw(objective, sampler, seed=3)
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < objective.vocab_size
    assert torch.equal(ids, draw(objective, sampler, seed=3))  # seeded


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_churn_without_noise_is_euler_on_every_objective(name: str) -> None:
    torch.manual_seed(0)
    objective = OBJECTIVES[name]()
    if isinstance(objective, torch.nn.Module):
        objective.eval()
    assert torch.equal(draw(objective, "churn", seed=5, gamma=0.0), draw(objective, "euler", seed=5))

"""The ODE bound of the self-conditioned denoiser (``ode_self_condition``, docs/math.md §6 "Self-conditioning"):
the two-pass map ``x -> D(x, sigma, D(x, sigma))`` is integrated with the Jacobian trace of the composition."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from cdlm.objectives.bitstream import Bitstream
from cdlm.objectives.embedding_flow import EmbeddingFlow
from cdlm.objectives.ode_likelihood import bound_denoise, denoise_and_trace
from cdlm.types import SelfConditionedBound
from tests.conftest import tiny_backbone


def langflow(**kwargs) -> EmbeddingFlow:
    torch.manual_seed(0)
    return EmbeddingFlow(tiny_backbone(), vocab_size=5, embed_dim=2, **kwargs)


def bitstream(**kwargs) -> Bitstream:
    torch.manual_seed(0)
    return Bitstream(tiny_backbone(), vocab_size=4, **kwargs)  # 2 bits a token


def trained_looking(objective: nn.Module) -> nn.Module:
    """Random weights wherever the objective starts at zero (the head, LangFlow's self-conditioning map), so that
    the second pass really depends on the first."""
    torch.manual_seed(1)
    for param in objective.parameters():
        if param.dim() > 1 and not param.abs().sum():
            nn.init.normal_(param, std=0.5)
    return objective.eval()


def all_sign_probes(shape: tuple[int, ...]) -> torch.Tensor:
    """Every +-1 vector of ``shape`` ``[B, L, D]``, stacked ``[2^n, B, L, D]``: their mean of ``u^T J u`` is
    ``tr J`` exactly (the off-diagonal terms cancel)."""
    n = torch.Size(shape).numel()
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)))  # [2^n, n]
    return signs.reshape(-1, *shape)


@pytest.mark.parametrize("make", [langflow, bitstream], ids=["langflow", "bitstream"])
def test_the_trace_is_that_of_the_two_pass_composition(make) -> None:
    objective = trained_looking(make(ode_self_condition=True))
    assert isinstance(objective, SelfConditionedBound)
    x = torch.randn(1, 2, 2)  # [B, L, D]: 4 coordinates, 16 sign probes
    sigma = torch.tensor(0.7, dtype=torch.float64)
    s = sigma.float().expand(1)

    def two_pass(y):
        return objective.denoise(y, s, objective.denoise(y, s, None))

    def inner_detached(y):
        return objective.denoise(y, s, objective.denoise(y, s, None).detach())

    exact = torch.autograd.functional.jacobian(two_pass, x).reshape(4, 4).trace().double()
    frozen = torch.autograd.functional.jacobian(inner_detached, x).reshape(4, 4).trace().double()
    assert abs(exact - frozen) > 1e-3  # the path through the self-conditioning input matters here
    x0, div = denoise_and_trace(objective, x.clone(), sigma, all_sign_probes((1, 2, 2)))
    torch.testing.assert_close(x0, two_pass(x).detach())
    torch.testing.assert_close((-div * sigma).mean(0)[0], exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [langflow, bitstream], ids=["langflow", "bitstream"])
def test_the_flag_off_keeps_the_one_pass_denoiser_and_decoder(make) -> None:
    on, off = trained_looking(make(ode_self_condition=True)), trained_looking(make())
    off.load_state_dict(on.state_dict())
    x, s = torch.randn(3, 2, 2), torch.full((3,), 0.4)
    ids = torch.randint(4, (3, 2))
    torch.testing.assert_close(bound_denoise(off, x, s), off.denoise(x, s, None))
    torch.testing.assert_close(bound_denoise(on, x, s), on.denoise(x, s, on.denoise(x, s, None)))
    assert not torch.allclose(on.decoder_nll(x, ids), off.decoder_nll(x, ids))


def test_at_init_langflow_self_conditioning_changes_nothing_in_the_bound() -> None:
    # W_sc is zero at init, so the second pass equals the first: the two bounds agree to float error
    ids = torch.randint(5, (4, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    bounds = []
    for flag in (False, True):
        objective = langflow(ode_steps=4, ode_self_condition=flag).eval()
        torch.manual_seed(3)
        bounds.append(objective.nll(batch).loss.item())
    assert abs(bounds[0] - bounds[1]) < 1e-4, bounds


@pytest.mark.parametrize("make", [langflow, bitstream], ids=["langflow", "bitstream"])
def test_the_flag_must_be_a_boolean(make) -> None:
    with pytest.raises(ValueError, match="ode_self_condition"):
        make(ode_self_condition="yes")

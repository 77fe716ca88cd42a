"""Conditional training by clean spans for FLM, its flow map and CoBit (``cdlm.objectives.clean_spans``; LangFlow's
own tests are in test_embedding_flow.py): the loss scores only the free positions, the network reads the given
positions clean (the same logits for the training spans and for a sampler's prompt), a prompt moves the free
positions' prediction only in a model trained with clean spans, the flow map hands the spans to its teacher, and a
tiny conditionally trained FLM run bounds tokens given their prompt lower than alone."""

from __future__ import annotations

import pytest
import torch

from cdlm.checks import ArgumentError
from cdlm.objectives.bitstream import Bitstream
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.flow_map import FlowMap
from cdlm.prompts import Prompt, given
from tests.conftest import tiny_backbone
from tests.runs import fit, prompted_bounds

V = 11


def flm(rate: float = 1.0, **kwargs) -> OneHotFlow:
    torch.manual_seed(0)
    return OneHotFlow(tiny_backbone(), V, condition_rate=rate, **kwargs)


def cobit(rate: float = 1.0) -> Bitstream:
    torch.manual_seed(0)
    return Bitstream(tiny_backbone(), V, condition_rate=rate)


def flow_map(rate: float = 1.0) -> FlowMap:
    teacher = flm(rate)
    torch.manual_seed(1)
    student = FlowMap(tiny_backbone(), V, condition_rate=rate)
    student.attach_teacher(teacher)
    return student


BUILDERS = {"flow": flm, "flow_matched": lambda rate=1.0: flm(rate, matched_filter=True), "bitstream": cobit}


def stirred(objective):
    """``objective`` with every weight moved off its initialisation (the backbone's zero-initialised gates make each
    position's output independent of the others at initialisation)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return objective


def batch(rows: int = 8, length: int = 10) -> dict:
    torch.manual_seed(3)
    ids = torch.randint(0, V, (rows, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "u": torch.rand(rows, dtype=torch.float64)}


def denoised(objective, x: torch.Tensor, sigma: float) -> torch.Tensor:
    with torch.no_grad():
        return objective.denoise(x, torch.full((x.shape[0],), sigma))


@pytest.mark.parametrize("name", [*BUILDERS, "flow_map"])
def test_the_loss_scores_only_the_free_positions(name: str) -> None:
    objective = stirred(flow_map() if name == "flow_map" else BUILDERS[name]())
    out = objective.train().loss(batch())
    assert 0 < out.mask.sum() < out.mask.numel()  # every row is conditioned at rate 1: some positions given
    assert (out.nll[~out.mask] == 0).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert objective.clean_flag.grad is not None and objective.clean_flag.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [*BUILDERS, "flow_map"])
def test_a_prompt_is_read_clean_only_by_a_model_trained_with_clean_spans(name: str) -> None:
    """The free positions' estimate changes with the prompt's tokens when the prompt is given clean; a model trained
    without clean spans (no flag) ignores ``given`` (the sampler then keeps the prompt by replacement only)."""
    build = flow_map if name == "flow_map" else BUILDERS[name]
    conditional, plain = stirred(build(1.0)).eval(), stirred(build(0.0)).eval()
    assert hasattr(conditional, "clean_flag") and not hasattr(plain, "clean_flag")
    x = conditional.prior(2, 10, torch.device("cpu"), torch.Generator().manual_seed(0))
    fixed = torch.zeros(2, 10, dtype=torch.bool)
    fixed[:, :4] = True
    first, second = torch.zeros(2, 10, dtype=torch.long), torch.full((2, 10), 5)
    sigma = 0.5 * conditional.sigma_max
    with given(Prompt(first, fixed)):
        a = denoised(conditional, x, sigma)
        a_plain = denoised(plain, x, sigma)
    with given(Prompt(second, fixed)):
        b = denoised(conditional, x, sigma)
        b_plain = denoised(plain, x, sigma)
    free = ~fixed
    assert (a - b)[free].abs().max() > 1e-4  # the clean prompt reaches the free positions through attention
    assert torch.equal(a_plain, b_plain) and torch.equal(a_plain, denoised(plain, x, sigma))


def test_flm_reads_the_training_spans_and_a_prompt_the_same_way() -> None:
    """``network(h, ..., clean=spans)`` (training) equals the network under ``given(spans)`` (sampling): the clean
    positions' input is ``E[x]``, flagged, whatever ``h`` holds there."""
    objective = stirred(flm()).eval()
    h, log_sigma = torch.randn(2, 10, 32), torch.full((2,), 1.0)
    ids = torch.randint(0, V, (2, 10))
    fixed = torch.rand(2, 10) < 0.5
    spans = Prompt(ids, fixed)
    with torch.no_grad():
        trained = objective.network(h, log_sigma, None, clean=spans)
        other = objective.network(torch.where(fixed[..., None], torch.randn_like(h), h), log_sigma, None, clean=spans)
        with given(spans):
            sampled = objective.network(h, log_sigma)
    assert torch.equal(trained, sampled) and torch.equal(trained, other)


def test_the_flow_map_student_and_its_teacher_must_agree_on_clean_spans() -> None:
    with pytest.raises(ValueError, match="condition_rate"):
        FlowMap(tiny_backbone(), V, condition_rate=0.5).attach_teacher(flm(0.0))
    with pytest.raises(ArgumentError, match="condition_rate"):
        flm(1.5)
    with pytest.raises(ValueError, match="condition_rate > 0"):
        flm(0.0).conditional_nll(batch(), torch.ones(8, 10, dtype=torch.bool))


def test_a_conditionally_trained_flm_run_keeps_a_prompt_and_bounds_tokens_given_it_lower(tmp_path) -> None:
    """FLM with the matched filter and clean spans (``objective.condition_rate=0.5``): sampling keeps the prompt, and
    the ODE bound of the second half of each validation row given the first half is below its unconditional bound."""
    overrides = ("objective=flow", "objective.matched_filter=true", "sampler=euler", "trainer.max_steps=60")
    module, _, datamodule = fit(
        tmp_path, *overrides, "module.lr=3e-3", "objective.ode_steps=8", "objective.condition_rate=0.5"
    )
    ids, texts = module.generate(2, 16, "euler", steps=8, prompt="KING")
    assert all(t.startswith("KING") for t in texts)
    conditional, unconditional = prompted_bounds(module, datamodule)
    assert conditional < unconditional - 0.1, (conditional, unconditional)

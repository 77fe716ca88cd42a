"""FMLM (Lee et al. 2026, "Flow map language models"): the flow map objective and sampler (docs/math.md §2)."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

import cdlm
from cdlm.checkpoint import read_objective
from cdlm.config import compose, load_group
from cdlm.models.backbone import Backbone
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.flow_map import (
    BOUNDARY,
    DIAGONAL,
    JUMP,
    FlowMap,
    flow_map,
    jump_weight,
    row_kinds,
    time_pairs,
)
from cdlm.objectives.teacher import frozen_inputs
from cdlm.samplers import SAMPLERS, check_knobs, get_sampler
from cdlm.samplers.continuous import euler_step
from cdlm.types import ContinuousObjective, FlowMapObjective, SamplerStep
from tests.conftest import tiny_backbone
from tests.runs import LossRecorder, fit
from tests.toys import GaussianToy

V = 11


def teacher() -> OneHotFlow:
    """A tiny FLM with a non-trivial time conditioning (the adaLN maps are zero at init)."""
    torch.manual_seed(0)
    flow = OneHotFlow(tiny_backbone(), V)
    for name, p in flow.backbone.named_parameters():
        if "ada" in name:
            torch.nn.init.normal_(p, std=0.05)
    return flow.eval()


def student(randomise_jump: bool = False) -> FlowMap:
    """A FlowMap initialised from ``teacher()``; ``randomise_jump`` moves its target-time embedding off zero."""
    torch.manual_seed(1)
    objective = FlowMap(tiny_backbone(), V)
    objective.attach_teacher(teacher())
    if randomise_jump:
        torch.nn.init.normal_(objective.target_embed.mlp[-1].weight, std=0.5)
    return objective.eval()


def sigmas(objective, *ts: float) -> list[torch.Tensor]:
    return [objective.sigma(torch.full((2,), t, dtype=torch.float64)) for t in ts]


def test_flow_map_is_a_continuous_objective_with_a_two_time_denoiser() -> None:
    objective = student()
    assert isinstance(objective, ContinuousObjective) and isinstance(objective, FlowMapObjective)
    assert not isinstance(teacher(), FlowMapObjective)


def test_at_s_equals_t_the_map_is_the_identity_and_the_denoiser_the_teachers() -> None:
    flm, fresh, moved = teacher(), student(), student(randomise_jump=True)
    x = fresh.prior(2, 6, torch.device("cpu"), generator=torch.Generator().manual_seed(0))  # [2, 6, V]
    for t in (0.9, 0.5, 0.1):
        (sigma,) = sigmas(fresh, t)
        reference = flm.denoise(x, sigma)
        for objective in (fresh, moved):  # D_{s,s} is the one-time network whatever the target embedding holds
            torch.testing.assert_close(objective.flow_denoise(x, sigma, sigma), reference)
            torch.testing.assert_close(objective.denoise(x, sigma), reference)
        (later,) = sigmas(fresh, t / 2)  # at init D_{s,t} = D_s for every t; a trained target embedding moves it
        torch.testing.assert_close(fresh.flow_denoise(x, sigma, later), reference)
        assert (moved.flow_denoise(x, sigma, later) - reference).abs().max() > 1e-4
    c = torch.tensor([0.2, 0.7], dtype=torch.float64)
    z, d = torch.randn(2, 6, V), torch.randn(2, 6, V).softmax(-1)
    assert torch.equal(flow_map(z, d, c, c), z)  # X_{s->s}(z) = z


def test_the_flow_map_in_ve_coordinates_is_a_ddim_step() -> None:
    g = torch.Generator().manual_seed(0)
    c_s, c_t = torch.tensor([0.1, 0.5], dtype=torch.float64), torch.tensor([0.4, 0.9], dtype=torch.float64)
    z = torch.randn(2, 3, V, generator=g, dtype=torch.float64)  # native state at s
    d = torch.randn(2, 3, V, generator=g, dtype=torch.float64).softmax(-1)
    sigma_s, sigma_t = (1 - c_s) / c_s, (1 - c_t) / c_t
    ve = euler_step(z / c_s[:, None, None], d, sigma_s, sigma_t)  # what the flowmap sampler does
    torch.testing.assert_close(c_t[:, None, None] * ve, flow_map(z, d, c_s, c_t))


def test_jump_weight_is_the_formula_in_the_unit_interval_and_composes_two_half_jumps() -> None:
    g = torch.Generator().manual_seed(0)
    s, u, t = torch.rand(3, 1000, generator=g, dtype=torch.float64).sort(0).values  # s <= u <= t < 1
    lam = jump_weight(s, u, t)
    torch.testing.assert_close(lam, (1 - t) * (u - s) / ((1 - u) * (t - s)))
    assert (lam >= 0).all() and (lam <= 1).all()
    assert torch.equal(jump_weight(s, s, t), torch.zeros_like(s)) and torch.allclose(
        jump_weight(s, t, t), lam.new_ones(1)
    )
    # X_{u->t}(X_{s->u}(z)) = X_{s->t}(z) with D_{s,t} = lambda D_{s,u} + (1 - lambda) D_{u,t}: the bootstrap target
    z = torch.randn(1000, 2, 5, generator=g, dtype=torch.float64)
    d_su, d_ut = torch.rand(2, 1000, 2, 5, generator=g, dtype=torch.float64)
    two_jumps = flow_map(flow_map(z, d_su, s, u), d_ut, u, t)
    lam = lam[:, None, None]
    torch.testing.assert_close(flow_map(z, lam * d_su + (1 - lam) * d_ut, s, t), two_jumps)


def test_the_off_diagonal_target_is_a_convex_combination_on_the_simplex() -> None:
    objective = student(randomise_jump=True)
    g = torch.Generator().manual_seed(2)
    tau_t, tau_s = torch.rand(2, 6, generator=g, dtype=torch.float64).sort(0).values
    c_s = objective.c_of_t(tau_s).float()[:, None, None]
    onehot = objective.clean_state(torch.randint(V, (6, 7), generator=g))
    z = c_s * onehot + (1 - c_s) * torch.randn(6, 7, V, generator=g)
    with torch.no_grad():
        target = objective.bootstrap_target(z, tau_s, tau_t)  # [6, 7, V]
    assert target.shape == (6, 7, V) and (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(6, 7))


def test_row_kinds_split_the_batch_in_the_specified_fractions() -> None:
    torch.manual_seed(0)
    kind = row_kinds(640, 0.5, 0.5 / 32, "cpu")
    assert [(kind == k).sum().item() for k in (DIAGONAL, BOUNDARY, JUMP)] == [320, 10, 310]
    diagonal = (kind == DIAGONAL).nonzero().squeeze(-1)
    assert (diagonal.diff() == 2).all()  # every other row: the diagonal rows keep batch["u"]'s even spacing
    draws = torch.stack([row_kinds(32, 0.5, 0.5 / 32, "cpu") for _ in range(2000)])  # [2000, 32]
    assert ((draws == DIAGONAL).sum(1) == 16).all()
    assert abs((draws == BOUNDARY).float().mean().item() - 0.5 / 32) < 0.003  # 0.5 boundary rows per 32, on average


def test_time_pairs_per_row_kind() -> None:
    torch.manual_seed(0)
    u = torch.rand(300, dtype=torch.float64)
    kind = torch.tensor([DIAGONAL, JUMP, BOUNDARY] * 100)
    tau_s, tau_t = time_pairs(u, kind)
    diag, jump, boundary = kind == DIAGONAL, kind == JUMP, kind == BOUNDARY
    assert torch.equal(tau_s[diag], u[diag]) and torch.equal(tau_t[diag], u[diag])
    assert (tau_s[boundary] == 1).all() and (tau_t[boundary] == 0).all()
    torch.testing.assert_close(tau_s[jump] - tau_t[jump], u[jump])  # the jump length is u
    assert (tau_t >= 0).all() and (tau_s <= 1).all()
    objective = student()
    assert (objective.c_of_t(tau_s)[~diag] < objective.c_of_t(tau_t)[~diag]).all()  # s < t in c units


def test_loss_trains_the_student_only_and_the_teacher_stays_out_of_the_module() -> None:
    objective = student().train()
    flm = objective.frozen.objective
    ids = torch.randint(V, (8, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 12, dtype=torch.bool)
    mask[1, 8:] = False
    torch.manual_seed(3)
    out = objective.loss({"input_ids": ids, "attention_mask": mask, "u": torch.rand(8)})
    assert out.loss.isfinite() and out.nll.shape == (8, 12) and (out.nll[1, 8:] == 0).all()
    assert out.logs["kl_diagonal"].abs() < 1e-5  # the student starts as its teacher on the diagonal
    out.loss.backward()
    g = objective.target_embed.mlp[-1].weight.grad
    assert g is not None and g.isfinite().all() and g.abs().sum() > 0  # the zero-initialised layer learns
    assert all(p.grad is None and not p.requires_grad for p in flm.parameters())
    assert not any(k.startswith("frozen") for k in objective.state_dict())
    assert {id(p) for p in objective.parameters()}.isdisjoint(id(p) for p in flm.parameters())
    assert copy.deepcopy(objective).frozen.objective is flm  # EMA copies share the teacher, never copy it


def test_loss_needs_a_teacher_and_a_matching_one() -> None:
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="none is attached"):
        FlowMap(tiny_backbone(), V).loss({"input_ids": ids, "attention_mask": ids == 0})
    with pytest.raises(ValueError, match=r"objective.teacher \(the FLM run to distil.*no run at '/no/such/run'"):
        frozen_inputs("cdlm.objectives.flow_map.FlowMap", {"teacher": "/no/such/run"}, read_objective)
    assert frozen_inputs("cdlm.objectives.flow_map.FlowMap", {"teacher": "/no/such/run"}, None) == {
        "teacher_model": None
    }
    with pytest.raises(ValueError, match="soft_cap"):
        FlowMap(tiny_backbone(), V, soft_cap=30.0).attach_teacher(teacher())
    with pytest.raises(ValueError, match="width"):
        FlowMap(tiny_backbone(), V).attach_teacher(OneHotFlow(Backbone(width=64, depth=2, heads=2, cond_width=16), V))
    with pytest.raises(ValueError, match="fraction"):
        FlowMap(tiny_backbone(), V, diagonal_fraction=0.9, boundary_fraction=0.2)


# ---- the sampler ----------------------------------------------------------------------------------------------------
def draw(objective, steps: int, seed: int = 0, **knobs) -> tuple[torch.Tensor, list[SamplerStep]]:
    spec = get_sampler("flowmap", objective)
    g = torch.Generator().manual_seed(seed)
    x = objective.prior(3, 8, torch.device("cpu"), generator=g)
    record: list[SamplerStep] = []
    ids = spec.fn(objective, x, spec.grid(steps, torch.device("cpu")), generator=g, callback=record.append, **knobs)
    return ids, record


@pytest.mark.parametrize("steps", [1, 4])  # 32 jumps: the exact toy below
def test_sampler_gives_valid_seeded_ids_with_nfe_equal_to_the_steps(steps: int) -> None:
    objective = student(randomise_jump=True)
    ids, record = draw(objective, steps, gamma=0.3)
    assert ids.shape == (3, 8) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < V
    assert len(record) == steps and record[-1].nfe == steps and record[-1].t == 0.0
    assert torch.equal(ids, draw(objective, steps, gamma=0.3)[0])


def test_one_jump_ignores_gamma_and_gamma_changes_several() -> None:
    objective = student(randomise_jump=True)
    one = draw(objective, 1)[1][-1].x
    assert torch.equal(one, draw(objective, 1, gamma=0.8)[1][-1].x)
    assert not torch.equal(draw(objective, 4)[1][-1].x, draw(objective, 4, gamma=0.8)[1][-1].x)


def test_sampler_refuses_objectives_without_a_two_time_denoiser_and_bad_knobs() -> None:
    spec = SAMPLERS["flowmap"]
    assert spec.space == "continuous" and spec.requires is FlowMapObjective
    with pytest.raises(ValueError, match=r"flow_map.*samplers that fit OneHotFlow: \['churn', 'euler', 'heun'\]"):
        get_sampler("flowmap", teacher())
    with pytest.raises(ValueError, match="two-time denoiser"):
        spec.fn(teacher(), torch.zeros(1, 2, V), torch.linspace(1, 0, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="1 to 32 jumps"):
        draw(student(), 33)
    with pytest.raises(ValueError, match="gamma"):
        draw(student(), 2, gamma=1.5)
    node = dict(load_group("sampler", "flowmap"))
    assert node.pop("name") == "flowmap" and node == {"steps": 4, "gamma": 0.0}
    check_knobs(spec, {"gamma": 0.0})


class ExactFlowMapToy(GaussianToy):
    """The Gaussian toy with its exact flow map: ``x_t = mu + sqrt((s^2 + sigma_t^2) / (s^2 + sigma_s^2)) (x - mu)``,
    written as the ``D_{s,t}`` that makes it a DDIM step (``x_t = D + r (x - D)``, ``r = sigma_t / sigma_s``)."""

    def flow_denoise(self, x: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        sigma_s, sigma_t = sigma_s.double()[:, None, None], sigma_t.double()[:, None, None]
        x = x.double()
        x_t = self.mu + ((self.s**2 + sigma_t**2) / (self.s**2 + sigma_s**2)).sqrt() * (x - self.mu)
        r = sigma_t / sigma_s
        return torch.where(r < 1, (x_t - r * x) / (1 - r).clamp_min(1e-12), self.denoise(x, sigma_s[:, 0, 0]))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_logits(x).argmax(-1)


def test_with_an_exact_flow_map_every_number_of_jumps_lands_on_the_ode_solution() -> None:
    toy = ExactFlowMapToy()
    assert isinstance(toy, FlowMapObjective)
    x = toy.prior(4, 3, torch.device("cpu"), generator=torch.Generator().manual_seed(0)).double()
    exact = toy.mu + math.sqrt((toy.s**2 + toy.sigma_min**2) / (toy.s**2 + toy.sigma_max**2)) * (x - toy.mu)
    for steps in (1, 3, 32):
        record: list[SamplerStep] = []
        get_sampler("flowmap", toy).fn(
            toy, x, torch.linspace(1, 0, steps + 1, dtype=torch.float64), callback=record.append
        )
        torch.testing.assert_close(record[-1].x, exact, rtol=1e-5, atol=1e-5)


def test_renoising_keeps_the_marginal_of_an_exact_flow_map() -> None:
    toy = ExactFlowMapToy()
    g = torch.Generator().manual_seed(0)
    x = toy.prior(4000, 1, torch.device("cpu"), generator=g)
    record: list[SamplerStep] = []
    toy_ts = torch.linspace(1, 0, 5, dtype=torch.float64)
    SAMPLERS["flowmap"].fn(toy, x, toy_ts, generator=g, callback=record.append, gamma=0.7)
    std = record[-1].x.std().item()  # the data law N(mu, s^2) at sigma_min: std sqrt(s^2 + sigma_min^2) = 2.0
    assert abs(std - math.sqrt(toy.s**2 + toy.sigma_min**2)) < 0.05, std


# ---- end to end -----------------------------------------------------------------------------------------------------
def test_experiment_config_composes() -> None:
    cfg = compose(["experiment=fmlm_distill"])
    assert cfg.objective._target_.endswith("FlowMap") and cfg.objective.teacher == "runs/flow_quickstart/final"
    assert cfg.sampler.name == "flowmap" and cfg.sampler.steps == 4 and cfg.choices.model == "mini"


def test_tiny_distillation_learns_and_its_checkpoint_loads_without_the_teacher(tmp_path) -> None:
    """A 12-step FLM teacher (with the matched filter, so that its denoiser is sharp and long jumps differ from short
    ones), saved to disk; 45 distillation steps through the config path; the KL to the targets falls by thirds."""
    flm_overrides = ("objective=flow", "sampler=euler", "objective.matched_filter=true", "module.lr=3e-3")
    flm, _, _ = fit(tmp_path / "flm", *flm_overrides, "data.batch_size=16")
    flm.save_pretrained(tmp_path / "teacher")
    recorder = LossRecorder()
    overrides = (
        "objective=flow_map",
        f"objective.teacher={tmp_path / 'teacher'}",
        "objective.matched_filter=true",
        "objective.ode_steps=2",
        "sampler=flowmap",
        "data.batch_size=16",
        "trainer.max_steps=45",
        "module.lr=3e-3",
    )
    module, _, _ = fit(tmp_path / "fmlm", *overrides, callbacks=(recorder,))
    losses = [recorder.losses[k] for k in sorted(recorder.losses)]
    thirds = [sum(losses[i : i + 15]) / 15 for i in (0, 15, 30)]
    assert all(math.isfinite(v) and v >= -1e-4 for v in losses) and thirds[2] < 0.8 * thirds[0], thirds
    ids, texts = module.generate(2, 16, "flowmap", steps=2, seed=0)
    assert ids.shape == (2, 16) and len(texts) == 2
    module.save_pretrained(tmp_path / "student")
    assert cdlm.load(tmp_path / "student").objective.frozen.objective is None  # cdlm.load never reads the teacher
    shutil.rmtree(tmp_path / "teacher")
    loaded = cdlm.load(tmp_path / "student")
    assert isinstance(loaded.objective, FlowMap) and loaded.objective.frozen.objective is None
    assert torch.equal(loaded.generate(2, 16, "flowmap", steps=2, seed=0)[0], ids)

"""The context-gain diagnostic (cdlm.metrics.context_gain, docs/math.md §8): the context-free Bayes denoiser is the
exact posterior mean of independent tokens, and the ELBO diffusion terms hit their information-theoretic values:
by I-MMSE the exact denoiser's term over the whole noise range is the entropy of the clean state."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.metrics.context_gain import context_free_denoise, context_gain, noise_grid, prior_kl, token_table

V = 4


class PairLaw:
    """Sequences of 2 equal tokens, the token uniform over ``V``: states ``c_v`` (rows of ``table``), the exact
    posterior mean of the law as ``denoise`` (or the context-free one when ``contextual=False``)."""

    sigma_min, sigma_max = 0.01, 100.0
    data_mean, data_scale = 0.0, 2.0

    def __init__(self, table: torch.Tensor, contextual: bool = True) -> None:
        self.table, self.contextual = table, contextual

    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].float()

    def posterior(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x, c = x.double(), self.table.double()
        evidence = (x @ c.T - 0.5 * c.square().sum(-1)) / sigma.double().pow(2)[:, None, None]  # [B, L, V]
        if self.contextual:  # both positions hold the same token: their evidence adds
            evidence = evidence.sum(1, keepdim=True).expand_as(evidence)
        return evidence.log_softmax(-1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev=None) -> torch.Tensor:
        return (self.posterior(x, sigma).exp() @ self.table.double()).float()

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        sigma = torch.full((x.shape[0],), self.sigma_min, dtype=torch.float64)
        return -self.posterior(x, sigma).gather(-1, ids[..., None])[..., 0]


def pair_batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, V, (n, 1), generator=g)
    ids = first.expand(n, 2).contiguous()
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def states(seed: int = 1) -> torch.Tensor:
    """``V`` clean states of unequal norms in 3 dimensions (the ``||c_v||^2`` term matters)."""
    return torch.randn(V, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_context_free_denoiser_is_bayes_with_the_gaussian_densities():
    table, prior = states(), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    sigma = torch.tensor([0.7, 2.0], dtype=torch.float64)
    got = context_free_denoise(x, sigma, table, prior.log())
    for b in range(2):
        normal = torch.distributions.Normal(table[None], sigma[b])  # [1, V, 3]
        log_w = normal.log_prob(x[b][:, None]).sum(-1) + prior.log()  # [5, V]
        assert torch.allclose(got[b], log_w.softmax(-1) @ table, atol=1e-12)


def test_diffusion_terms_are_the_entropies_and_the_gain_is_what_context_gives():
    """Context-free: the term is H(token) = log V per token; exact pair model: H(pair) / 2 = log V / 2 per token."""
    table = states().float()
    uniform = torch.full((V,), -math.log(V))
    batches = pair_batches(1500)
    out = context_gain(PairLaw(table), uniform, batches, levels=64, generator=torch.Generator().manual_seed(2))
    assert out["tokens"] == 3000
    assert out["diffusion_free"] == pytest.approx(math.log(V), abs=0.05)
    assert out["diffusion_model"] == pytest.approx(math.log(V) / 2, abs=0.05)
    assert out["gain"] == pytest.approx(math.log(V) / 2, abs=0.05)
    assert min(out["removed"]) > -1e-3 and max(out["removed"]) > 0.3
    # the ELBOs: the prior term is ~0 at sigma_max = 100, the decoders ~0 at sigma_min = 0.01
    assert out["elbo_free"] == pytest.approx(math.log(V), abs=0.05)
    assert out["elbo_model"] == pytest.approx(math.log(V) / 2, abs=0.05)
    assert 0 < out["prior"] < 1e-3 and 0 <= out["decoder_model"] < 1e-3 and 0 <= out["decoder_free"] < 1e-3


def test_a_context_free_model_gains_nothing():
    table = states().float()
    uniform = torch.full((V,), -math.log(V))
    out = context_gain(PairLaw(table, contextual=False), uniform, pair_batches(200), levels=16)
    assert abs(out["gain"]) < 1e-5 and out["elbo_model"] == pytest.approx(out["elbo_free"], abs=1e-5)
    assert max(abs(r) for r in out["removed"]) < 1e-4


def test_prior_term_is_the_gaussian_kl():
    model = PairLaw(states().float())
    model.sigma_max, model.data_mean, model.data_scale = 1.5, 0.3, 0.8
    x0 = torch.tensor([[[1.0, -2.0, 0.5]]], dtype=torch.float64)
    q = torch.distributions.Normal(x0, 1.5)
    p = torch.distributions.Normal(torch.full_like(x0, 0.3), math.sqrt(1.5**2 + 0.8**2))
    assert prior_kl(model, x0).item() == pytest.approx(torch.distributions.kl_divergence(q, p).sum().item())


def test_grid_and_table():
    model = PairLaw(states().float())
    grid = noise_grid(model, 5)
    assert grid[0].item() == pytest.approx(0.01) and grid[-1].item() == pytest.approx(100.0)
    assert torch.allclose(grid.log().diff(), torch.full((4,), math.log(100.0) / 2, dtype=torch.float64))
    assert token_table(model, V, torch.device("cpu")).shape == (V, 3)

    class Latent(PairLaw):
        def clean_state(self, ids):  # two tokens per latent position
            return torch.zeros(ids.shape[0], ids.shape[1] // 2, 3)

    with pytest.raises(ValueError, match="one clean state per token"):
        token_table(Latent(states()), V, torch.device("cpu"))


@pytest.mark.parametrize("objective", ["langflow", "flow", "bitstream"])
def test_script_on_a_trained_run(objective, tmp_path, monkeypatch, capsys):
    """``scripts/context_gain.py`` on a tiny run of every token-state objective: the row's terms add up, the
    context-free ELBO is the unigram NLL of the same tokens to within the quadrature, the table names the run."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from tests.runs import fit

    module, _, _ = fit(
        tmp_path / "run",
        f"objective={objective}",
        "sampler=euler",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
    )
    module.save_pretrained(tmp_path / "run" / "final")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("context_gain_script", root / "scripts" / "context_gain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "gain"
    argv = ["context_gain.py", str(tmp_path / "run" / "final"), "--chars", "200", "--levels", "48", "--out", str(out)]
    if objective == "flow":  # an evaluation-time t_min raises sigma_min, where the grid and the decoders start
        argv += ["--objective", "t_min=0.01"]
        module.objective.t_min = 0.01
        expected_sigma_min = module.objective.sigma_min
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    capsys.readouterr()
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["tokens"] >= 200 and len(row["sigma"]) == 48
    if objective == "flow":
        assert row["settings"] == {"t_min": 0.01} and row["sigma"][0] == pytest.approx(expected_sigma_min)
        assert "| run t_min=0.01 |" in out.with_suffix(".md").read_text()
    assert row["elbo_model"] == pytest.approx(row["prior"] + row["diffusion_model"] + row["decoder_model"])
    assert row["gain"] == pytest.approx(row["diffusion_free"] - row["diffusion_model"])
    assert row["elbo_free"] == pytest.approx(row["unigram_nll"], abs=0.1 * row["unigram_nll"])
    assert f"| {row['gain']:+.3f} |" in out.with_suffix(".md").read_text()


def test_evaluation_time_settings_of_the_objective(tiny_run):
    from cdlm.evaluate import set_objective_options

    _, module = tiny_run
    objective = module.objective
    assert set_objective_options(module, []) == {}
    with pytest.raises(ValueError, match="numeric attribute of MaskedDiffusion"):
        set_objective_options(module, ["no_such=1"])
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        set_objective_options(module, ["mask_id"])
    assert isinstance(objective.mask_id, int)

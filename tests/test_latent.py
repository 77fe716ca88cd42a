"""Latent diffusion through a text VAE (docs/math.md §5): the VAE objective, the flow prior on a frozen VAE run, their
bounds, the prior's statistics and sampling."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import cdlm
from cdlm.checkpoint import build_module, read_objective
from cdlm.config import ConfigError, compose, instantiate, to_dict
from cdlm.models.vae import TextVAE
from cdlm.objectives.latent_prior import LatentFlowPrior
from cdlm.objectives.teacher import frozen_inputs
from cdlm.objectives.text_vae import TextVAEObjective
from cdlm.types import ContinuousObjective
from tests.conftest import tiny_backbone
from tests.runs import TINY, LossRecorder, fit

V, L = 13, 16
VAE_SETTINGS = dict(compression=2, latent_dim=8, vae_width=32, vae_depth=1, vae_heads=2)
SIZES = [f"objective.{k}={v}" for k, v in VAE_SETTINGS.items()]
LATENT = ["objective=latent_vae", *SIZES, "sampler=euler"]
PRIOR = ["objective=latent_prior", *SIZES, "sampler=euler"]


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "n_chars": torch.full((n,), 3 * L)}


def test_kl_and_log_posterior_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    q, p = Normal(mean, (0.5 * logvar).exp()), Normal(torch.zeros(()), torch.ones(()))
    torch.testing.assert_close(TextVAE.kl(mean, logvar), kl_divergence(q, p).sum(-1))
    z = torch.randn(3, 5, 7, generator=g)
    torch.testing.assert_close(TextVAE.log_posterior(z, mean, logvar), q.log_prob(z).sum(-1))
    assert torch.all(TextVAE.kl(torch.zeros(2, 7), torch.zeros(2, 7)) == 0)  # q = N(0, I): no KL


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_vae_shapes_and_length_check(r: int) -> None:
    vae = TextVAE(V, width=32, depth=1, heads=2, compression=r, latent_dim=6)
    ids = batch()["input_ids"]
    mean, logvar = vae.encode(ids)
    assert mean.shape == logvar.shape == (4, L // r, 6)
    assert vae.decode(mean).shape == (4, L, V)
    assert vae.latent_padding(torch.ones(4, L)).shape == (4, L // r)
    with pytest.raises(ValueError, match="not a multiple of the VAE's compression"):
        TextVAE(V, width=32, depth=1, heads=2, compression=3).encode(ids)


@pytest.mark.parametrize("r", [1, 2])
def test_encode_decode_reconstructs_a_fixed_batch(r: int) -> None:
    """Trained on one fixed batch (augmentations on), the posterior mean decodes back to every token."""
    torch.manual_seed(0)
    settings = {**VAE_SETTINGS, "compression": r, "latent_dim": 16}
    objective = TextVAEObjective(tiny_backbone(), V, **settings)
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    data = batch(8)
    for _ in range(150):
        optimizer.zero_grad()
        objective.loss(data).loss.backward()
        optimizer.step()
    objective.eval()
    assert objective.nll(data).logs["recon_accuracy"] >= 0.99


def test_vae_bound_is_the_elbo() -> None:
    """Per sequence, the VAE's bound is the decoder CE at one posterior draw plus the closed-form KL."""
    torch.manual_seed(0)
    objective = TextVAEObjective(tiny_backbone(), V, **VAE_SETTINGS).eval()
    data = batch()
    torch.manual_seed(5)
    out = objective.nll(data)
    torch.manual_seed(5)
    mean, logvar = objective.vae.encode(data["input_ids"], data["attention_mask"].bool())
    z = TextVAE.sample(mean, logvar)
    ce = TextVAE.token_nll(objective.vae.decode(z), data["input_ids"]).sum(-1)
    total = ce + TextVAE.kl(mean, logvar).sum(-1)
    torch.testing.assert_close(out.nll.sum(-1), total, rtol=1e-5, atol=1e-4)
    assert out.nll.shape == (4, L) and bool(out.mask.all())


def test_vae_samples_the_standard_normal_prior() -> None:
    """The VAE's denoiser is the exact one of N(0, I) data: Euler from sigma_max lands on unit-variance latents."""
    torch.manual_seed(0)
    module_objective = TextVAEObjective(tiny_backbone(), V, **VAE_SETTINGS)
    assert isinstance(module_objective, ContinuousObjective)
    from cdlm.samplers import get_sampler

    spec = get_sampler("euler", module_objective)
    g = torch.Generator().manual_seed(0)
    x = module_objective.prior(256, L, torch.device("cpu"), generator=g)
    out = spec.fn(module_objective, x, spec.grid(64, torch.device("cpu")), generator=g, callback=None)
    assert out.shape == (256, L)  # decoded ids
    # the final latent state (before decoding) of the exact Gaussian denoiser has unit variance
    ts = spec.grid(64, torch.device("cpu"))
    state = x.double()
    for t, t_next in zip(ts[:-1], ts[1:]):
        s, s_next = module_objective.sigma(t.reshape(1)), module_objective.sigma(t_next.reshape(1))
        x0 = module_objective.denoise(state, s.expand(state.shape[0]))
        state = x0 + (s_next / s) * (state - x0)
    assert abs(state.var().item() - 1.0) < 0.05


def test_vae_run_holds_no_prior() -> None:
    """The VAE objective keeps no prior network: its weights are the VAE's (and the alignment head's) only."""
    objective = TextVAEObjective(tiny_backbone(), V, **VAE_SETTINGS)
    assert all(k.startswith("vae.") for k in objective.state_dict())
    assert not hasattr(objective, "backbone")


def prior_config(tmp_path, *overrides: str):
    return compose([*TINY, f"run_dir={tmp_path / 'prior'}", *PRIOR, *overrides])


def test_prior_needs_a_vae_run_and_refuses_a_mismatched_one(tmp_path) -> None:
    """Building a prior run loads its VAE run: none, a missing path, another objective's run or other sizes are
    clear errors then, before any training."""
    cfg = prior_config(tmp_path, "objective.vae=null")
    tokenizer = instantiate(cfg.data).prepare_tokenizer()
    with pytest.raises(ConfigError, match=r"objective.vae \(the text VAE run to build on.* is required"):
        build_module(to_dict(cfg), tokenizer)
    with pytest.raises(ConfigError, match=r"objective.vae .*there is no run at .*missing"):
        build_module(to_dict(prior_config(tmp_path, f"objective.vae={tmp_path / 'missing'}")), tokenizer)
    masked, _, _ = fit(tmp_path / "masked", "trainer.max_steps=1")
    masked.save_pretrained(tmp_path / "masked" / "final")
    with pytest.raises(ConfigError, match="holds a MaskedDiffusion run, not a TextVAEObjective run"):
        build_module(to_dict(prior_config(tmp_path, f"objective.vae={tmp_path / 'masked' / 'final'}")), tokenizer)
    vae_run, _, _ = fit(tmp_path / "vae", *LATENT, "trainer.max_steps=2")
    vae_run.save_pretrained(tmp_path / "vae" / "final")
    vae = frozen_inputs(
        "cdlm.objectives.latent_prior.LatentFlowPrior", {"vae": str(tmp_path / "vae" / "final")}, read_objective
    )["vae_model"]
    assert isinstance(vae, TextVAEObjective) and not any(p.requires_grad for p in vae.parameters())
    vocab = vae_run.tokenizer.vocab_size
    with pytest.raises(ValueError, match="does not match objective settings"):
        LatentFlowPrior(tiny_backbone(), vocab, vae_model=vae, **{**VAE_SETTINGS, "latent_dim": 4})
    with pytest.raises(ValueError, match="vocab_size"):
        LatentFlowPrior(tiny_backbone(), vocab + 1, vae_model=vae, **VAE_SETTINGS)


def test_statistics_are_the_aggregate_posterior_moments_and_the_bound_waits_for_them() -> None:
    """``fit_statistics``: per-dimension mean and std of the mixture of the posteriors over the real latents; before
    it, the prior's bound and loss refuse to run (no silent ELBO)."""
    torch.manual_seed(0)
    prior = LatentFlowPrior(
        tiny_backbone(), V, vae_model=TextVAEObjective(tiny_backbone(), V, **VAE_SETTINGS), **VAE_SETTINGS
    )
    data = batch(8)
    data["attention_mask"][0, 8:] = 0  # a padded row: its last latents do not count
    for call in (prior.nll, prior.loss):
        with pytest.raises(ValueError, match="statistics are not fitted"):
            call(data)
    prior.fit_statistics(data)
    mean, logvar = prior.vae.encode(data["input_ids"], data["attention_mask"].bool())
    keep = prior.vae.latent_padding(data["attention_mask"].bool())
    draws = torch.cat(
        [torch.distributions.Normal(m, (0.5 * lv).exp()).sample((4000,)) for m, lv in zip(mean[keep], logvar[keep])]
    )
    torch.testing.assert_close(prior.latent_shift, draws.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(prior.latent_scale, draws.std(0), atol=0.02, rtol=0.02)
    assert bool(prior.stats_ready) and math.isfinite(prior.nll(data).loss.item())


@pytest.mark.parametrize("prior_block", [None, 2])
def test_prior_bound_reports_its_hutchinson_standard_error(prior_block) -> None:
    """``ode_probes`` >= 2 (``scripts/bound_table.py --ode-probes``): the bound averages the probes' ODE densities on
    the same posterior draw and logs ``nll_se``; one probe logs none. Eight probes land within a few single-probe
    standard deviations of the one-probe bound (a sum over probes instead of a mean would not)."""
    torch.manual_seed(0)
    vae = TextVAEObjective(tiny_backbone(), V, **VAE_SETTINGS)
    prior = LatentFlowPrior(tiny_backbone(), V, vae_model=vae, prior_block=prior_block, ode_steps=4, **VAE_SETTINGS)
    prior.eval()
    with torch.no_grad():  # a network whose Jacobian is not the zero-initialised output's (trace 0 for every probe)
        for weight in prior.network.parameters():
            weight.add_(0.1 * torch.randn_like(weight))
    data = batch(4)
    prior.fit_statistics(data)
    torch.manual_seed(1)
    one = prior.nll(data)
    assert "nll_se" not in one.logs
    prior.ode_probes = 8
    torch.manual_seed(1)
    eight = prior.nll(data)
    se = eight.logs["nll_se"].item()
    assert 0 < se < 1 and math.isfinite(eight.loss.item())
    assert eight.logs["decoder_nll"] == one.logs["decoder_nll"]  # the same posterior draw
    assert abs(eight.loss.item() - one.loss.item()) < 5 * se * math.sqrt(8)
    with pytest.raises(ValueError, match="ode_probes must be an integer >= 1"):
        LatentFlowPrior(tiny_backbone(), V, ode_probes=0, **VAE_SETTINGS)


def as_legacy(folder, dest, stage: str):
    """A copy of the ``save_pretrained`` folder ``folder`` as the former ``LatentDiffusion`` objective wrote it: one
    class with a ``stage`` key and every setting, a VAE run with an idle prior, a prior's network on the objective."""
    import yaml
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    old = {"stage": stage, "vae": None, "beta": 0.01, "mask_prob": 0.1, "latent_noise": 0.5, "time_mean": 0.0}
    old |= {"time_std": 1.0, "ode_steps": 32, "align": None, "align_weight": 1.0, "align_dim": 384, "prior_block": None}
    config["objective"] = {**old, **config["objective"], "_target_": "cdlm.objectives.latent.LatentDiffusion"}
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    state = load_file(str(dest / "model.safetensors"))
    state = {k.replace("objective.network.", "objective."): v for k, v in state.items()}
    if stage == "vae":  # the idle prior and unfitted statistics of a stage=vae run
        state |= {"objective.in_proj.weight": torch.zeros(3, 2), "objective.stats_ready": torch.tensor(False)}
    save_file(state, str(dest / "model.safetensors"))


def test_former_latent_diffusion_checkpoints_load_as_the_new_objectives(tmp_path) -> None:
    """A ``stage=vae`` / ``stage=prior`` folder of the former single class loads as ``TextVAEObjective`` /
    ``LatentFlowPrior`` with the same weights (``cdlm.objectives.latent_legacy``)."""
    torch.manual_seed(0)
    vae_run, _, _ = fit(tmp_path / "vae", *LATENT, "trainer.max_steps=1")
    vae_run.save_pretrained(tmp_path / "vae" / "final")
    prior_run = build_module(
        to_dict(prior_config(tmp_path, f"objective.vae={tmp_path / 'vae' / 'final'}")), vae_run.tokenizer
    )
    prior_run.save_pretrained(tmp_path / "prior")
    for stage, source, cls in (
        ("vae", tmp_path / "vae" / "final", TextVAEObjective),
        ("prior", tmp_path / "prior", LatentFlowPrior),
    ):
        as_legacy(source, tmp_path / f"legacy_{stage}", stage)
        loaded, fresh = cdlm.load(tmp_path / f"legacy_{stage}"), cdlm.load(source)
        assert type(loaded.objective) is cls
        assert loaded.state_dict().keys() == fresh.state_dict().keys()
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in loaded.state_dict().items())


def fit_prior(tmp_path, *overrides: str) -> tuple[cdlm.DiffusionLM, LossRecorder]:
    """30 steps of a prior on the VAE saved at ``tmp_path / "vae" / "final"``; the run and its losses."""
    recorder = LossRecorder()
    vae = f"objective.vae={tmp_path / 'vae' / 'final'}"
    steps = ("trainer.max_steps=30", "module.lr=3e-3")
    prior, _, _ = fit(tmp_path / "prior", *PRIOR, vae, *steps, *overrides, callbacks=(recorder,))
    return prior, recorder


def _val_batches(module):
    from cdlm.evaluate import run_datamodule

    return run_datamodule(module, max_val_tokens=64).val_dataloader()


def tiny_sentence_encoder(folder) -> str:
    """A randomly initialised 1-layer BERT and a WordPiece tokenizer saved as a local transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "and"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


def test_alignment_to_a_frozen_local_encoder(tmp_path) -> None:
    """The alignment term trains the head and the VAE encoder, never the frozen encoder, which is not saved."""
    encoder = tiny_sentence_encoder(tmp_path / "encoder")
    module, _, _ = fit(
        tmp_path / "vae", *LATENT, f"objective.align={encoder}", "objective.align_dim=16", "trainer.max_steps=3"
    )
    objective = module.objective
    data = next(iter(_val_batches(module)))
    objective.train()
    out = objective.loss(data)
    assert 0.0 <= out.logs["align"].item() <= 4.0  # |a - b|^2 of unit vectors
    out.loss.backward()
    assert objective.align_head.weight.grad is not None and objective.align_head.weight.grad.abs().sum() > 0
    assert objective.vae.to_posterior.weight.grad.abs().sum() > 0
    frozen = objective.aligner.objective
    assert all(not p.requires_grad for p in frozen.parameters())
    assert not any(k.startswith("aligner") for k in objective.state_dict())
    module.save_pretrained(tmp_path / "final")
    shutil.rmtree(tmp_path / "encoder")  # cdlm.load never reads the encoder
    loaded = cdlm.load(tmp_path / "final").objective
    assert loaded.aligner.objective is None
    with pytest.raises(ValueError, match="no encoder is attached"):
        loaded.train().loss(data)
    target = "cdlm.objectives.text_vae.TextVAEObjective"
    with pytest.raises(ConfigError, match=r"objective.align .*neither a packaged name"):
        frozen_inputs(target, {"align": str(tmp_path / "missing")}, read_objective)
    assert frozen_inputs(target, {"align": None}, read_objective) == {"aligner": None}
    with pytest.raises(ValueError, match="set objective.align_dim=16"):
        TextVAEObjective(tiny_backbone(), V, align="x", align_dim=8, tokenizer=module.tokenizer, aligner=frozen)

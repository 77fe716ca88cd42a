"""Latent diffusion through a text VAE (docs/math.md §5): the VAE, the staged objective, the bound and sampling."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import cdlm
from cdlm.models.vae import TextVAE
from cdlm.objectives.latent import LatentDiffusion
from cdlm.types import ContinuousObjective
from tests.conftest import tiny_backbone
from tests.runs import LossRecorder, fit

V, L = 13, 16
VAE_SETTINGS = dict(compression=2, latent_dim=8, vae_width=32, vae_depth=1, vae_heads=2)
LATENT = ["objective=latent", *(f"objective.{k}={v}" for k, v in VAE_SETTINGS.items()), "sampler=euler"]


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
    objective = LatentDiffusion(tiny_backbone(), V, stage="vae", **settings)
    optimizer = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=3e-3)
    data = batch(8)
    for _ in range(150):
        optimizer.zero_grad()
        objective.loss(data).loss.backward()
        optimizer.step()
    objective.eval()
    assert objective.nll(data).logs["recon_accuracy"] >= 0.99


def test_vae_stage_bound_is_the_elbo() -> None:
    """Stage vae: per sequence, the bound is the decoder CE at one posterior draw plus the closed-form KL."""
    torch.manual_seed(0)
    objective = LatentDiffusion(tiny_backbone(), V, stage="vae", **VAE_SETTINGS).eval()
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


def test_vae_stage_samples_the_standard_normal_prior() -> None:
    """Stage vae's denoiser is the exact one of N(0, I) data: Euler from sigma_max lands on unit-variance latents."""
    torch.manual_seed(0)
    module_objective = LatentDiffusion(tiny_backbone(), V, stage="vae", **VAE_SETTINGS)
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


def test_prior_needs_a_vae_and_refuses_a_mismatched_one(tmp_path) -> None:
    with pytest.raises(ValueError, match="set objective.vae"):
        LatentDiffusion(tiny_backbone(), V, stage="prior", **VAE_SETTINGS)
    with pytest.raises(ValueError, match="stage must be one of"):
        LatentDiffusion(tiny_backbone(), V, stage="joint", **VAE_SETTINGS)
    vae_run, _, _ = fit(tmp_path / "vae", *LATENT, "trainer.max_steps=2")
    vae_run.save_pretrained(tmp_path / "vae" / "final")
    vocab = vae_run.tokenizer.vocab_size
    with pytest.raises(ValueError, match="does not match objective settings"):
        LatentDiffusion(
            tiny_backbone(),
            vocab,
            stage="prior",
            vae=str(tmp_path / "vae" / "final"),
            **{**VAE_SETTINGS, "latent_dim": 4},
        )


def test_staged_training_freezes_the_vae_and_keeps_the_statistics(tmp_path) -> None:
    """VAE run -> prior run on it: the prior's loss falls, the VAE weights are untouched, the normalisation
    statistics are fitted and survive save/load, the checkpoint samples and scores without the VAE run."""
    vae_module, _, _ = fit(tmp_path / "vae", *LATENT, "trainer.max_steps=6")
    vae_module.save_pretrained(tmp_path / "vae" / "final")
    vae_weights = {k: v.clone() for k, v in vae_module.objective.vae.state_dict().items()}
    prior, recorder = fit_prior(tmp_path)
    for key, value in prior.objective.vae.state_dict().items():
        torch.testing.assert_close(value, vae_weights[key], rtol=0, atol=0, msg=f"VAE weight {key} changed")
    assert all(not p.requires_grad for p in prior.objective.vae.parameters())
    losses = list(recorder.losses.values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the flow-matching loss falls
    objective = prior.objective
    assert bool(objective.stats_ready)
    assert not torch.allclose(objective.latent_scale, torch.ones_like(objective.latent_scale))

    prior.save_pretrained(tmp_path / "prior" / "final")
    shutil.rmtree(tmp_path / "vae")  # the prior's checkpoint holds the VAE
    loaded = cdlm.load(tmp_path / "prior" / "final")
    for name in ("latent_shift", "latent_scale", "stats_ready"):
        torch.testing.assert_close(getattr(loaded.objective, name), getattr(objective, name))
    ids, texts = loaded.generate(2, 32, sampler="euler", steps=4, seed=0)
    assert ids.shape == (2, 32) and len(texts) == 2
    again, _ = loaded.generate(2, 32, sampler="euler", steps=4, seed=0)
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="not a multiple"):
        loaded.generate(1, 31, sampler="euler", steps=2)
    data = next(iter(_val_batches(loaded)))
    out = loaded.objective.nll(data)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0
    assert set(out.logs) == {"recon_accuracy", "decoder_nll", "latent_nll"}


def fit_prior(tmp_path, *overrides: str) -> tuple[cdlm.DiffusionLM, LossRecorder]:
    """30 steps of a prior on the VAE saved at ``tmp_path / "vae" / "final"``; the run and its losses."""
    recorder = LossRecorder()
    vae = f"objective.vae={tmp_path / 'vae' / 'final'}"
    steps = ("trainer.max_steps=30", "module.lr=3e-3")
    prior, _, _ = fit(
        tmp_path / "prior", *LATENT, "objective.stage=prior", vae, *steps, *overrides, callbacks=(recorder,)
    )
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
    assert cdlm.load(tmp_path / "final").objective.aligner is None
    with pytest.raises(FileNotFoundError, match="neither a packaged name"):
        LatentDiffusion(tiny_backbone(), V, align=str(tmp_path / "missing"), tokenizer=module.tokenizer, **VAE_SETTINGS)

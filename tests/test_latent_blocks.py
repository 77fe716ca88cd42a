"""The block-causal latent prior (Cola DLM; docs/math.md §5): the two-stream mask, what each block may see, the
cached block-by-block sampler against an uncached reference, and a staged run with it."""

from __future__ import annotations

import math

import pytest
import torch

import cdlm
from cdlm.models.backbone import two_stream_mask
from cdlm.models.kv_cache import KVCache
from cdlm.module import DiffusionLM
from cdlm.objectives.latent_blocks import ConditionalPrior, sample_blocks
from cdlm.objectives.latent_network import BlockCausalNetwork
from cdlm.objectives.latent_prior import LatentFlowPrior
from cdlm.prompts import Prompt
from cdlm.samplers import get_sampler
from cdlm.sampling import draw
from tests.conftest import tiny_backbone
from tests.runs import fit
from tests.test_latent import LATENT, VAE_SETTINGS, V, _val_batches, fit_prior

BLOCK, N, D = 3, 8, VAE_SETTINGS["latent_dim"]  # 8 latents in blocks of 3: the last block is short


def block_prior() -> LatentFlowPrior:
    """A block-causal prior with random weights everywhere (adaLN and the output layer start at zero)."""
    torch.manual_seed(0)
    objective = LatentFlowPrior(tiny_backbone(), V, prior_block=BLOCK, **VAE_SETTINGS).eval()
    with torch.no_grad():
        for p in objective.network.parameters():
            p.normal_(0, 0.3)
    return objective


def latents(seed: int) -> torch.Tensor:
    return torch.randn(2, N, D, generator=torch.Generator().manual_seed(seed))


def test_two_stream_mask_structure() -> None:
    """N = 4 in blocks of 2: noisy rows see their own noisy block and earlier clean blocks; clean rows are
    block-causal over the clean copy."""
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(two_stream_mask(4, None, 2, torch.device("cpu"))[0, 0], expected)
    padding = torch.tensor([[True, True, True, False] * 2])
    assert not two_stream_mask(4, padding, 2, torch.device("cpu"))[0, 0, :, [3, 7]].any()  # padded keys hidden


def test_prior_block_sets_the_backbone_and_is_validated() -> None:
    objective = block_prior()
    assert isinstance(objective.network, BlockCausalNetwork) and objective.blockwise
    assert objective.network.backbone.mask_mode == "block_causal" and objective.network.backbone.block_size == BLOCK
    assert not LatentFlowPrior(tiny_backbone(), V, **VAE_SETTINGS).blockwise
    with pytest.raises(ValueError, match="prior_block must be a positive"):
        LatentFlowPrior(tiny_backbone(), V, prior_block=0, **VAE_SETTINGS)
    with pytest.raises(ValueError, match="denoises block by block"):
        objective.denoise(latents(0), torch.ones(2))


def test_each_block_sees_its_own_noisy_block_and_earlier_clean_blocks_only() -> None:
    network = block_prior().network
    z, clean, t = latents(0), latents(1), torch.rand(2, N, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v = network.two_stream(z, t, clean)
        z2 = z.clone()
        z2[:, BLOCK : 2 * BLOCK] += 1.0  # another noisy block 1
        v_noisy = network.two_stream(z2, t, clean)
        clean2 = clean.clone()
        clean2[:, BLOCK : 2 * BLOCK] += 1.0  # another clean block 1
        v_clean = network.two_stream(z, t, clean2)
    torch.testing.assert_close(v_noisy[:, :BLOCK], v[:, :BLOCK])
    torch.testing.assert_close(v_noisy[:, 2 * BLOCK :], v[:, 2 * BLOCK :])
    assert not torch.allclose(v_noisy[:, BLOCK : 2 * BLOCK], v[:, BLOCK : 2 * BLOCK])
    torch.testing.assert_close(v_clean[:, : 2 * BLOCK], v[:, : 2 * BLOCK])  # blocks 0 and 1 ignore clean block 1
    assert not torch.allclose(v_clean[:, 2 * BLOCK :], v[:, 2 * BLOCK :])  # block 2 reads it


def test_cached_velocity_equals_the_two_stream_pass() -> None:
    """Block 2 over a KV cache of the clean blocks 0 and 1 (fed at t = 0) = the two-stream pass's block 2."""
    network = block_prior().network
    z, clean, t = latents(0), latents(1), torch.full((2,), 0.4)
    cache = KVCache(network.backbone.depth, capacity=N)
    with torch.no_grad():
        for start in (0, BLOCK):
            network.extend(cache, clean[:, start : start + BLOCK])
        cached = network.cached(cache, z[:, 2 * BLOCK :], t)
        full = network.two_stream(z, t[:, None].expand(2, N), clean)
    assert cache.offset == 2 * BLOCK  # the scratch pass left the cache as it was
    torch.testing.assert_close(cached, full[:, 2 * BLOCK :], rtol=1e-4, atol=1e-5)
    cache.truncate(1)  # not at a block boundary
    with pytest.raises(ValueError, match="one block at a time"):
        network.backbone(network.in_proj(z[:, :2]), None, cache=cache)


@pytest.mark.parametrize("sampler", ["euler", "churn"])
def test_blockwise_sampling_matches_an_uncached_reference(sampler: str) -> None:
    """``sample_blocks`` (KV cache) = sampling each block on the full two-stream pass given the finished blocks."""
    objective = block_prior()
    spec = get_sampler(sampler, objective)
    ts = spec.grid(6, torch.device("cpu"))
    x = latents(3) * math.sqrt(objective.sigma_max**2 + 1)
    knobs = {"gamma": 0.2} if sampler == "churn" else {}

    def run(view, xb):
        return spec.fn(view, xb, ts, generator=torch.Generator().manual_seed(7), callback=None, **knobs)

    with torch.no_grad():
        cached = sample_blocks(objective.network, objective, run, x)  # latents, not argmax ids
        done = torch.zeros_like(x)
        for start in range(0, N, BLOCK):
            width = min(BLOCK, N - start)

            def velocity(z, t, start=start, width=width):
                full = x.float().clone()
                full[:, start : start + width] = z
                v = objective.network.two_stream(full, t[:, None].expand(2, N), done)
                return v[:, start : start + width]

            done[:, start : start + width] = run(ConditionalPrior(objective, velocity), x[:, start : start + width])
    torch.testing.assert_close(cached.float(), done, rtol=1e-4, atol=1e-4)


def test_a_prefix_prompt_gives_the_first_clean_blocks_and_the_rest_is_drawn_given_them() -> None:
    """A prompt of one complete block (3 latents = 6 tokens) plus one token: the first block is the prompt's encoded
    latents (never sampled), the later blocks equal the uncached reference given those latents, the ids keep the
    whole prompt, and a different prompt moves the later blocks."""
    objective = block_prior()
    spec = get_sampler("euler", objective)
    ts = spec.grid(4, torch.device("cpu"))
    x = latents(5) * math.sqrt(objective.sigma_max**2 + 1)
    length = N * VAE_SETTINGS["compression"]  # 16 tokens

    def run(view, xb):
        return spec.fn(view, xb, ts, generator=torch.Generator().manual_seed(7), callback=None)

    def prompt(first: int) -> Prompt:
        ids = torch.zeros(2, length, dtype=torch.long)
        ids[:, :7] = torch.arange(first, first + 7) % V
        return Prompt(ids, torch.arange(length)[None].expand(2, -1) < 7)

    with torch.no_grad():
        given = objective.prompt_blocks(prompt(1))
        assert given[1].tolist() == [1, 1]  # 7 tokens: one complete block of 6, one token past it
        cached = sample_blocks(objective.network, objective, run, x, given)
        done = torch.zeros_like(x)
        done[:, :BLOCK] = given[0][:, :BLOCK]
        for start in range(BLOCK, N, BLOCK):
            width = min(BLOCK, N - start)

            def velocity(z, t, start=start, width=width):
                full = x.float().clone()
                full[:, start : start + width] = z
                return objective.network.two_stream(full, t[:, None].expand(2, N), done)[:, start : start + width]

            done[:, start : start + width] = run(ConditionalPrior(objective, velocity), x[:, start : start + width])
        other = sample_blocks(objective.network, objective, run, x, objective.prompt_blocks(prompt(4)))
    torch.testing.assert_close(cached.float(), done, rtol=1e-4, atol=1e-4)
    assert (other[:, BLOCK:] - cached[:, BLOCK:]).abs().max() > 1e-3  # the prompt conditions the later blocks
    samples = draw(DiffusionLM(objective), 2, length, "euler", 4, 0, prompt=prompt(1), dtype=None)
    assert torch.equal(samples.ids[:, :7], prompt(1).ids[:, :7])
    assert samples.nfe == 2 * 4  # 3 blocks, the first one given: 2 sampled blocks of 4 Euler steps
    with pytest.raises(ValueError, match="prefix prompt only"):
        suffix = (torch.arange(length) >= 8)[None].expand(2, -1)  # a suffix: fixed positions after free ones
        objective.prompt_blocks(Prompt(torch.zeros(2, length, dtype=torch.long), suffix))


def test_staged_run_with_a_block_causal_prior(tmp_path) -> None:
    """VAE -> block-causal prior: the loss falls, the run saves, loads (still block-causal), samples
    deterministically block by block and scores a finite bound."""
    vae, _, _ = fit(tmp_path / "vae", *LATENT, "trainer.max_steps=4")
    vae.save_pretrained(tmp_path / "vae" / "final")
    prior, recorder = fit_prior(tmp_path, "objective.prior_block=4")
    losses = list(recorder.losses.values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    prior.save_pretrained(tmp_path / "prior" / "final")
    loaded = cdlm.load(tmp_path / "prior" / "final")
    assert loaded.objective.blockwise and loaded.objective.network.backbone.mask_mode == "block_causal"
    ids, texts = loaded.generate(2, 32, sampler="heun", steps=3, seed=0)
    again, _ = loaded.generate(2, 32, sampler="heun", steps=3, seed=0)
    assert ids.shape == (2, 32) and len(texts) == 2 and torch.equal(ids, again)
    samples = draw(loaded, 2, 32, "heun", 3, seed=0)  # 16 latents = 4 blocks of 4, Heun: 5 evaluations per block
    assert samples.nfe == 4 * 5 and torch.equal(samples.ids, ids)
    out = loaded.objective.nll(next(iter(_val_batches(loaded))))
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0


def test_the_block_causal_prior_declares_its_attention_in_the_run_config():
    """The composed config says what runs: ``model.mask_mode: block_causal`` and the block size come from
    ``objective.prior_block``; a model config that sets another mask is refused before anything is built."""
    from cdlm.config import ConfigError, compose

    cfg = compose(["experiment=latent_prior", "objective.prior_block=16"])
    assert cfg.model.mask_mode == "block_causal" and cfg.model.block_size == 16
    assert compose(["experiment=latent_prior"]).model.get("mask_mode") is None
    with pytest.raises(ConfigError, match="attends with mask_mode='block_causal'"):
        compose(["experiment=latent_prior", "objective.prior_block=16", "model.mask_mode=bidirectional"])

"""Autoregressive reference: exact NLL, causality, KV-cached decoding, sampler registry, a tiny end-to-end run."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import cdlm
from cdlm.checkpoint import checked_config
from cdlm.config import ConfigError, compose, to_dict
from cdlm.models.kv_cache import KVCache
from cdlm.objectives.autoregressive import Autoregressive
from cdlm.samplers import SAMPLERS, get_sampler
from cdlm.samplers.autoregressive import position_grid, top_k_filter
from cdlm.types import SamplerStep
from tests.conftest import tiny_backbone
from tests.runs import LossRecorder, fit

V = 11


@pytest.fixture
def ar_objective() -> Autoregressive:
    torch.manual_seed(0)
    return Autoregressive(tiny_backbone(), vocab_size=V).eval()


def test_constructor_declares_causal_attention_and_refuses_another():
    obj = Autoregressive(tiny_backbone(), vocab_size=V)  # mask_mode unset: the objective's declared mode
    assert Autoregressive.attention == "causal" and obj.backbone.mask_mode == "causal" and obj.backbone.mask_mode_given
    assert obj.bos_id == V and obj.space == "autoregressive"
    assert obj.embed.num_embeddings == V + 1 and obj.head.out_features == V
    assert Autoregressive(tiny_backbone(mask_mode="causal"), vocab_size=V).backbone.mask_mode == "causal"
    bidirectional = tiny_backbone(mask_mode="bidirectional")
    with pytest.raises(ValueError, match="needs mask_mode='causal' attention, but .* built with mask_mode='bidir"):
        Autoregressive(bidirectional, vocab_size=V)
    assert bidirectional.mask_mode == "bidirectional"  # never switched behind the config's back


def test_config_writes_the_declared_attention_into_the_model_config():
    cfg = compose(["objective=autoregressive", "sampler=autoregressive", "model=tiny"])
    assert cfg.model.mask_mode == "causal"  # what runs is what config.yaml and checkpoints say
    assert "mask_mode" not in compose(["model=tiny"]).model  # objectives that declare nothing leave it alone
    with pytest.raises(ConfigError, match="attends with mask_mode='causal', but model.mask_mode='bidirectional'"):
        compose(["objective=autoregressive", "sampler=autoregressive", "model.mask_mode=bidirectional"])
    stored = to_dict(cfg)
    del stored["model"]["mask_mode"]  # a config saved before the mode was written down
    assert checked_config(stored, Path("old.ckpt"))["model"]["mask_mode"] == "causal"


def test_loss_and_nll_shapes_and_padding(ar_objective):
    x = torch.randint(0, V, (3, 16))
    pad = torch.ones_like(x, dtype=torch.bool)
    pad[1, 10:] = False
    batch = {"input_ids": x, "attention_mask": pad}
    out = ar_objective.nll(batch)
    assert out.nll.shape == (3, 16) and out.loss.ndim == 0 and torch.equal(out.mask, pad)
    assert (out.nll[1, 10:] == 0).all() and (out.nll[pad] > 0).all()
    torch.testing.assert_close(out.loss, out.nll.sum() / pad.sum())
    alone = ar_objective.nll({"input_ids": x[1:2, :10], "attention_mask": pad[1:2, :10]})  # causal: padding is inert
    torch.testing.assert_close(out.nll[1, :10], alone.nll[0], atol=1e-5, rtol=0)
    loss = ar_objective.loss(batch)
    torch.testing.assert_close(loss.loss, out.loss)
    loss.loss.backward()
    assert all(p.grad is not None for p in ar_objective.head.parameters())


@torch.no_grad()
def test_nll_equals_manual_chain_rule(ar_objective):
    x = torch.randint(0, V, (2, 12))
    out = ar_objective.nll({"input_ids": x, "attention_mask": torch.ones_like(x, dtype=torch.bool)})
    manual = torch.stack(  # -log p(x^l | x^{<l}), one prefix at a time through the sampling view
        [-F.log_softmax(ar_objective.next_logits(x[:, :i]), -1).gather(1, x[:, i : i + 1])[:, 0] for i in range(12)],
        dim=1,
    )
    torch.testing.assert_close(out.nll, manual, atol=1e-5, rtol=1e-5)
    assert out.nll[:, 0].allclose(-F.log_softmax(ar_objective.next_logits(x[:, :0]), -1).gather(1, x[:, :1])[:, 0])


@torch.no_grad()
@pytest.mark.parametrize("j", [0, 5, 11])
def test_model_is_causal(ar_objective, j):
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, j] = (x[:, j] + 1) % V
    a, b = ar_objective.logits(x), ar_objective.logits(y)  # [B, L, V]; row l predicts x^l from x^{<l}
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], atol=1e-6, rtol=0)
    if j + 1 < 12:
        assert not torch.allclose(a[:, j + 1 :], b[:, j + 1 :], atol=1e-4)


@torch.no_grad()
def test_incremental_decoding_matches_full_forward(ar_objective):
    x = torch.randint(0, V, (2, 20))
    full = ar_objective.logits(x)  # [B, L, V]
    cache = ar_objective.new_cache(capacity=4)  # smaller than needed: the buffers must grow
    steps = torch.stack([ar_objective.next_logits(x[:, :i], cache) for i in range(20)], dim=1)
    assert cache.offset == 20
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    inputs = ar_objective.embed(ar_objective.shift(x))  # chunks of several new positions at once
    cache, chunks, start = KVCache(ar_objective.backbone.depth, 20), [], 0
    for size in (3, 1, 7, 9):
        chunks.append(ar_objective.backbone(inputs[:, start : start + size], cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(chunks, 1), ar_objective.backbone(inputs), atol=1e-5, rtol=0)


def test_cache_refuses_non_causal_or_padded_backbone(ar_objective):
    h = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="causal"):
        ar_objective.backbone(h, padding=torch.ones(1, 4, dtype=torch.bool), cache=KVCache(2))
    with pytest.raises(ValueError, match="causal"):
        tiny_backbone()(h, cache=KVCache(2))


def draw(obj, seed: int, **knobs) -> tuple[torch.Tensor, list[SamplerStep]]:
    spec = get_sampler("autoregressive", obj)
    steps: list[SamplerStep] = []
    g = torch.Generator().manual_seed(seed)
    x = spec.fn(
        obj, obj.prior(3, 24, torch.device("cpu")), spec.grid(1, "cpu"), generator=g, callback=steps.append, **knobs
    )
    return x, steps


@pytest.mark.parametrize("knobs", [{"temperature": 0.0}, {"temperature": 1.0}, {"top_p": 0.9}, {"top_k": 5}], ids=str)
def test_cached_sampling_equals_uncached(ar_objective, knobs):
    cached, steps_c = draw(ar_objective, 0, cache=True, **knobs)
    uncached, steps_u = draw(ar_objective, 0, cache=False, **knobs)
    assert torch.equal(cached, uncached)
    assert cached.shape == (3, 24) and cached.min() >= 0 and cached.max() < V
    assert [s.nfe for s in steps_c] == list(range(1, 25)) and steps_u[-1].nfe == 24 and steps_c[-1].t == 0.0


def test_sampling_is_seeded_and_greedy_is_argmax(ar_objective):
    a, _ = draw(ar_objective, 1)
    b, _ = draw(ar_objective, 1)
    c, _ = draw(ar_objective, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy, _ = draw(ar_objective, 3, temperature=0.0)
    with torch.no_grad():
        logits = ar_objective.logits(greedy)  # teacher-forced on its own output: every token is the argmax
    assert torch.equal(logits.argmax(-1), greedy)
    assert torch.equal(greedy, draw(ar_objective, 4, temperature=0.0)[0])  # no randomness at temperature 0


def test_top_k_filter_and_grid():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(
        top_k_filter(probs, 2), torch.tensor([[0.0, 0.5, 0.0, 0.25]], dtype=torch.float64) / 0.75
    )
    assert torch.equal(top_k_filter(probs, 0), probs) and torch.equal(top_k_filter(probs, 9), probs)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(probs, -1)
    assert torch.equal(position_grid(3), torch.arange(4))


def test_registry_refuses_space_mismatch(ar_objective, masked_objective):
    assert SAMPLERS["autoregressive"].space == "autoregressive"
    assert set(SAMPLERS["autoregressive"].knobs()) == {"temperature", "top_p", "top_k", "cache"}
    with pytest.raises(ValueError, match="works on autoregressive objectives"):
        get_sampler("autoregressive", masked_objective)
    with pytest.raises(ValueError, match="works on discrete objectives"):
        get_sampler("ancestral", ar_objective)


def test_tiny_run_loss_falls_and_generates(tmp_path):
    recorder = LossRecorder()
    overrides = ("objective=autoregressive", "sampler=autoregressive", "trainer.max_steps=40", "module.lr=3e-3")
    module, _, _ = fit(tmp_path, *overrides, callbacks=(recorder,))
    losses = [recorder.losses[s] for s in sorted(recorder.losses)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.85 * sum(losses[:8]) / 8
    assert module.objective.backbone.mask_mode == "causal" and module.config["model"]["mask_mode"] == "causal"
    folder = module.save_pretrained(tmp_path / "pretrained")
    assert cdlm.load(folder).objective.backbone.mask_mode == "causal"
    stored = yaml.safe_load((folder / "config.yaml").read_text())
    del stored["model"]["mask_mode"]  # an AR model saved before the mode was written into its config
    (folder / "config.yaml").write_text(yaml.safe_dump(stored))
    assert cdlm.load(folder).objective.backbone.mask_mode == "causal"
    ids, texts = module.generate(2, 32, "autoregressive", steps=1, seed=0)
    assert ids.shape == (2, 32) and len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


@torch.no_grad()
def test_conditional_nll_is_the_exact_nll_of_the_tokens_after_the_prompt(ar_objective):
    x = torch.randint(0, 11, (2, 6))
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, 5:] = False
    fixed = torch.tensor([[True, True, False, False, False, False], [True, False, False, False, False, False]])
    batch = {"input_ids": x, "attention_mask": padding}
    full, given = ar_objective.eval().nll(batch), ar_objective.conditional_nll(batch, fixed)
    free = padding & ~fixed
    assert torch.equal(given.mask, free) and torch.equal(given.nll, full.nll * free)
    assert float(given.nll.sum()) < float(full.nll.sum())  # the prompt's own tokens are not charged
    with pytest.raises(ValueError, match="fixed positions before the free ones"):
        ar_objective.conditional_nll(batch, torch.tensor([[False, True, False, False, False, False]] * 2))


@torch.no_grad()
def test_rows_stop_at_their_eos_and_the_batch_ends_when_every_row_has(ar_objective):
    """``stop_id``: the same draws as the full-length run up to each row's first stop token (the generator is read
    in the same order), padding after it once cut, and no network call after the last row has stopped; a suffix
    fixed after the stop keeps its tokens."""
    from cdlm.prompts import canvas_prompt, cut_at_eos

    stop, pad = 3, 0
    ar_objective.head.bias[stop] = 2.0  # p(stop) about 0.4 per position: every row stops within a few tokens
    spec, L = get_sampler("autoregressive", ar_objective), 24
    calls = []

    def run(**kwargs) -> torch.Tensor:
        calls.append(0)
        counter = lambda step: calls.__setitem__(-1, step.nfe)  # noqa: E731
        g = torch.Generator().manual_seed(0)
        return spec.fn(
            ar_objective, ar_objective.prior(4, L, "cpu"), spec.grid(L), generator=g, callback=counter, **kwargs
        )

    full, early = run(), run(stop_id=stop)
    assert torch.equal(cut_at_eos(early, stop, pad), cut_at_eos(full, stop, pad))
    assert calls[0] == L and calls[1] < L / 2, calls  # the early run stopped once every row had drawn the stop
    suffix = canvas_prompt([[[], L - 2, [5, 6]]], 4, L)
    kept = run(fixed=suffix, stop_id=stop)
    assert (kept[:, -2:] == torch.tensor([5, 6])).all() and (
        cut_at_eos(kept, stop, pad, suffix.fixed)[:, -2:] == torch.tensor([5, 6])
    ).all()

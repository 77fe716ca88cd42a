"""Fast-dLLM's block caches, dKV-Cache and FreeCache's window (``sample_parallel(kv_cache=prefix|dual|delayed|
window)``, ``cdlm.models.span_cache``): the cached pass is the uncached one where nothing changed, it recovers most of
a change in its span, and the sampler keeps its contracts (prompts, NFE, exactness where every pass is a full one)."""

from __future__ import annotations

import pytest
import torch

from cdlm.models.backbone import Backbone
from cdlm.models.span_cache import SpanCache
from cdlm.module import DiffusionLM
from cdlm.objectives.masked import MaskedDiffusion
from cdlm.prompts import prefix_prompt
from cdlm.samplers.parallel import sample_parallel, stale_positions

V, L = 40, 24


@pytest.fixture(scope="module")
def model() -> MaskedDiffusion:
    torch.manual_seed(0)
    objective = MaskedDiffusion(Backbone(64, 2, 4, cond_width=32), V).eval()
    with torch.no_grad():  # away from the zero-initialised gates, so that attention matters
        for p in objective.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return objective


def test_a_full_pass_fills_the_cache_and_an_unchanged_span_reads_the_same(model):
    z, t = torch.randint(0, V + 1, (2, L)), torch.rand(2)
    with torch.no_grad():
        full = model.denoise(z, t)
        cache = SpanCache()
        torch.testing.assert_close(model.denoise_span(z, t, cache, slice(0, L)), full)
        assert not cache.empty
        torch.testing.assert_close(model.denoise_span(z, t, cache, slice(8, 16)), full[:, 8:16])  # dual
        torch.testing.assert_close(model.denoise_span(z, t, cache, slice(8, L)), full[:, 8:])  # prefix
        index = torch.tensor([[3, 0, 17], [22, 5, 6]])  # per-row positions (delayed)
        rows = full.gather(1, index[..., None].expand(-1, -1, V))
        torch.testing.assert_close(model.denoise_positions(z, t, cache, index), rows)


def test_a_changed_span_is_approximated_far_better_than_by_stale_scores(model):
    z, t = torch.randint(0, V, (2, L)), torch.rand(2)
    z[:, 8:16] = model.mask_id
    changed = z.clone()
    changed[:, 8:12] = torch.randint(0, V, (2, 4))  # four tokens of the block committed since the full pass
    with torch.no_grad():
        stale = model.denoise(z, t)[:, 12:16]  # the block's still-masked rows, never rescored
        truth = model.denoise(changed, t)[:, 12:16]
        for span in (slice(8, 16), slice(8, L)):
            cache = SpanCache()
            model.denoise_span(z, t, cache, slice(0, L))
            cached = model.denoise_span(changed, t, cache, span)[:, 4:8]
            error, baseline = (cached - truth).abs().max(), (stale - truth).abs().max()
            assert error < 0.2 * baseline, (span, float(error), float(baseline))
        cache = SpanCache()
        model.denoise_span(z, t, cache, slice(0, L))
        index = torch.arange(8, 16).expand(2, 8)  # the block's positions, fed per row (delayed)
        cached = model.denoise_positions(changed, t, cache, index)[:, 4:8]
        assert (cached - truth).abs().max() < 0.2 * (stale - truth).abs().max()


def test_a_window_pass_is_the_network_on_the_cut_sequence(model):
    z, t = torch.randint(0, V + 1, (2, L)), torch.rand(2)
    z[:, 8:16] = model.mask_id  # the fed block is masked: its rows are the network's, not SUBS's one-hots
    with torch.no_grad():
        cache = SpanCache()
        model.denoise_span(z, t, cache, slice(0, L))  # the full pass that fills the cache
        cache.limit = 16  # positions 16.. left out of attention
        torch.testing.assert_close(model.denoise_span(z, t, cache, slice(0, 16)), model.denoise(z[:, :16], t))
        with pytest.raises(ValueError, match="past the attention limit"):
            model.denoise_span(z, t, cache, slice(8, 20))
        cut = model.denoise_span(z, t, cache, slice(8, 16))  # keys 0..8 stored with the whole sequence in view
        assert not torch.allclose(cut, model.denoise(z, t)[:, 8:16], atol=1e-4)  # the window changes the scores
    assert SpanCache().limit is None


def test_window_cache_feeds_the_block_its_window_and_the_finished_block_once_more(model):
    spans = []
    original = model.denoise_span

    def record(z, t, cache, span):
        spans.append((span.start, span.stop, cache.limit))
        return original(z, t, cache, span)

    model.denoise_span = record
    try:
        x = sample(model, model.prior(2, L, torch.device("cpu")), 12, block_length=8, kv_cache="window", kv_window=4)
    finally:
        del model.denoise_span
    assert not (x == model.mask_id).any()
    full, b0, b1, b2 = (0, L, None), (0, 12, 12), (8, 20, 20), (16, 24, 24)
    assert spans == [full, b0, b0, b0, (0, 20, 20), b1, b1, b1, (8, 24, 24), b2, b2, b2]


def sample(model, x, steps, **knobs):
    return sample_parallel(
        model, x, torch.linspace(1, 0, steps + 1), generator=torch.Generator().manual_seed(3), **knobs
    )


@pytest.mark.parametrize("kv_cache", ["prefix", "dual", "delayed"])
def test_exact_where_every_pass_is_a_full_one(model, kv_cache):
    x = model.prior(3, L, torch.device("cpu"))
    if kv_cache == "delayed":  # a full pass every pass
        assert torch.equal(sample(model, x, 12, kv_cache="delayed", kv_refresh=1), sample(model, x, 12))
        return
    # one step per block: every pass is a block's first, a full pass
    assert torch.equal(sample(model, x, 3, block_length=8, kv_cache=kv_cache), sample(model, x, 3, block_length=8))
    # prefix over one block: the span is the whole sequence
    if kv_cache == "prefix":
        assert torch.equal(sample(model, x, 12, kv_cache="prefix"), sample(model, x, 12))


@pytest.mark.parametrize("kv_cache", ["prefix", "dual", "delayed", "window"])
@pytest.mark.parametrize("selector", ["topk", "threshold", "rcr"])
def test_cached_sampling_keeps_prompts_and_counts_passes(model, kv_cache, selector):
    prefixes = [[1], [2, 3, 4], [], [5] * 10]
    ids, _ = DiffusionLM(model).generate(
        4,
        L,
        "parallel",
        12,
        seed=0,
        dtype=None,
        prompt=prefix_prompt(prefixes, 4, L),
        block_length=8,
        kv_cache=kv_cache,
        selector=selector,
    )
    assert ids.shape == (4, L) and not (ids == model.mask_id).any()
    for row, prefix in enumerate(prefixes):
        assert ids[row, : len(prefix)].tolist() == prefix
    nfe = {}
    for cache in ("none", kv_cache):
        steps = []
        sample(
            model,
            model.prior(4, L, torch.device("cpu")),
            12,
            block_length=8,
            selector=selector,
            kv_cache=cache,
            callback=steps.append,
        )
        nfe[cache] = steps[-1].nfe
    assert 3 <= nfe[kv_cache] <= 12 and (selector == "threshold" or nfe[kv_cache] == nfe["none"] == 12), nfe


def test_kv_cache_needs_a_masked_objective_and_a_known_name(model):
    x = model.prior(1, L, torch.device("cpu"))
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        sample(model, x, 4, kv_cache="suffix")

    class NoSpans:
        mask_id, vocab_size, time_conditioning, schedule = model.mask_id, V, False, model.schedule

        def denoise(self, z, t):
            return model.denoise(z, t)

    with pytest.raises(ValueError, match="needs an objective with denoise_span"):
        sample(NoSpans(), x, 4, kv_cache="dual")


def test_a_span_cache_refuses_a_partial_first_pass_and_a_causal_backbone():
    cache = SpanCache().feed(4)
    with pytest.raises(ValueError, match="first pass feeds the whole sequence"):
        cache.update(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    causal = Backbone(32, 1, 2, cond_width=16, mask_mode="causal")
    with pytest.raises(ValueError, match="SpanCache needs mask_mode 'bidirectional'"):
        causal(torch.zeros(1, 4, 32), cache=SpanCache())


def test_stale_positions_are_the_masked_and_the_newly_decoded_first():
    mask = 9
    x = torch.tensor([[mask, 1, 2, mask], [4, 5, 6, 7]])
    keyed = torch.tensor([[mask, mask, 2, mask], [4, 5, 6, 7]])
    index = stale_positions(x, keyed, mask)
    assert index.tolist() == [[0, 1, 3], [0, 1, 2]]  # row 1 needs nothing: padded with its first positions


def test_delayed_cache_feeds_fewer_positions_as_decoding_proceeds(model):
    fed = []
    original = model.denoise_positions

    def record(z, t, cache, index):
        fed.append(index.shape[1])
        return original(z, t, cache, index)

    model.denoise_positions = record
    try:
        sample(model, model.prior(2, L, torch.device("cpu")), 12, kv_cache="delayed", kv_refresh=4)
    finally:
        del model.denoise_positions
    assert len(fed) == 9 and fed[-1] < fed[0] <= L and min(fed) < L // 2  # 12 passes: 3 full, 9 partial

"""Memory at GPT-2's vocabulary: no dense int64 / float64 ``[B, L, V]`` copies; the chunked paths equal the old ones.

The memory tests run at ``V = 50,257`` with a tiny network (width 32, depth 1, L 64, B 2) and measure the peak bytes of
the tensors each path creates (``tests.memory.peak_tensor_bytes``), per batch row, in units of one float32 logits row
block ``L * V * 4``. The chunks are cut to 8 rows (positions), so that, as at the field's batch sizes, a chunk is a
small part of the batch and the figures are the per-row cost (docs/runs.md, "Memory"). Before the chunked paths the
same measurements gave 3.27 (masked loss, every position masked), 2.25 (masked bound), 10.25 (ancestral), 5.75
(parallel) and 23.5 (FLM's ODE bound) units per row.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cdlm.objectives.chunked_ce as chunked_ce
import cdlm.samplers.categorical as categorical
from cdlm.evaluate import score_batches
from cdlm.models.backbone import Backbone
from cdlm.module import DiffusionLM
from cdlm.objectives.chunked_ce import chunked_cross_entropy
from cdlm.objectives.flow import OneHotFlow, ScaleFloat32
from cdlm.objectives.masked import NEG_INF, MaskedDiffusion
from cdlm.objectives.ode_likelihood import ode_nll
from cdlm.samplers import get_sampler
from cdlm.samplers.grids import linear_grid
from tests.conftest import tiny_backbone
from tests.memory import peak_tensor_bytes

V, L, B = 50_257, 64, 2
UNIT = L * V * 4  # bytes of one row's float32 [L, V] logits


# ---- the measuring helper ----------------------------------------------------------------------------------------
def test_peak_tensor_bytes_counts_live_storages():
    def allocate():
        a = torch.zeros(1000, dtype=torch.float64)  # 8,000 bytes
        b = torch.ones(500)  # 2,000: the peak, 10,000, is here
        del a
        c = b[100:].clone()  # 1,600 more, after a was freed
        view = c[:10]  # a view: no new storage
        return b, c, view

    peak, _ = peak_tensor_bytes(allocate)
    assert peak == 10_000

    def saved_for_backward():
        x = torch.randn(1000, requires_grad=True)  # 4,000
        y = x.exp()  # 4,000, saved by exp's backward
        z = y.sum()
        del y  # the graph still holds it
        return z, torch.empty(1000)  # 4,000 more: y is still alive

    peak, _ = peak_tensor_bytes(saved_for_backward)
    assert peak == 12_000 + 4  # x, y, the new tensor and z's 4 bytes


# ---- the chunked paths equal the dense ones ----------------------------------------------------------------------
def old_nelbo(obj: MaskedDiffusion, x: torch.Tensor, padding: torch.Tensor, t: torch.Tensor):
    """The NELBO as it was: boolean indexing of the masked positions (a host sync and dynamic shapes)."""
    alpha = obj.schedule.alpha(t)[:, None]
    masked = (torch.rand(x.shape, device=x.device) < 1 - alpha) & padding
    z = torch.where(masked, obj.mask_id, x)
    h = obj.hidden(z, t, padding)[masked]
    ce = F.cross_entropy(obj.head(h).float(), x[masked], reduction="none")
    nll = torch.zeros(x.shape, device=x.device)
    nll[masked] = ce * obj.schedule.weight(t.float())[:, None].expand_as(x)[masked]
    return nll, masked


@pytest.mark.parametrize("vocab, chunk_elements", [(11, chunked_ce.CHUNK_ELEMENTS), (300, 7 * 300)])
def test_masked_nelbo_equals_the_indexed_formula(monkeypatch, vocab, chunk_elements):
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    obj = MaskedDiffusion(tiny_backbone(), vocab_size=vocab)
    x = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(x, dtype=torch.bool)
    padding[1, 15:] = False
    x[1, 15:] = vocab  # a pad id that is no class of the head (here [MASK]'s): no loss is taken there
    t = torch.tensor([0.2, 0.6, 0.95])
    torch.manual_seed(5)
    nll, masked = obj.nelbo(x, padding, t)
    nll.sum().backward()
    grads = [p.grad.clone() for p in obj.parameters()]
    obj.zero_grad()
    torch.manual_seed(5)
    old, old_masked = old_nelbo(obj, x, padding, t)
    old.sum().backward()
    assert torch.equal(masked, old_masked)  # the same mask draw
    torch.testing.assert_close(nll, old, rtol=0, atol=1e-6)
    for new, ref in zip(grads, [p.grad for p in obj.parameters()]):
        torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 13, (10,))
    ref = F.cross_entropy(head(hidden), targets, reduction="none")
    (ref * torch.arange(10)).sum().backward()
    ref_grads = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad, head.weight.grad = None, None
    ce = chunked_cross_entropy(hidden, head, targets, chunk=3)
    (ce * torch.arange(10)).sum().backward()
    torch.testing.assert_close(ce, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_grads[0])
    torch.testing.assert_close(head.weight.grad, ref_grads[1])
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, head, targets, chunk=4), ref, rtol=0, atol=1e-6)


def test_denoise_log_one_hot_without_a_dense_one_hot(masked_objective):
    z = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(0))
    z[:, ::3] = masked_objective.mask_id
    t = torch.full((3,), 0.5)
    with torch.no_grad():
        logp = masked_objective.logits(z, t).float().log_softmax(-1)
        carry = F.one_hot(z.clamp_max(10), 11).float()
        old = torch.where((z != masked_objective.mask_id)[..., None], torch.where(carry.bool(), 0.0, NEG_INF), logp)
        assert torch.equal(masked_objective.denoise(z, t), old)


@pytest.mark.parametrize(
    "name, knobs",
    [
        ("ancestral", {"top_p": 0.8}),
        ("ancestral", {"final": "sample", "remask_eta": 0.3}),
        ("parallel", {"temperature": 0.7, "top_p": 0.9}),
    ],
)
def test_chunked_draws_equal_whole_draws(masked_objective, monkeypatch, name, knobs):
    """On the CPU the generator fills chunks in the order it fills the whole array: the samples do not change."""
    spec = get_sampler(name, masked_objective)

    def run():
        x = masked_objective.prior(4, 24, torch.device("cpu"))
        return spec.fn(masked_objective, x, linear_grid(8), generator=torch.Generator().manual_seed(3), **knobs)

    whole = run()
    monkeypatch.setattr(categorical, "DRAW_ELEMENTS", 2 * 12)  # two rows per chunk
    assert torch.equal(run(), whole)


def test_scale_float32_equals_the_float64_product_and_its_gradient(monkeypatch):
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 3 * 17)
    c = torch.tensor([0.3, 0.71], dtype=torch.float64)
    x = torch.randn(2, 5, 17, requires_grad=True)
    g = torch.randn(2, 5, 17)
    ref = (c[:, None, None] * x.to(torch.float64)).float()
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    z = ScaleFloat32.apply(c, x)
    (grad,) = torch.autograd.grad(z, x, g)
    assert torch.equal(z, ref) and torch.equal(grad, ref_grad)


def test_ode_nll_in_row_chunks_is_one_solve_per_chunk():
    torch.manual_seed(0)
    flow = OneHotFlow(Backbone(width=16, depth=1, heads=2, cond_width=8), vocab_size=20, ode_steps=2).eval()
    ids = torch.randint(0, 20, (5, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0
    chunked = ode_nll(flow, {"input_ids": ids, "attention_mask": mask}, 2, torch.Generator().manual_seed(7), rows=2)
    g = torch.Generator().manual_seed(7)
    parts = [ode_nll(flow, {"input_ids": i, "attention_mask": m}, 2, g) for i, m in zip(ids.split(2), mask.split(2))]
    torch.testing.assert_close(chunked.nll, torch.cat([p.nll for p in parts]), rtol=1e-6, atol=1e-6)
    with torch.inference_mode():  # as Lightning validates
        again = ode_nll(flow, {"input_ids": ids, "attention_mask": mask}, 2, torch.Generator().manual_seed(7), rows=2)
    assert torch.equal(again.nll, chunked.nll)


# ---- peak memory per row at V = 50,257 ---------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 8 * V)
    monkeypatch.setattr(categorical, "DRAW_ELEMENTS", 8 * (V + 1))


@pytest.fixture(scope="module")
def large_masked() -> MaskedDiffusion:
    torch.manual_seed(0)
    return MaskedDiffusion(Backbone(width=32, depth=1, heads=2, max_len=L, cond_width=16), vocab_size=V)


def large_batch() -> dict:
    x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    ones = torch.ones(B)  # u = 1: t = 1, every position masked (the largest loss)
    return {"input_ids": x, "attention_mask": torch.ones_like(x, dtype=torch.bool), "u": ones, "n_chars": 4 * ones}


def units_per_row(fn) -> float:
    peak, _ = peak_tensor_bytes(fn)
    return peak / B / UNIT


def test_masked_training_loss_memory(large_masked, small_chunks):
    large_masked.train()

    def step():
        large_masked.loss(large_batch()).loss.backward()

    per_row = units_per_row(step)
    large_masked.zero_grad(set_to_none=True)
    print(f"masked loss forward + backward: {per_row:.2f} x L*V*4 per row")
    assert per_row < 1.5  # measured 1.03, half of it the [V, D] gradients of the head and the embedding


def test_masked_bound_memory(large_masked, small_chunks):
    module = DiffusionLM(large_masked.eval())
    per_row = units_per_row(lambda: score_batches(module, [large_batch()], dtype=None).compute())
    print(f"masked bound (evaluation): {per_row:.2f} x L*V*4 per row")
    assert per_row < 1.0  # measured 0.38


@pytest.mark.parametrize("name", ["ancestral", "parallel"])
def test_masked_sampling_memory(large_masked, small_chunks, name):
    spec, obj = get_sampler(name, large_masked), large_masked.eval()

    def sample():
        x = obj.prior(B, L, torch.device("cpu"))
        return spec.fn(obj, x, linear_grid(2), generator=torch.Generator().manual_seed(0))

    per_row = units_per_row(sample)
    print(f"{name} sampling: {per_row:.2f} x L*V*4 per row")
    assert per_row < 3.0  # measured 2.25: log p_theta, the denoiser's log-softmax and the masked rows' copy


def test_flm_ode_bound_memory(small_chunks):
    torch.manual_seed(0)
    flow = OneHotFlow(Backbone(width=32, depth=1, heads=2, max_len=L, cond_width=16), vocab_size=V, ode_steps=1)
    batch = large_batch()
    with torch.no_grad():
        per_row = units_per_row(lambda: flow.eval().nll(batch).loss)
    print(f"FLM ODE bound: {per_row:.2f} x L*V*4 per row")
    assert per_row < 11.0  # measured 9.75: float64 state and drift, the denoiser's forward and backward

"""The attention kernels (cdlm/models/attend.py): the matmul path computes SDPA's attention for every mask the
backbone builds, the backbone gives the same outputs and gradients through either, and ``auto`` picks as documented."""

import pytest
import torch
import torch.nn.functional as F

from cdlm.checks import ArgumentError
from cdlm.models.attend import MATMUL_MAX_SCORES, attend, matmul_attention, use_matmul
from cdlm.models.backbone import Backbone, attention_mask, cached_causal_mask


def qkv(batch: int = 2, heads: int = 3, length: int = 12, keys: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    keys = keys or length
    q = torch.randn(batch, heads, length, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, keys, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "block_causal"])
@pytest.mark.parametrize("padded", [False, True])
def test_matmul_attention_is_sdpa_under_every_mask_the_backbone_builds(mode, padded):
    q, k, v = qkv()
    padding = torch.ones(2, 12, dtype=torch.bool)
    if padded:
        padding[1, 9:] = False
    mask = attention_mask(mode, 12, padding, 4, q.device)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(matmul_attention(q, k, v, mask, False, 0.0), expected, rtol=1e-12, atol=1e-12)


def test_matmul_attention_takes_the_causal_flag_and_a_cache_mask():
    q, k, v = qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(matmul_attention(q, k, v, None, True, 0.0), expected, rtol=1e-12, atol=1e-12)
    q, k, v = qkv(length=3, keys=10)  # 3 new queries after 7 cached keys
    mask = cached_causal_mask(7, 3, q.device)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(matmul_attention(q, k, v, mask, False, 0.0), expected, rtol=1e-12, atol=1e-12)


def test_auto_attends_by_matmuls_on_a_cpu_for_short_sequences_only():
    short, long = torch.zeros(1, 1, 512, 8), torch.zeros(1, 1, 513, 8)
    assert 512 * 512 == MATMUL_MAX_SCORES
    assert use_matmul("auto", short, short) and not use_matmul("auto", long, long)
    assert use_matmul("matmul", long, long) and not use_matmul("sdpa", short, short)
    q, k, v = qkv()
    torch.testing.assert_close(attend(q, k, v, kernel="auto"), attend(q, k, v, kernel="sdpa"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_the_backbone_gives_the_same_outputs_and_gradients_through_either_kernel(mode):
    torch.manual_seed(0)
    models = [Backbone(32, 2, 2, max_len=64, mask_mode=mode, attention=k) for k in ("sdpa", "matmul")]
    for p in models[0].parameters():  # adaLN-Zero starts with closed gates: open them so attention matters
        torch.nn.init.normal_(p, std=0.2)
    models[1].load_state_dict(models[0].state_dict())
    h = torch.randn(2, 10, 32)
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[0, 7:] = False
    outs = []
    for model in models:
        out = model(h, None, padding)
        out[padding].square().sum().backward()
        outs.append((out[padding], [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_unknown_kernel_is_refused_with_the_valid_ones():
    with pytest.raises(ArgumentError, match=r"attention='flash' is not one of \('auto', 'sdpa', 'matmul'\)"):
        Backbone(32, 1, 2, attention="flash")

"""Scaled dot-product attention through the kernel that is fastest where it runs (docs/runs.md, "Speed").

``F.scaled_dot_product_attention`` picks flash or memory-efficient kernels on GPUs, which never hold the
``[B, H, L, S]`` scores. On a CPU, at the short lengths CPU runs train at, its flash kernel is about half as fast as
three plain ops (two batched matmuls and a softmax): one tiled pass per query block costs more than the small
scores matrix it avoids. ``attend`` therefore computes attention by matmuls on the CPU while the scores stay small
(``MATMUL_MAX_SCORES`` per head), and through SDPA everywhere else. Both compute
``softmax(q k^T / sqrt(d) + mask) v`` (Vaswani et al., 2017); the matmul path takes the softmax in at least float32,
as SDPA's kernels do, and rounds the scores to the inputs' dtype as the eager attention of ``transformers`` does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AttentionKernel = Literal["auto", "sdpa", "matmul"]
ATTENTION_KERNELS = ("auto", "sdpa", "matmul")
MATMUL_MAX_SCORES = 512 * 512  # query x key entries per head up to which a CPU attends by matmuls (L = S = 512)


def use_matmul(kernel: AttentionKernel, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``attend`` takes the matmul path: always for ``matmul``, never for ``sdpa``; for ``auto`` on a CPU
    when the scores of one head have at most ``MATMUL_MAX_SCORES`` entries."""
    if kernel != "auto":
        return kernel == "matmul"
    return q.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= MATMUL_MAX_SCORES


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout_p: float
) -> torch.Tensor:
    """Attention by two batched matmuls and a float32 softmax: ``q`` ``[B, H, L, Dh]``, ``k, v`` ``[B, H, S, Dh]``,
    ``mask`` boolean, broadcastable to ``[B, H, L, S]`` (True = may attend); returns ``[B, H, L, Dh]``.

    ``is_causal`` (with no ``mask``) lets query ``i`` see keys ``0 .. i``, as SDPA's flag does. A query that may see
    no key gets a uniform average instead of SDPA's NaN (such rows are padding, which no loss reads).
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, H, L, S]
    if is_causal and mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # float32 for bf16 / fp16 scores
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(v.dtype)  # [B, H, L, S]
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    kernel: AttentionKernel = "auto",
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(Dh) + mask) v`` ``[B, H, L, Dh]`` through ``kernel`` (``auto``: matmuls for short
    sequences on a CPU, SDPA elsewhere); arguments as ``F.scaled_dot_product_attention``'s, ``mask`` boolean."""
    if use_matmul(kernel, q, k):
        return matmul_attention(q, k, v, mask, is_causal, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)

"""Cross-entropy through an output head, chunk by chunk, so the ``[N, V]`` logits never exist whole.

At GPT-2's ``V = 50,257`` the float32 logits of a batch of ``B x L`` positions are ``4 V`` bytes per position, and
autograd keeps as much again (the log-softmax) for the backward. ``chunked_cross_entropy`` runs
``head -> float32 -> cross-entropy`` on ``chunk`` rows at a time under ``torch.utils.checkpoint``: the forward keeps
only the per-row losses, and the backward recomputes one chunk's logits at a time. Each row's loss is what
``F.cross_entropy(head(hidden).float(), targets, reduction="none")`` gives for it; the price is one more head matmul
per row in the backward. Used by the masked objective's NELBO (docs/math.md §1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 2**27  # logits per chunk: 512 MiB in float32, 2,670 rows at V = 50,257 (GPU GEMMs stay efficient)


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: ``CHUNK_ELEMENTS // V``, at least 1."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def head_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log softmax(head(hidden))[targets]`` ``[n]`` in float32 for ``hidden`` ``[n, D]`` and ``targets`` ``[n]``."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def chunked_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Per-row cross-entropy ``[N]`` (float32) of ``head(hidden)`` ``[N, V]`` against ``targets`` ``[N]`` (int64).

    ``hidden`` ``[N, D]``; ``head`` maps ``D -> V`` (``out_features`` gives ``V``); ``chunk``: rows per chunk (default
    ``chunk_rows(V)``). With gradients on and more than one chunk, each chunk is checkpointed, so the backward holds
    one chunk's logits at a time; a batch that fits one chunk (the quickstart's) runs plainly, without the recompute;
    without gradients (evaluation), the chunks simply run one after another. Shapes are static: no host sync.
    """
    chunk = chunk or chunk_rows(head.out_features)
    if hidden.shape[0] <= chunk:  # one chunk: its logits are small enough to keep, so no recompute
        return head_cross_entropy(head, hidden, targets)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    losses = [
        checkpoint(head_cross_entropy, head, h, y, use_reentrant=False) if grads else head_cross_entropy(head, h, y)
        for h, y in zip(hidden.split(chunk), targets.split(chunk))
    ]
    return torch.cat(losses)  # [N]

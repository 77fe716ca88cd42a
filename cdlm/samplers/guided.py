"""Guided Diffusion's AR-verified unmasking (Hu et al., 2025, "Accelerating Diffusion Language Model Inference via
Efficient KV Caching and Guided Diffusion"), docs/math.md §7: a small autoregressive model checks the masked
diffusion model's proposals left to right, like speculative decoding's verifier, and a step commits the longest
run of proposals it agrees with.
"""

from __future__ import annotations

import torch

from cdlm.samplers.categorical import draw_tokens


def guided_commit(verified: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Positions to commit ``[B, L]``: each row's candidates left of its first candidate the verifier rejects
    (``verified`` ``[B, L]`` false), and always its leftmost candidate, so that every step makes progress."""
    rejected = candidates & ~verified  # [B, L]
    before = rejected.long().cumsum(1) == 0  # [B, L]: left of the first rejected candidate
    first = candidates & (candidates.long().cumsum(1) == 1)
    return (candidates & before) | first


def guided_step(
    x: torch.Tensor,
    logp: torch.Tensor,
    candidates: torch.Tensor,
    guide: torch.nn.Module,
    mask_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One step on a copy of ``x`` ``[B, L]``: every masked position proposes a token from ``logp`` ``[B, L, V]``
    (at ``temperature`` / ``top_p``); the autoregressive ``guide`` reads the proposed sequence and verifies a
    proposal where its own greedy next token is the proposal; ``guided_commit`` decides which ``candidates``
    ``[B, L]`` keep theirs. The others stay masked."""
    masked = x == mask_id  # [B, L]: the guide reads the whole proposed sequence, never a [MASK]
    proposal = x.clone()
    proposal[masked] = draw_tokens(logp[masked], temperature, top_p, generator)
    verified = guide.logits(proposal).argmax(-1) == proposal  # [B, L]
    return torch.where(guided_commit(verified, candidates), proposal, x)

"""Token ids as analog bits (Chen et al. 2023, "Analog bits"; CoBit), docs/math.md §4.

A vocabulary of ``V`` ids is written with ``k = ceil(log2 V)`` bits, most significant first, so one backbone
position carries one token's ``k`` bits (a bit patch). The ``2^k - V`` codes above ``V - 1`` are invalid ids; a
decoded invalid code is repaired to the most probable valid id under the independent-bit estimate and counted.
"""

from __future__ import annotations

import math

import torch


def bit_width(vocab_size: int) -> int:
    """``k = ceil(log2 V)``, at least 1 (7 for the 84-character corpus plus specials, 12 for ``V = 4096``)."""
    if vocab_size < 2:
        raise ValueError(f"a vocabulary needs at least 2 ids, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


def ids_to_bits(ids: torch.Tensor, k: int) -> torch.Tensor:
    """``[...]`` integer ids -> ``[..., k]`` float32 bits in {0, 1}, most significant bit first."""
    shifts = torch.arange(k - 1, -1, -1, device=ids.device)  # [k]
    return ((ids[..., None] >> shifts) & 1).float()


def bits_to_ids(bits: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` bits (any values; ``> 0.5`` is a one) -> ``[...]`` int64 codes in ``[0, 2^k)``."""
    k = bits.shape[-1]
    weights = 2 ** torch.arange(k - 1, -1, -1, device=bits.device)  # [k]
    return ((bits > 0.5).long() * weights).sum(-1)


def code_table(vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bits of every valid id, ``[V, k]`` float32."""
    return ids_to_bits(torch.arange(vocab_size, device=device), bit_width(vocab_size))


def decode_bits(probs: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[...]`` from per-bit probabilities ``probs`` ``[..., k]`` of a one, and the invalid mask ``[...]``.

    Each bit is thresholded at 1/2; a code ``>= V`` is replaced by ``argmax_v sum_j log p(b_j(v))``, the most
    probable valid id under the independent-bit model (exact: one ``[N, k] x [k, V]`` product over the invalid
    positions only).
    """
    ids = bits_to_ids(probs)  # [...]
    invalid = ids >= vocab_size  # [...]
    if invalid.any():
        p = probs[invalid].double().clamp(1e-12, 1 - 1e-12)  # [N, k]
        table = code_table(vocab_size, probs.device).double()  # [V, k]
        scores = p.log() @ table.T + (1 - p).log() @ (1 - table).T  # [N, V] log p(v) under independent bits
        ids = ids.clone()
        ids[invalid] = scores.argmax(-1)
    return ids, invalid

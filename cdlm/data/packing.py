"""Pure tensor functions turning tokenized documents into fixed-length rows with attention masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_documents(docs: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    """Concatenate documents into one int64 stream with ``eos_id`` after every document. Returns ``[N]``."""
    pieces = [torch.tensor([*doc, eos_id], dtype=torch.long) for doc in docs]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)


def cut_blocks(stream: torch.Tensor, seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``stream`` ``[N]`` into non-overlapping ``[ceil(N / seq_len), seq_len]`` blocks.

    The last partial block is filled with ``pad_id``; the mask is True on real tokens only.
    """
    n = stream.numel()
    n_blocks = -(-n // seq_len)
    ids = torch.full((n_blocks * seq_len,), pad_id, dtype=torch.long)  # [NB * L]
    ids[:n] = stream
    mask = torch.zeros(n_blocks * seq_len, dtype=torch.bool)  # [NB * L]
    mask[:n] = True
    return ids.view(n_blocks, seq_len), mask.view(n_blocks, seq_len)


def chunk_documents(
    docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per row (no packing): each document plus EOS, split into consecutive ``seq_len`` chunks.

    Every chunk is padded on the right with ``pad_id``; returns ids and mask ``[R, seq_len]``.
    """
    rows = [cut_blocks(pack_documents([doc], eos_id), seq_len, pad_id) for doc in docs]
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.bool)
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def row_chars(ids: torch.Tensor, mask: torch.Tensor, char_lengths: torch.Tensor) -> torch.Tensor:
    """Characters per row: ``char_lengths`` summed over the real tokens of ``ids`` ``[R, L]``. Returns ``[R]``."""
    return (char_lengths[ids] * mask).sum(dim=-1)  # [R]


def cap_tokens(ids: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first rows up to (and including) the one where the count of real tokens reaches ``max_tokens``."""
    cumulative = mask.sum(dim=-1).cumsum(0)  # [R]
    n_rows = int((cumulative < max_tokens).sum()) + 1
    return ids[:n_rows], mask[:n_rows]

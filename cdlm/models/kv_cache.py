"""Key/value cache for incremental decoding with a causal backbone (Vaswani et al., 2017, sec. 3.2.3).

A causal transformer's keys and values at a position depend only on the tokens up to it, so they are computed
once and reused: decoding step ``t`` feeds only the new positions and attends over every cached key.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values ``[B, H, T, Dh]`` of the ``offset`` positions decoded so far.

    Buffers are allocated on first use with room for ``capacity`` positions (and doubled if exceeded), so a step
    writes in place instead of concatenating. ``Backbone.forward`` calls ``update`` once per layer, then
    ``advance`` by the number of new positions.

    Args:
        depth: number of attention layers.
        capacity: positions to reserve up front (e.g. the sequence length to decode).
    """

    def __init__(self, depth: int, capacity: int = 256) -> None:
        if depth < 1 or capacity < 1:
            raise ValueError(f"KVCache needs depth >= 1 and capacity >= 1, got depth={depth}, capacity={capacity}")
        self.depth, self.capacity, self.offset = depth, capacity, 0
        self.keys: list[torch.Tensor | None] = [None] * depth  # [B, H, capacity, Dh] each
        self.values: list[torch.Tensor | None] = [None] * depth

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``k, v`` ``[B, H, n, Dh]`` at ``offset``; return all of them ``[B, H, offset + n, Dh]``."""
        end = self.offset + k.shape[2]
        if self.keys[layer] is None:
            shape = (*k.shape[:2], max(self.capacity, end), k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        elif end > self.keys[layer].shape[2]:
            size = max(end, 2 * self.keys[layer].shape[2])
            self.keys[layer], self.values[layer] = _grow(self.keys[layer], size), _grow(self.values[layer], size)
        self.keys[layer][:, :, self.offset : end] = k
        self.values[layer][:, :, self.offset : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # [B, H, offset + n, Dh]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as cached (after every layer has been updated)."""
        self.offset += n

    def truncate(self, offset: int) -> None:
        """Forget every position from ``offset`` on: the next update writes there (a scratch pass over a block)."""
        if not 0 <= offset <= self.offset:
            raise ValueError(f"cannot truncate a cache of {self.offset} positions to {offset}")
        self.offset = offset


def _grow(buffer: torch.Tensor, size: int) -> torch.Tensor:
    """Copy ``buffer`` ``[B, H, T, Dh]`` into a new one with room for ``size`` positions."""
    grown = buffer.new_empty(*buffer.shape[:2], size, buffer.shape[3])
    grown[:, :, : buffer.shape[2]] = buffer
    return grown

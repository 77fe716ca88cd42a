"""Approximate key/value cache for a bidirectional backbone: Fast-dLLM's prefix and dual caches and dKV-Cache's
delayed cache (docs/sampling.md, "Block caches").

A bidirectional transformer's keys and values at a position depend on every token, so no cache is exact once any
token changes. Fast-dLLM (Wu et al., 2025) observes that in semi-autoregressive decoding they change little within
a block: one full pass at the start of a block stores every position's keys and values, and the block's steps
then feed only a span of positions (the block and what follows it: the *prefix* cache; the block alone: the *dual*
cache), whose queries attend to the stored keys elsewhere and to their own fresh ones. dKV-Cache (Ma et al., 2025)
feeds, per row, any set of positions instead (``feed_positions``): the masked ones and those decoded since their
keys were stored. FreeCache (Hu et al., 2025, "Accelerating Diffusion Language Model Inference via Efficient KV
Caching and Guided Diffusion") also drops the positions after a window from attention (``limit``): the fed span's
queries see the stored keys before it, their own, and nothing after ``limit``.
"""

from __future__ import annotations

import torch


class SpanCache:
    """Per-layer keys and values ``[B, H, L, Dh]`` of a whole sequence, rewritten a span at a time.

    ``Backbone.forward`` with this cache feeds the positions ``offset .. offset + n`` (rotary angles from
    ``offset``); each layer writes their fresh keys and values over the stored ones (``update``) and attends over
    all ``L``. The first pass must feed the whole sequence (``offset = 0``, ``n = L``): that pass is the uncached
    forward, and it fills the cache.

    ``empty`` tells whether the next pass must be a full one. ``limit`` (None = the whole sequence): attention sees
    only the positions before it, so a span that ends there runs as on the sequence cut at ``limit``.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.limit: int | None = None  # positions >= limit are left out of attention (FreeCache's window)
        self.index: torch.Tensor | None = None  # [B, m]: per-row positions fed (feed_positions), or a span
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [B, H, L, Dh]
        self.values: dict[int, torch.Tensor] = {}

    @property
    def empty(self) -> bool:
        """Whether nothing is stored yet (the next pass must feed the whole sequence)."""
        return not self.keys

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the span's ``k, v`` ``[B, H, n, Dh]`` at ``offset``; return the whole sequence's ``[B, H, L, Dh]``
        (the positions before ``limit`` only, when it is set)."""
        if layer not in self.keys:
            if self.offset != 0 or self.limit is not None:
                raise ValueError(f"a SpanCache's first pass feeds the whole sequence, not positions from {self.offset}")
            self.keys[layer], self.values[layer] = k.clone(), v.clone()
            return k, v
        if self.index is not None:  # per-row positions: scatter along the sequence
            where = self.index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, H, m, Dh]
            self.keys[layer].scatter_(2, where, k)
            self.values[layer].scatter_(2, where, v)
            return self.keys[layer], self.values[layer]
        end = self.offset + k.shape[2]
        if end > self.keys[layer].shape[2]:
            raise ValueError(f"span {self.offset}..{end} is past the cached sequence of {self.keys[layer].shape[2]}")
        self.keys[layer][:, :, self.offset : end] = k
        self.values[layer][:, :, self.offset : end] = v
        if self.limit is not None:
            if not end <= self.limit:
                raise ValueError(f"span {self.offset}..{end} reaches past the attention limit {self.limit}")
            return self.keys[layer][:, :, : self.limit], self.values[layer][:, :, : self.limit]
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        """Nothing to do: the span's positions were written in place (the ``KVCache`` interface)."""

    def feed(self, offset: int) -> SpanCache:
        """Set the first position of the next span; returns the cache."""
        if offset < 0:
            raise ValueError(f"a span starts at a position >= 0, got {offset}")
        self.offset, self.index = offset, None
        return self

    def feed_positions(self, index: torch.Tensor) -> SpanCache:
        """Feed the positions ``index`` ``[B, m]`` of each row next (after a full pass); returns the cache."""
        if self.empty:
            raise ValueError("a SpanCache's first pass feeds the whole sequence, not chosen positions")
        self.index = index
        return self

    def reset(self) -> None:
        """Forget everything: the next pass is a full one (a new block starts)."""
        self.keys, self.values, self.offset, self.index, self.limit = {}, {}, 0, None, None

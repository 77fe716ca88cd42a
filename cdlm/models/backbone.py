"""The time-conditioned transformer shared by every objective.

A DiT-style stack (Peebles & Xie, 2023): pre-norm blocks whose LayerNorm shift/scale and residual gates come
from the conditioning vector through a zero-initialised linear map (adaLN-Zero), rotary positions
(Su et al., 2021) and attention through ``cdlm.models.attend`` (SDPA, or matmuls for short sequences on a CPU). The
backbone maps hidden states to
hidden states; input adapters and output heads belong to the objectives (the contracts: cdlm/types.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from cdlm import checks
from cdlm.models.activations import GeluTanh
from cdlm.models.attend import ATTENTION_KERNELS, AttentionKernel, attend
from cdlm.models.kv_cache import KVCache
from cdlm.models.rotary import Rotary, apply_rotary, rotary_at
from cdlm.models.span_cache import SpanCache

MaskMode = Literal["bidirectional", "causal", "block_causal"]
MASK_MODES = ("bidirectional", "causal", "block_causal")


def check_heads(width: int, heads: int, width_name: str = "width", heads_name: str = "heads") -> None:
    """``width`` and ``heads`` positive integers, ``width`` a multiple of ``heads`` and the head width even (the
    rotary embedding rotates pairs of coordinates); the names are the caller's arguments, for the message."""
    checks.positive_ints(**{width_name: width, heads_name: heads})
    if width % heads:
        raise checks.ArgumentError(f"{width_name}={width} must be divisible by {heads_name}={heads}")
    if (width // heads) % 2:
        raise checks.ArgumentError(
            f"the head width {width_name} / {heads_name} = {width} / {heads} = {width // heads} must be even "
            "(rotary positions rotate pairs of coordinates)"
        )


def check_backbone(
    width: int, depth: int, heads: int, mlp_ratio: int, dropout: float, max_len: int, cond_width: int
) -> None:
    """A clear error for an out-of-range ``Backbone`` size (``mask_mode`` and ``block_size`` are checked apart)."""
    checks.positive_ints(depth=depth, mlp_ratio=mlp_ratio, max_len=max_len, cond_width=cond_width)
    check_heads(width, heads)
    checks.in_interval("dropout", dropout, 0.0, 1.0, high_open=True)


def per_position(v: torch.Tensor) -> torch.Tensor:
    """A per-sequence ``[B, D]`` modulation as ``[B, 1, D]``; a per-position one ``[B, L, D]`` as it is."""
    return v if v.dim() == 3 else v[:, None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift``, ``shift, scale`` per sequence ``[B, D]`` or per position ``[B, L, D]``."""
    return x * (1 + per_position(scale)) + per_position(shift)


def all_real(padding: torch.Tensor | None) -> bool:
    """Whether no key is padding, decided without reading device memory (no host-device sync).

    True for ``None``, for a mask that is a broadcast of one value (every stride 0: ``dense_padding``, which
    ``DiffusionLM`` hands over for batches it checked on the host before moving them), and for an all-True mask held in
    CPU memory. A mask on an accelerator is not read: it is applied as given, which is correct either way.
    """
    if padding is None:
        return True
    if padding.dim() and all(stride == 0 for stride in padding.stride()):
        return True
    return padding.device.type == "cpu" and bool(padding.all())


def dense_padding(shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An all-True padding mask of ``shape`` stored as one broadcast element, which ``all_real`` recognises without a
    sync: the mask of packed rows, so that attention keeps the fused kernels that take no mask."""
    return torch.ones((), dtype=torch.bool, device=device).expand(shape)


def attention_mask(
    mode: MaskMode, length: int, padding: torch.Tensor | None, block_size: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean SDPA mask ``[B|1, 1, L, L]`` (True = may attend), or None when nothing is masked.

    ``padding`` is ``[B, L]`` with True on real tokens; padded keys are hidden from every query.
    """
    if mode == "bidirectional":
        structure = None
    elif mode == "causal":
        structure = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    else:  # block_causal: a query sees every key in its own block and in earlier blocks
        block = torch.arange(length, device=device) // block_size
        structure = block[None, :] <= block[:, None]  # [L, L]
    if all_real(padding):
        return None if structure is None else structure[None, None]
    keys = padding[:, None, None, :]  # [B, 1, 1, L]
    if structure is None:
        return keys
    return keys & structure[None, None]


def two_stream_mask(length: int, padding: torch.Tensor | None, block_size: int, device: torch.device) -> torch.Tensor:
    """Boolean SDPA mask ``[B|1, 1, 2N, 2N]`` for a noisy copy and a clean copy of ``N = length`` positions.

    Block diffusion's vectorised training (Arriola et al. 2025, BD3-LM, sec. 3.2; Cola DLM's block-causal prior):
    a noisy query of block ``b`` sees the noisy keys of block ``b`` and the clean keys of blocks ``< b``; a clean
    query sees the clean keys of blocks ``<= b``, never a noisy one. ``padding`` ``[B, 2N]`` (True = real) hides
    padded keys.
    """
    block = torch.arange(length, device=device) // block_size
    same = block[:, None] == block[None, :]  # [N, N]
    earlier = block[None, :] < block[:, None]
    structure = torch.cat(
        [torch.cat([same, earlier], 1), torch.cat([torch.zeros_like(same), same | earlier], 1)], 0
    )  # [2N, 2N]
    if all_real(padding):
        return structure[None, None]
    return padding[:, None, None, :] & structure[None, None]


def cached_causal_mask(offset: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Mask ``[1, 1, n, offset + n]`` for ``n = length`` new queries over ``offset`` cached keys and themselves.

    New query ``i`` (absolute position ``offset + i``) sees keys ``0 .. offset + i``; None when one query sees all.
    """
    if length == 1:
        return None
    return torch.ones(length, offset + length, dtype=torch.bool, device=device).tril(offset)[None, None]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, kernel: AttentionKernel = "auto") -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads, self.dropout, self.kernel = heads, dropout, kernel
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | SpanCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # [B, H, L, Dh]
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, H, T, Dh]: cached positions followed by the new ones
        p = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, is_causal and mask is None, p, self.kernel)  # [B, H, L, Dh]
        return self.out(rearrange(y, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation of both sublayers."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: int, dropout: float, cond_width: int, kernel: AttentionKernel = "auto"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = Attention(width, heads, dropout, kernel)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), GeluTanh(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Linear(cond_width, 6 * width)

    def forward(
        self, x, c, rotary, mask, is_causal: bool, cache: KVCache | SpanCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)  # 6 x [B, (L,) D]
        a = self.attn(modulate(self.norm1(x), shift1, scale1), rotary, mask, is_causal, cache, layer)
        x = x + per_position(gate1) * self.drop(a)
        x = x + per_position(gate2) * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x  # [B, L, D]


def adopt_attention(backbone: Backbone, mode: MaskMode, owner: str) -> None:
    """Give ``backbone`` the attention mask ``mode`` that the objective ``owner`` declares (its ``attention``).

    A backbone built with ``mask_mode`` unset (None) takes ``mode``; one built with ``mode`` is left as it is; one
    built with another mode is refused with an ``ArgumentError`` naming both, never switched behind the config's
    back. (A config run fills ``model.mask_mode`` in from the objective before the backbone is built:
    ``cdlm.config.apply_attention``.)
    """
    if backbone.mask_mode == mode:
        return
    if backbone.mask_mode_given:
        raise checks.ArgumentError(
            f"{owner} needs mask_mode={mode!r} attention, but the backbone was built with "
            f"mask_mode={backbone.mask_mode!r}: set model.mask_mode={mode} or leave it unset"
        )
    if mode == "block_causal":
        checks.positive_ints(block_size=backbone.block_size)
    backbone.mask_mode, backbone.mask_mode_given = mode, True


class Backbone(nn.Module):
    """Transformer trunk: ``forward(h, c, padding) -> h`` ``[B, L, width]``; ``c`` ``[B, (L,) cond_width]`` or None.

    Args:
        width, depth, heads, mlp_ratio, dropout: the usual sizes.
        max_len: longest sequence the rotary table covers.
        mask_mode: ``bidirectional`` (diffusion), ``causal`` (autoregressive) or ``block_causal``; None (the
            default): the mask the objective declares (its ``attention``, taken by ``adopt_attention``),
            bidirectional until then. ``mask_mode_given`` records whether it was set.
        block_size: block length for ``block_causal`` (checked only in that mode).
        cond_width: width of the conditioning vector feeding adaLN (128 as in MDLM's DiT, not ``width``,
            so that unconditioned objectives carry few idle parameters).
        compile: compile each block with ``torch.compile`` for training (regional compilation: one graph serves
            every block; the weights' names do not change); evaluation and sampling run eagerly (docs/runs.md,
            "Speed").
        activation_checkpointing: in training, keep only each block's input and recompute the block in the backward
            pass: activation memory of one block instead of ``depth``, for about a third more compute.
        attention: the attention kernel (``cdlm.models.attend``): ``auto`` (matmuls for short sequences on a CPU,
            SDPA elsewhere), ``sdpa`` or ``matmul``.
        rope_scale: NTK-aware rotary scaling for ``rope_scale`` times the trained context (LongLLaDA;
            ``cdlm.models.rotary.ntk_base``); 1 = plain rotary positions. Usually set at sampling time
            (``sample.py rope_scale=4``, ``DiffusionLM.rescale_rotary``), not in training.

    Sizes are positive integers, ``width`` a multiple of ``heads`` with an even head width, ``dropout`` in [0, 1);
    anything else is an ``ArgumentError`` (a ``ValueError``) naming the argument.
    """

    def __init__(
        self,
        width: int = 384,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        max_len: int = 4096,
        mask_mode: MaskMode | None = None,
        block_size: int = 32,
        cond_width: int = 128,
        compile: bool = False,
        activation_checkpointing: bool = False,
        attention: AttentionKernel = "auto",
        rope_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (checks.is_real(rope_scale) and rope_scale >= 1):
            raise checks.ArgumentError(f"rope_scale must be a number >= 1 (1 = plain rotary), got {rope_scale!r}")
        check_backbone(width, depth, heads, mlp_ratio, dropout, max_len, cond_width)
        checks.one_of("attention", attention, ATTENTION_KERNELS)
        checks.booleans(compile=compile, activation_checkpointing=activation_checkpointing)
        if mask_mode is not None and (not isinstance(mask_mode, str) or mask_mode not in MASK_MODES):
            raise checks.ArgumentError(f"mask_mode={mask_mode!r} is not one of {MASK_MODES} (or None)")
        if mask_mode == "block_causal":
            checks.positive_ints(block_size=block_size)
        self.width, self.depth, self.heads, self.cond_width = width, depth, heads, cond_width
        self.mask_mode: MaskMode = mask_mode or "bidirectional"
        self.mask_mode_given, self.block_size = mask_mode is not None, block_size
        self.rotary = Rotary(width // heads, max_len, scale=rope_scale)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, dropout, cond_width, attention) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.ada = nn.Linear(cond_width, 2 * width)
        self.apply(_init_weights)
        for module in (self.ada, *(b.ada for b in self.blocks)):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        self.compiled, self.activation_checkpointing = compile, activation_checkpointing
        if compile:
            for block in self.blocks:
                block.compile()

    def forward(
        self,
        h: torch.Tensor,
        c: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        cache: KVCache | SpanCache | None = None,
        two_stream: bool = False,
    ) -> torch.Tensor:
        """``h`` ``[B, L, D]``; ``c`` conditioning ``[B, C]`` or per position ``[B, L, C]`` (None = unconditioned);
        ``padding`` ``[B, L]`` bool.

        ``two_stream`` (``block_causal`` mode): ``h`` is a noisy copy followed by a clean copy of ``L / 2``
        positions, both at rotary positions ``0 .. L/2 - 1``, under ``two_stream_mask``.

        With a ``cache`` (no ``padding``), ``h`` holds only the ``L`` new positions after the ``cache.offset`` cached
        ones: rotary angles start at the offset and the cache is extended by ``L``. In ``causal`` mode the new
        queries attend to every cached key and causally among themselves; in ``block_causal`` mode the new
        positions are (the start of) one block and attend to every cached key and to each other. With a
        ``SpanCache`` (``bidirectional`` mode), ``h`` holds the ``L`` positions from ``cache.offset`` on (or each row's
        ``cache.index`` ``[B, L]``), which attend to every position of the sequence: their fresh keys and the cached
        ones elsewhere.
        """
        B, L, _ = h.shape
        if c is None:
            c = h.new_zeros(B, self.cond_width)
        if two_stream:
            if self.mask_mode != "block_causal" or cache is not None or L % 2:
                raise ValueError(
                    f"two_stream needs mask_mode='block_causal', no cache and an even length "
                    f"(mask_mode={self.mask_mode!r}, L={L})"
                )
            cos, sin = self.rotary(L // 2, h.device)
            rotary = torch.cat([cos, cos]), torch.cat([sin, sin])  # both copies at positions 0 .. L/2 - 1
            mask, is_causal = two_stream_mask(L // 2, padding, self.block_size, h.device), False
        elif cache is None:
            rotary = self.rotary(L, h.device)
            # plain causal (no padding): SDPA's is_causal kernel instead of a dense [L, L] mask
            is_causal = self.mask_mode == "causal" and all_real(padding)
            mask = None if is_causal else attention_mask(self.mask_mode, L, padding, self.block_size, h.device)
        else:
            chosen = isinstance(cache, SpanCache) and cache.index is not None  # per-row positions, not a span
            rotary = rotary_at(self.rotary, cache.index) if chosen else self.rotary(L, h.device, cache.offset)
            mask, is_causal = self.cached_mask(cache, L, padding, h.device), False
        for i, block in enumerate(self.blocks):
            h = self.run_block(block, i, h, c, rotary, mask, is_causal, cache)
        if cache is not None:
            cache.advance(L)
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=-1)
        return modulate(self.norm(h), shift, scale)  # [B, L, D]

    def run_block(self, block: Block, i: int, h, c, rotary, mask, is_causal: bool, cache: KVCache | SpanCache | None):
        """Block ``i`` on ``h`` ``[B, L, D]``: recomputed in the backward pass under activation checkpointing, compiled
        in training when ``compile`` is on; eager in evaluation and sampling, whose many batch sizes, lengths and cache
        offsets would each compile anew."""
        if cache is not None or not self.training:
            return block._call_impl(h, c, rotary, mask, is_causal, cache, i)  # hooks kept, compiled graph bypassed
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, c, rotary, mask, is_causal, use_reentrant=False)
        return block(h, c, rotary, mask, is_causal)

    def cached_mask(
        self, cache: KVCache | SpanCache, length: int, padding: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """The mask of ``length`` new queries after ``cache.offset`` cached positions (``KVCache``) or over a whole
        sequence (``SpanCache``); an error where a cache cannot work."""
        if isinstance(cache, SpanCache):
            if padding is not None or self.mask_mode != "bidirectional":
                raise ValueError(
                    f"a SpanCache needs mask_mode 'bidirectional' and no padding (mask_mode={self.mask_mode!r})"
                )
            return None  # every query sees every position
        offset = cache.offset
        if padding is not None or self.mask_mode == "bidirectional":
            raise ValueError(
                f"a KV cache needs mask_mode 'causal' or 'block_causal' and no padding (mask_mode={self.mask_mode!r})"
            )
        if self.mask_mode == "causal":
            return cached_causal_mask(offset, length, device)
        if offset % self.block_size or length > self.block_size:
            raise ValueError(
                f"block_causal caching feeds one block at a time: offset {offset} and length {length} do not fit "
                f"block_size {self.block_size}"
            )
        return None  # one block over the earlier blocks' keys: it sees all of them and itself

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)

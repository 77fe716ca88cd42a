"""The latent prior's velocity network and its block-causal variant (Cola DLM); docs/math.md §5.

``PriorNetwork`` maps the native flow state ``z_t`` ``[B, N, d_z]`` at time ``t`` to ``v_hat`` through the injected
backbone, with ``d_z -> W`` and ``W -> d_z`` projections and a time embedding. ``BlockCausalNetwork`` is the same
network over blocks of ``block`` latents: block ``b`` sees its own noisy block and the clean blocks before it, in one
two-stream pass for training (BD3-LM's vectorised form) or over a ``KVCache`` of finished blocks for sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from cdlm import checks
from cdlm.models.backbone import Backbone, adopt_attention
from cdlm.models.embeddings import TimeEmbedding
from cdlm.models.kv_cache import KVCache


class PriorNetwork(nn.Module):
    """``v_hat(z_t, t)``: ``out_proj(backbone(in_proj(z_t), time_embed(t)))``; the output layer starts at zero."""

    def __init__(self, backbone: Backbone, latent_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.time_embed = TimeEmbedding(backbone.cond_width)  # t in [0, 1], DiT's x1000
        self.in_proj = nn.Linear(latent_dim, backbone.width)
        self.out_proj = nn.Linear(backbone.width, latent_dim)
        nn.init.zeros_(self.out_proj.weight)  # v_hat = 0 at init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``v_hat`` ``[B, N, d_z]`` float32 for ``z`` ``[B, N, d_z]`` at time ``t`` ``[B]``; ``padding`` ``[B, N]``."""
        h = self.backbone(self.in_proj(z), self.time_embed(t.float()), padding)  # [B, N, W]
        return self.out_proj(h).float()


class BlockCausalNetwork(PriorNetwork):
    """``PriorNetwork`` over blocks of ``block`` latents: the backbone attends ``block_causal`` over blocks of ``block``
    (a config run builds it so, ``LatentFlowPrior.attention_for``; a backbone built with its mask unset takes it, one
    built with another mask or block size is refused)."""

    def __init__(self, backbone: Backbone, latent_dim: int, block: int) -> None:
        super().__init__(backbone, latent_dim)
        self.block = block
        if not backbone.mask_mode_given:
            backbone.block_size = block
        elif backbone.block_size != block:
            raise checks.ArgumentError(
                f"a block-causal prior over blocks of {block} latents needs model.block_size={block}, "
                f"got {backbone.block_size}: leave model.block_size and model.mask_mode unset"
            )
        adopt_attention(backbone, "block_causal", "LatentFlowPrior")

    def forward(self, z: torch.Tensor, t: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        raise ValueError("a block-causal prior denoises block by block: sample it through sample_blocks")

    def two_stream(
        self, z: torch.Tensor, t: torch.Tensor, clean: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Block-causal ``v_hat`` ``[B, N, d_z]`` for noisy latents ``z`` at per-latent times ``t`` ``[B, N]`` given
        the clean latents ``clean`` ``[B, N, d_z]`` (one two-stream pass; the clean copy is conditioned on t = 0)."""
        B, N, _ = z.shape
        h = self.in_proj(torch.cat([z, clean.to(z.dtype)], 1))  # [B, 2N, W]
        noisy = self.time_embed(t.flatten().float()).view(B, N, -1)  # [B, N, C]
        at_zero = self.time_embed(t.new_zeros(1, dtype=torch.float32))  # [1, C]: the clean copy's t = 0, once
        c = torch.cat([noisy, at_zero.to(noisy.dtype).expand(B, N, -1)], 1)  # [B, 2N, C]
        both = None if padding is None else torch.cat([padding, padding], 1)
        return self.out_proj(self.backbone(h, c, both, two_stream=True)[:, :N]).float()

    def cached(self, cache: KVCache, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v_hat`` ``[B, K, d_z]`` of the next block ``z`` at time ``t`` ``[B]`` over the cached clean blocks; the
        cache is left as it was."""
        offset = cache.offset
        h = self.backbone(self.in_proj(z), self.time_embed(t.float()), cache=cache)  # [B, K, W]
        cache.truncate(offset)
        return self.out_proj(h).float()

    def extend(self, cache: KVCache, clean: torch.Tensor) -> None:
        """Append the finished block ``clean`` ``[B, K, d_z]`` to the cache, fed once at ``t = 0``."""
        zero = clean.new_zeros(clean.shape[0])
        self.backbone(self.in_proj(clean), self.time_embed(zero), cache=cache)

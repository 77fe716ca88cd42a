"""A transformer text VAE with length compression, for latent diffusion (Cosmos, Cola DLM), docs/math.md §5.

The encoder reads ``L`` tokens with a bidirectional transformer, then folds every ``r`` consecutive positions into one
latent: ``[B, L, W] -> [B, L/r, r W] -> [B, L/r, 2 d_z]`` (posterior mean and log-variance). The decoder unfolds a
latent back into ``r`` positions, ``[B, L/r, d_z] -> [B, L/r, r W] -> [B, L, W]``, and predicts every token's logits
in parallel with a second bidirectional transformer. The posterior is ``q(z | x) = N(mu, diag(exp(logvar)))``.
Encoder-input token masking (a learned [MASK] row of the embedding) is the smoothness augmentation that lives here;
the loss, the KL weight and the latent-noise augmentation belong to ``cdlm.objectives.latent``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cdlm import draws
from cdlm.models.backbone import Backbone

LOG_2PI = math.log(2 * math.pi)
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance (keeps exp finite in float32)


def random(torch_draw, row_draw, shape: torch.Size, device: torch.device, generator: torch.Generator | None):
    """``torch_draw(shape)`` from ``generator``; without one, ``row_draw`` (``cdlm.draws``: per global row inside a
    training step, the global generator elsewhere)."""
    if generator is not None:
        return torch_draw(shape, device=device, generator=generator)
    return row_draw(*shape, device=device)


class TextVAE(nn.Module):
    """Encoder ``q(z | x)`` and parallel decoder ``p(x | z)`` over ``L`` tokens and ``L / r`` latents of width ``d_z``.

    Args:
        vocab_size: ``V``; the encoder embedding has one more row, the [MASK] of the input-masking augmentation.
        width, depth, heads: each transformer's width, layers and heads (the encoder and decoder have ``depth``
            layers each).
        compression: ``r`` in {1, 2, 4, 8, ...}: token positions per latent; ``L`` must be a multiple of ``r``.
        latent_dim: ``d_z``, the width of one latent.
        max_len: longest token sequence (rotary table).
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        compression: int = 4,
        latent_dim: int = 64,
        max_len: int = 4096,
    ) -> None:
        super().__init__()
        if compression < 1 or latent_dim < 1:
            raise ValueError(f"need compression >= 1 and latent_dim >= 1, got {compression} and {latent_dim}")
        self.vocab_size, self.compression, self.latent_dim = vocab_size, compression, latent_dim
        self.mask_id = vocab_size  # the encoder's extra embedding row
        self.embed = nn.Embedding(vocab_size + 1, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.encoder = Backbone(width, depth, heads, max_len=max_len)
        self.to_posterior = nn.Linear(compression * width, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, compression * width)
        self.decoder = Backbone(width, depth, heads, max_len=max_len)
        self.head = nn.Linear(width, vocab_size)
        for linear in (self.to_posterior, self.from_latent, self.head):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def latent_padding(self, padding: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token mask -> ``[B, L / r]``: a latent is real when any of its ``r`` tokens is."""
        self.check_length(padding.shape[1])
        return rearrange(padding.bool(), "b (n r) -> b n r", r=self.compression).any(-1)

    def check_length(self, length: int) -> None:
        if length % self.compression:
            raise ValueError(
                f"sequence length {length} is not a multiple of the VAE's compression r = {self.compression}; "
                f"use a length (data.seq_len, sample length) divisible by {self.compression}"
            )

    def encode(
        self,
        ids: torch.Tensor,
        padding: torch.Tensor | None = None,
        mask_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each ``[B, L / r, d_z]`` float32, of ``ids`` ``[B, L]``.

        ``mask_prob``: each input token is replaced by [MASK] with this probability (the encoder-side smoothness
        augmentation; 0 at evaluation).
        """
        self.check_length(ids.shape[1])
        if mask_prob > 0:
            hide = random(torch.rand, draws.rand, ids.shape, ids.device, generator) < mask_prob  # [B, L]
            ids = torch.where(hide, self.mask_id, ids)
        h = self.encoder(self.embed(ids), None, padding)  # [B, L, W]
        h = rearrange(h, "b (n r) w -> b n (r w)", r=self.compression)  # [B, L/r, r W]
        mean, logvar = self.to_posterior(h).float().chunk(2, dim=-1)  # 2 x [B, L/r, d_z]
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits ``[B, L, V]`` float32 from latents ``z`` ``[B, L / r, d_z]`` (``padding`` ``[B, L]``)."""
        h = rearrange(self.from_latent(z), "b n (r w) -> b (n r) w", r=self.compression)  # [B, L, W]
        return self.head(self.decoder(h, None, padding)).float()

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw ``z = mu + exp(logvar / 2) eps`` ``[B, N, d_z]``."""
        eps = random(torch.randn, draws.randn, mean.shape, mean.device, generator)
        return mean + (0.5 * logvar).exp() * eps

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``KL(N(mu, diag sigma^2) || N(0, I)) = sum(mu^2 + sigma^2 - 1 - log sigma^2) / 2`` per latent ``[B, N]``."""
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1)

    @staticmethod
    def log_posterior(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``log q(z | x) = log N(z; mu, diag exp(logvar))`` per latent ``[B, N]``."""
        return -0.5 * ((z - mean).square() / logvar.exp() + logvar + LOG_2PI).sum(-1)

    @staticmethod
    def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``-log p(ids | z)`` per token ``[B, L]`` from the decoder's logits ``[B, L, V]``."""
        return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")

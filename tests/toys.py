"""A network-free continuous objective with an exact denoiser, for the shared samplers and the ODE bound."""

from __future__ import annotations

import math

import torch

from cdlm.objectives.ode_likelihood import ode_nll
from cdlm.types import Batch, LossOutput


class GaussianToy:
    """``ContinuousObjective`` whose data is ``x0 ~ N(mu, s^2 I)`` in ``dim`` dimensions per position.

    The denoiser is the exact posterior mean ``E[x0 | x~] = mu + s^2 / (s^2 + sigma^2) (x~ - mu)``, so
    ``p_sigma = N(mu, (s^2 + sigma^2) I)`` in closed form. ``sigma(t)`` is log-linear from ``sigma_min`` to
    ``sigma_max``. For the bound, tokens ``0..vocab_size-1`` sit at codebook points drawn from the data law; the decoder
    is the exact posterior over tokens at ``sigma_min`` (uniform token prior). ``calls`` records, per ``denoise``
    call, whether a self-conditioning input came in.
    """

    space = "continuous"

    def __init__(
        self,
        dim: int = 3,
        mu: float = 0.5,
        s: float = 2.0,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        vocab_size: int = 6,
        ode_steps: int = 16,
    ) -> None:
        self.dim, self.mu, self.s, self.vocab_size, self.ode_steps = dim, mu, s, vocab_size, ode_steps
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.data_mean, self.data_scale = mu, s
        g = torch.Generator().manual_seed(0)
        self.codebook = mu + s * torch.randn(vocab_size, dim, generator=g)  # [V, D]
        self.calls: list[bool] = []

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + t.double() * (hi - lo))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(x0_prev is not None)
        shrink = (self.s**2 / (self.s**2 + sigma.to(x.dtype) ** 2))[:, None, None]  # [B, 1, 1]
        return self.mu + shrink * (x - self.mu)

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        std = math.sqrt(self.sigma_max**2 + self.s**2)
        return self.mu + std * torch.randn(n, length, self.dim, generator=generator, device=device)

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Exact token posterior logits ``[B, L, V]`` at ``sigma_min``: ``-|x - e_v|^2 / (2 sigma_min^2)``."""
        sq = ((x[..., None, :] - self.codebook.to(x)) ** 2).sum(-1)  # [B, L, V]
        return -sq / (2 * self.sigma_min**2)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_logits(x).argmax(-1)

    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codebook.to(ids.device)[ids]  # [B, L, D]

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logp = self.token_logits(x.double()).log_softmax(-1)  # [B, L, V]
        return -logp.gather(-1, ids[..., None])[..., 0]

    def loss(self, batch: Batch) -> LossOutput:
        """The exact denoiser's MSE at a random noise level, per valid token."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        x0 = self.clean_state(ids)
        sigma = self.sigma(torch.rand(ids.shape[0])).float()
        x = x0 + sigma[:, None, None] * torch.randn_like(x0)
        mse = ((self.denoise(x, sigma) - x0) ** 2).mean(-1) * mask  # [B, L]
        return LossOutput(mse.sum() / mask.sum().clamp_min(1), mse, mask)

    def nll(self, batch: Batch) -> LossOutput:
        return ode_nll(self, batch, steps=self.ode_steps)

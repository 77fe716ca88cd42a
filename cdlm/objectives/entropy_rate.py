"""The learned entropy-rate (information-uniform) noise schedule of bitstream diffusion: CoBit, MATH.md section 4.

The law of ``log sigma`` is a histogram over ``bins`` equal cells of ``[log sigma_min, log sigma_max]``, log-uniform
inside each cell. Training observes, per sequence, the noise level ``sigma`` and the denoising error
``m = mean (x0_hat - b)^2``. By the I-MMSE relation (Guo, Shamai and Verdu 2005) the information the state gains per
unit of ``log sigma`` is proportional to ``mmse / sigma^2``, so each cell's rate is ``r_k = mean(m / sigma^2)`` over
a FIFO of recent observations and the learned density is

    q_k ∝ g(sigma_k) sqrt(r_k),   g(sigma) = y / (1 + y),   y = (sigma / sigma_g)^3,   sigma_g = 0.1,

where ``g`` suppresses the near-clean levels whose rate is dominated by the estimator's floor. During the first
``warmup_batches`` training batches ``log sigma ~ N(-1.2, 1.2^2)`` truncated to the range (held, like ``q``, as cell
masses: log-uniform inside cells of 0.08 in ``log sigma`` at the defaults). The table is first fitted at the end of
warm-up (or as soon as the FIFO holds ``bins`` observations) and refit every ``refresh_every`` batches after that;
training draws from ``(1 - w) warm-up + w q`` with ``w`` ramping from 0 to 1 over ``ramp_batches``. Samplers use the
inverse CDF of ``q``: ``sigma(t)``, uniform ``t`` = equal entropy per step. The FIFO and ``q`` are buffers, so they
live in checkpoints and ``save_pretrained`` files; sampling a model that never fitted ``q`` is an error.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


class ScheduleNotFitted(RuntimeError):
    """Raised when a sampler asks for ``sigma(t)`` of a schedule that has no fitted table."""


class EntropyRateSchedule(nn.Module):
    """Histogram law of ``log sigma`` learned from the denoising error (CoBit's entropy-rate schedule).

    Args:
        sigma_min, sigma_max: the noise range (MATH.md section 4: 0.002 and 80).
        bins: log-spaced cells (128).
        fifo_size: how many recent ``(sigma, m)`` observations the fit uses.
        warmup_batches, ramp_batches, refresh_every: training batches before the first fit, of the ramp from the
            warm-up law to ``q``, and between refits.
        warmup_mean, warmup_std: the warm-up law of ``log sigma`` (-1.2, 1.2), truncated to the range.
        g_sigma, g_power: the gate ``g(sigma) = y / (1 + y)``, ``y = (sigma / g_sigma)^g_power``.
    """

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        bins: int = 128,
        fifo_size: int = 8192,
        warmup_batches: int = 100,
        ramp_batches: int = 200,
        refresh_every: int = 25,
        warmup_mean: float = -1.2,
        warmup_std: float = 1.2,
        g_sigma: float = 0.1,
        g_power: float = 3.0,
    ) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if bins < 2 or fifo_size < bins or refresh_every < 1 or ramp_batches < 0 or warmup_batches < 0:
            raise ValueError(
                f"need bins >= 2, fifo_size >= bins, refresh_every >= 1, ramp_batches >= 0, warmup_batches >= 0; "
                f"got bins={bins}, fifo_size={fifo_size}, refresh_every={refresh_every}, "
                f"ramp_batches={ramp_batches}, warmup_batches={warmup_batches}"
            )
        self.sigma_min, self.sigma_max, self.bins = sigma_min, sigma_max, bins
        self.warmup_batches, self.ramp_batches, self.refresh_every = warmup_batches, ramp_batches, refresh_every
        self.g_sigma, self.g_power = g_sigma, g_power
        log_edges = torch.linspace(math.log(sigma_min), math.log(sigma_max), bins + 1, dtype=torch.float64)
        self.register_buffer("log_edges", log_edges, persistent=False)  # [bins + 1]
        normal = torch.distributions.Normal(torch.tensor(warmup_mean, dtype=torch.float64), warmup_std)
        warm = normal.cdf(log_edges).diff()  # [bins] truncated normal mass per cell
        self.register_buffer("warm_mass", warm / warm.sum(), persistent=False)
        # state (persistent): the FIFO of observations, the fitted table and the training batch counter
        self.register_buffer("fifo_sigma", torch.zeros(fifo_size, dtype=torch.float64))
        self.register_buffer("fifo_error", torch.zeros(fifo_size, dtype=torch.float64))
        self.register_buffer("fifo_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("fifo_next", torch.zeros((), dtype=torch.long))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("mass", torch.zeros(bins, dtype=torch.float64))  # q; all zero = not fitted
        self.register_buffer("rate", torch.zeros(bins, dtype=torch.float64))  # r_k of the last fit

    # ---- the laws ---------------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return bool(self.mass.sum() > 0)

    def ramp(self) -> float:
        """Weight ``w`` in [0, 1] of the learned law in the training mixture."""
        if not self.fitted:
            return 0.0
        done = int(self.batches) - self.warmup_batches
        return 1.0 if self.ramp_batches == 0 else min(max(done / self.ramp_batches, 0.0), 1.0)

    def training_mass(self) -> torch.Tensor:
        """Cell masses ``[bins]`` float64 of the current training law ``(1 - w) warm-up + w q``."""
        w = self.ramp()
        return self.warm_mass if w == 0.0 else (1 - w) * self.warm_mass + w * self.mass

    def inverse_cdf(self, mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``sigma`` (float64, ``u``'s shape) at quantiles ``u`` in [0, 1] of the histogram law ``mass`` ``[bins]``.

        The CDF is piecewise linear in ``log sigma`` (log-uniform inside a cell), so the inverse is exact:
        increasing, ``u = 0 -> sigma_min`` and ``u = 1 -> sigma_max`` (empty end cells are skipped over).
        """
        u = u.to(torch.float64).clamp(0.0, 1.0)
        mass = mass.to(u.device)
        cdf = torch.cat([mass.new_zeros(1), mass.cumsum(0) / mass.sum()])  # [bins + 1]
        cell = (torch.searchsorted(cdf, u.reshape(-1), right=True) - 1).clamp(0, self.bins - 1)  # [N]
        lo, hi = cdf[cell], cdf[cell + 1]
        frac = ((u.reshape(-1) - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
        edges = self.log_edges.to(u.device)
        log_sigma = edges[cell] + frac * (edges[cell + 1] - edges[cell])
        return log_sigma.exp().reshape(u.shape)

    def sample_training_sigma(self, u: torch.Tensor) -> torch.Tensor:
        """Training noise levels ``[B]`` float64 from stratified ``u`` ``[B]`` through the training law."""
        return self.inverse_cdf(self.training_mass(), u)

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """The sampler's ``sigma(t)``: the inverse CDF of the learned ``q`` (uniform ``t`` = equal entropy steps)."""
        if not self.fitted:
            raise ScheduleNotFitted(
                "this bitstream model has no entropy-rate table: it was trained for fewer than warmup_batches="
                f"{self.warmup_batches} batches (it has seen {int(self.batches)}), or its checkpoint predates the "
                "table. Train longer or load a checkpoint whose schedule was fitted; cdlm does not fall back to the "
                "warm-up law silently."
            )
        return self.inverse_cdf(self.mass, t)

    # ---- learning the table -----------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, sigma: torch.Tensor, error: torch.Tensor) -> None:
        """Record one training batch: ``sigma`` ``[B]`` and per-sequence error ``m`` ``[B]``; refit on schedule.

        Under DDP every rank gathers all ranks' observations, so the tables stay identical on every rank.
        """
        pairs = torch.stack([sigma.detach().double(), error.detach().double()], dim=-1)  # [B, 2]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(pairs) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, pairs.contiguous())
            pairs = torch.cat(gathered)
        size = self.fifo_sigma.numel()
        pairs = pairs[-size:]
        slots = (self.fifo_next + torch.arange(len(pairs), device=pairs.device)) % size  # [N]
        self.fifo_sigma[slots] = pairs[:, 0].to(self.fifo_sigma.device)
        self.fifo_error[slots] = pairs[:, 1].to(self.fifo_error.device)
        self.fifo_next.copy_((self.fifo_next + len(pairs)) % size)
        self.fifo_filled.copy_(torch.clamp(self.fifo_filled + len(pairs), max=size))
        self.batches += 1
        since = int(self.batches) - self.warmup_batches
        if since >= 0 and (since % self.refresh_every == 0 or not self.fitted):
            self.refit()

    @torch.no_grad()
    def refit(self) -> None:
        """``q_k ∝ g(sigma_k) sqrt(r_k)`` from the FIFO; cells without data take the nearest filled cells' rate
        (interpolated in ``log r``). No-op while the FIFO holds fewer than ``bins`` observations."""
        n = int(self.fifo_filled)
        if n < self.bins:
            return
        sigma, error = self.fifo_sigma[:n], self.fifo_error[:n]
        edges = self.log_edges.to(sigma.device)
        cell = (torch.bucketize(sigma.log(), edges, right=True) - 1).clamp(0, self.bins - 1)  # [n]
        count = torch.zeros(self.bins, dtype=torch.float64, device=sigma.device).index_add_(
            0, cell, torch.ones_like(sigma)
        )
        total = torch.zeros_like(count).index_add_(0, cell, error / sigma.square())
        centres = 0.5 * (edges[1:] + edges[:-1])  # [bins] log sigma at the cell centres
        has = count > 0
        log_rate = (total[has] / count[has]).clamp_min(1e-30).log()
        rate = interp(centres, centres[has], log_rate).exp()  # [bins]
        y = (centres.exp() / self.g_sigma) ** self.g_power
        q = y / (1 + y) * rate.sqrt()
        self.rate.copy_(rate)
        self.mass.copy_(q / q.sum())

    def logs(self) -> dict[str, torch.Tensor]:
        """Median of the learned law and the ramp weight, for the training log."""
        if not self.fitted:
            return {"sched_ramp": torch.tensor(0.0)}
        median = self.inverse_cdf(self.mass, torch.tensor(0.5, dtype=torch.float64))
        return {"sched_ramp": torch.tensor(self.ramp()), "sched_median_sigma": median.float()}

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the learned density over ``log sigma`` against the warm-up law and the rate ``r``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.fitted:
            raise ScheduleNotFitted("nothing to plot: the entropy-rate table was never fitted")
        centres = (0.5 * (self.log_edges[1:] + self.log_edges[:-1])).exp().cpu()
        width = float(self.log_edges[1] - self.log_edges[0])
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        a.plot(centres, (self.mass / width).cpu(), label="learned q (entropy rate)")
        a.plot(centres, (self.warm_mass / width).cpu(), "--", label="warm-up N(-1.2, 1.2²)")
        a.set(xscale="log", xlabel="σ", ylabel="density per unit log σ", title="training / sampling law")
        a.legend()
        b.plot(centres, self.rate.cpu())
        b.set(xscale="log", yscale="log", xlabel="σ", ylabel="mean mse / σ²", title="information rate r(σ)")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` (``xp`` increasing) at ``x``, constant beyond the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)

"""The learned entropy-rate (information-uniform) noise schedule of bitstream diffusion: CoBit, docs/math.md §4.

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
inverse CDF of that same training law: ``sigma(t)``, so once the ramp is complete it is ``q`` (uniform ``t`` = equal
entropy per step), and a model whose training ended earlier is sampled under the law it was trained on (the warm-up
law before the first fit, the mixture during the ramp). The FIFO, ``q`` and the batch counter are buffers, so they
live in checkpoints and ``save_pretrained`` files.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from cdlm import checks


def check_counts(bins: int, fifo_size: int, warmup_batches: int, ramp_batches: int, refresh_every: int) -> None:
    """A clear error unless the table and FIFO sizes and the batch counts of ``EntropyRateSchedule`` fit."""
    counts = (bins, fifo_size, warmup_batches, ramp_batches, refresh_every)
    if not all(checks.is_int(n) for n in counts) or (
        bins < 2 or fifo_size < bins or refresh_every < 1 or ramp_batches < 0 or warmup_batches < 0
    ):
        raise checks.ArgumentError(
            f"need bins >= 2, fifo_size >= bins, refresh_every >= 1, ramp_batches >= 0, warmup_batches >= 0 "
            f"(integers); got bins={bins!r}, fifo_size={fifo_size!r}, refresh_every={refresh_every!r}, "
            f"ramp_batches={ramp_batches!r}, warmup_batches={warmup_batches!r}"
        )


class EntropyRateSchedule(nn.Module):
    """Histogram law of ``log sigma`` learned from the denoising error (CoBit's entropy-rate schedule).

    A ``cdlm.objectives.noise_schedule.NoiseSchedule`` (``sigma_of_t``, ``logs``); ``cdlm.plots.plot_entropy_rate``
    draws it.

    Args:
        sigma_min, sigma_max: the noise range (docs/math.md §4: 0.002 and 80).
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
        if not (checks.is_real(sigma_min) and checks.is_real(sigma_max) and 0 < sigma_min < sigma_max):
            raise checks.ArgumentError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        check_counts(bins, fifo_size, warmup_batches, ramp_batches, refresh_every)
        checks.finite(warmup_mean=warmup_mean)
        checks.positive(warmup_std=warmup_std, g_sigma=g_sigma)
        checks.non_negative(g_power=g_power)
        self.sigma_min, self.sigma_max, self.bins = sigma_min, sigma_max, bins
        self.warmup_batches, self.ramp_batches, self.refresh_every = warmup_batches, ramp_batches, refresh_every
        self.g_sigma, self.g_power = g_sigma, g_power
        self.warmup_mean, self.warmup_std = warmup_mean, warmup_std
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
        # host copies of the counters the training step branches on, so that it never reads the device; the
        # buffers stay the state that checkpoints hold, and loading one refreshes the copies
        self.host_batches, self.host_filled, self.host_fitted = 0, 0, False
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_host_state())

    # ---- the laws ---------------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """Whether the learned table ``q`` has been fitted (it is all zero before the first fit)."""
        return self.host_fitted

    def refresh_host_state(self) -> None:
        """Read the counters back from the buffers (after a checkpoint is loaded into them)."""
        self.host_batches, self.host_filled = int(self.batches), int(self.fifo_filled)
        self.host_fitted = bool(self.mass.sum() > 0)

    def ramp(self) -> float:
        """Weight ``w`` in [0, 1] of the learned law in the training mixture."""
        if not self.fitted:
            return 0.0
        done = self.host_batches - self.warmup_batches
        return 1.0 if self.ramp_batches == 0 else min(max(done / self.ramp_batches, 0.0), 1.0)

    def training_mass(self) -> torch.Tensor:
        """Cell masses ``[bins]`` float64 of the current training law ``(1 - w) warm-up + w q``.

        At the ends it is the laws themselves: the warm-up law at ``w = 0`` (before the first fit), ``q`` at ``w = 1``.
        """
        w = self.ramp()
        if w == 0.0:
            return self.warm_mass
        return self.mass if w == 1.0 else (1 - w) * self.warm_mass + w * self.mass

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
        """The sampler's ``sigma(t)`` (float64, ``t``'s shape): the inverse CDF of the law the network is trained under.

        That is ``training_mass()``: the learned ``q`` once the ramp is complete (uniform ``t`` = equal entropy steps),
        the warm-up law before the first fit, the ``(1 - w) warm-up + w q`` mixture in between. Increasing in ``t``,
        ``sigma(0) = sigma_min`` and ``sigma(1) = sigma_max``.
        """
        return self.inverse_cdf(self.training_mass(), t)

    def law_name(self) -> str:
        """What ``sigma_of_t`` follows now, in words (for plots, ``cdlm.plots.plot_entropy_rate``, and messages)."""
        if not self.fitted:
            return (
                f"warm-up law N({self.warmup_mean:g}, {self.warmup_std:g}²) on log σ, truncated (table not fitted: "
                f"{self.host_batches} of {self.warmup_batches} warm-up batches)"
            )
        w = self.ramp()
        return "learned entropy-rate law q" if w == 1.0 else f"(1 - w) warm-up + w q, w = {w:.3g} (ramp in progress)"

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
        self.host_filled = min(self.host_filled + len(pairs), size)
        self.batches += 1
        self.host_batches += 1
        since = self.host_batches - self.warmup_batches
        if since >= 0 and (since % self.refresh_every == 0 or not self.fitted):
            self.refit()

    @torch.no_grad()
    def refit(self) -> None:
        """``q_k ∝ g(sigma_k) sqrt(r_k)`` from the FIFO; cells without data take the nearest filled cells' rate
        (interpolated in ``log r``). No-op while the FIFO holds fewer than ``bins`` observations."""
        n = self.host_filled
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
        self.host_fitted = True

    def logs(self) -> dict[str, torch.Tensor]:
        """Median of the learned law and the ramp weight, for the training log."""
        if not self.fitted:
            return {"sched_ramp": torch.tensor(0.0)}
        median = self.inverse_cdf(self.mass, torch.tensor(0.5, dtype=torch.float64))
        return {"sched_ramp": torch.tensor(self.ramp()), "sched_median_sigma": median.float()}


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` (``xp`` increasing) at ``x``, constant beyond the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)

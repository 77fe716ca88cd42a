"""Bitstream (analog-bits) diffusion with a matched-filter residual: CoBit, docs/math.md §4.

Each token id becomes ``k = ceil(log2 V)`` bits ``b`` (``cdlm.objectives.bits``) and one backbone position carries
one token's bits (a bit patch), so the output layer has ``k`` logits per token instead of ``V``. The path is
variance exploding, ``x = b + sigma eps`` (already VE coordinates, docs/math.md §0), ``sigma`` in [0.002, 80].

The network follows EDM's preconditioning (Karras et al. 2022): input ``c_in (x - 1/2)``,
``c_in = (sigma^2 + sigma_d^2)^(-1/2)``, ``sigma_d = 1/2``, with a self-conditioning channel. Its output is a
residual on the matched filter, the exact posterior log-odds of one bit under the VE path with a uniform bit prior,

    logit = f_theta + clip((x - 1/2) / sigma^2, -30, 30),   x0_hat = sigmoid(logit),

because ``log N(x; 1, sigma^2) - log N(x; 0, sigma^2) = (x - 1/2) / sigma^2``: at low noise the filter alone is
the right answer and ``f_theta`` (zero at initialisation) learns the context. The loss is EDM-weighted,
``lambda(sigma) (x0_hat - b)^2`` with ``lambda = (sigma^2 + sigma_d^2) / (sigma^2 sigma_d^2)``, and ``sigma`` is drawn
from the learned entropy-rate schedule (``cdlm.objectives.entropy_rate``), which the sampler reads as ``sigma(t)``.
The likelihood is the shared ODE bound (docs/math.md §6).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cdlm import checks, draws
from cdlm.models.backbone import Backbone
from cdlm.models.embeddings import TimeEmbedding
from cdlm.objectives.bits import bit_width, decode_bits, ids_to_bits
from cdlm.objectives.clean_spans import CleanSpans
from cdlm.objectives.entropy_rate import EntropyRateSchedule
from cdlm.objectives.flow import LOG_SIGMA_EMBED_SCALE
from cdlm.objectives.training_time import training_u
from cdlm.objectives.ve import VEObjective
from cdlm.prompts import Prompt
from cdlm.types import Batch, LossOutput


def matched_filter(x: torch.Tensor, sigma: torch.Tensor, clip: float = 30.0) -> torch.Tensor:
    """``clip((x - 1/2) / sigma^2, -clip, clip)``: the exact log-odds of a bit being 1 given ``x = b + sigma eps``.

    ``x`` ``[B, L, k]``, ``sigma`` ``[B]``; float32 out (computed in float32 whatever the autocast dtype).
    """
    s2 = sigma.float().square()[:, None, None]  # [B, 1, 1]
    return ((x.float() - 0.5) / s2).clamp(-clip, clip)


def check_schedule_keys(schedule: dict | None) -> None:
    """``schedule`` None or a mapping of ``EntropyRateSchedule``'s keyword arguments; the valid keys otherwise."""
    if schedule is None:
        return
    valid = [name for name in inspect.signature(EntropyRateSchedule).parameters]
    if not isinstance(schedule, Mapping):
        raise checks.ArgumentError(f"schedule must be a mapping of {valid} (or null), got {schedule!r}")
    if unknown := sorted(str(key) for key in schedule if key not in valid):
        raise checks.ArgumentError(f"schedule has unknown keys {unknown}; valid keys: {valid}")


class Bitstream(CleanSpans, VEObjective, nn.Module):
    """CoBit objective; owns the bit-patch input map, the self-conditioning channel, the head and the schedule.

    Args:
        backbone: the shared transformer (bidirectional mask).
        vocab_size: ``V``; the state has ``k = ceil(log2 V)`` dimensions per token.
        sigma_data: EDM's ``sigma_d`` (1/2, the std of a fair bit).
        self_condition: probability of a self-conditioning pass per training batch (0.5).
        clip: the matched filter's clip (30).
        schedule: keyword arguments of ``EntropyRateSchedule`` (range, bins, FIFO, warm-up, ramp, refresh).
        ode_steps: Heun steps of the ODE likelihood bound used by ``nll``.
        ode_probes: Hutchinson probes per sequence in ``nll``, all on one ODE trajectory; ``>= 2`` also reports the
            bound's standard error ``nll_se`` (docs/math.md §6).
        condition_rate: the fraction of training rows that keep clean spans (a prefix or scattered positions), whose
            exact bits the network reads at unit scale, flagged, and which are not scored, so that a prompt can be
            given clean at sampling time (``cdlm.objectives.clean_spans``; docs/math.md §3, "Conditional training").
            0: unconditional (prompts by replacement only).
        ode_self_condition: the bound integrates the self-conditioned two-pass denoiser the samplers use and reads
            its decoder self-conditioned too (``cdlm.types.SelfConditionedBound``; docs/math.md §6); False (the
            default) scores the one-pass model.

    The self-conditioning channel is ``(x0_hat - 1/2) / sigma_d`` (unit scale), not docs/math.md's
    ``c_in (x0_hat - 1/2)``: the estimate is a clean quantity, and scaling it by ``c_in ~ 1/sigma`` would silence
    it at high noise, where self-conditioning helps most.

    ``prior`` (``N(1/2, (sigma_max^2 + 1/4) I)``, the exact marginal's mean and variance) and ``nll`` (the ODE bound)
    are ``VEObjective``'s.
    """

    space = "continuous"
    data_mean = 0.5
    data_scale = 0.5

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        sigma_data: float = 0.5,
        self_condition: float = 0.5,
        clip: float = 30.0,
        schedule: dict | None = None,
        ode_steps: int = 32,
        ode_probes: int = 1,
        condition_rate: float = 0.0,
        ode_self_condition: bool = False,
    ) -> None:
        super().__init__()
        if not (checks.is_real(self_condition) and 0.0 <= self_condition <= 1.0):
            raise checks.ArgumentError(f"self_condition is a probability in [0, 1], got {self_condition}")
        checks.at_least(2, vocab_size=vocab_size)  # k = ceil(log2 V) >= 1 bits
        checks.positive(sigma_data=sigma_data, clip=clip)
        checks.positive_ints(ode_steps=ode_steps, ode_probes=ode_probes)
        check_schedule_keys(schedule)
        checks.booleans(ode_self_condition=ode_self_condition)
        self.backbone, self.vocab_size = backbone, vocab_size
        self.sigma_data, self.self_condition, self.clip, self.ode_steps = sigma_data, self_condition, clip, ode_steps
        self.ode_probes, self.ode_self_condition = ode_probes, ode_self_condition
        self.bits = k = bit_width(vocab_size)
        # the noise schedule (a NoiseSchedule: sigma(t) reads it); named ``schedule`` for its checkpoint keys
        self.schedule = EntropyRateSchedule(**(schedule or {}))
        width = backbone.width
        self.proj_in = nn.Linear(2 * k, width)  # [c_in (x - 1/2) ; (x0_sc - 1/2) / sigma_d] -> width
        self.time_embed = TimeEmbedding(backbone.cond_width, scale=LOG_SIGMA_EMBED_SCALE)
        self.head = nn.Linear(width, k)  # zero at init: the model starts as the matched filter
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.init_clean_spans(condition_rate, width)  # the flag marks positions given clean (zero at init)
        self.invalid_decoded = 0  # invalid codes (ids >= V) repaired by ``decode`` since construction

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def state_width(self) -> int:
        """``k``: the bits per token."""
        return self.bits

    # ---- the network ------------------------------------------------------------------------------------------
    def logits(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        x_sc: torch.Tensor | None,
        padding: torch.Tensor | None = None,
        clean: Prompt | None = None,
    ) -> torch.Tensor:
        """Bit logits ``[B, L, k]`` float32 for the state ``x`` ``[B, L, k]`` at ``sigma`` ``[B]``.

        ``x_sc`` ``[B, L, k]`` is the self-conditioning estimate in [0, 1], or None (the channel is then zero).
        ``clean``: the positions read clean (``CleanSpans.spans``: the training spans, else a sampler's prompt for a
        model trained with them): their input channel is the exact bits at ``sigma = 0``'s scale,
        ``(b - 1/2) / sigma_d``, and they are flagged.
        """
        c_in = (sigma.float().square() + self.sigma_data**2).rsqrt()[:, None, None]  # [B, 1, 1]
        signal = c_in * (x.float() - 0.5)  # [B, L, k]
        clean = self.spans(clean, x.shape[0], x.shape[1])
        if clean is not None:
            exact = (self.clean_state(clean.ids).float() - 0.5) / self.sigma_data  # [B, L, k]
            signal = torch.where(clean.fixed[..., None], exact, signal)
        sc = torch.zeros_like(x) if x_sc is None else (x_sc.float() - 0.5) / self.sigma_data
        h = self.proj_in(torch.cat([signal, sc.float()], dim=-1))  # [B, L, W]
        if clean is not None:
            h = self.flagged(h, clean.fixed)
        h = self.backbone(h, self.time_embed(sigma.float().log()), padding)  # [B, L, W]
        return self.head(h).float() + matched_filter(x, sigma, self.clip)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma^2 sigma_d^2)`` ``[B]``."""
        s2 = sigma.square()
        return (s2 + self.sigma_data**2) / (s2 * self.sigma_data**2)

    # ---- training ---------------------------------------------------------------------------------------------
    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        """``x0 = b`` ``[B, L, k]``: the bits of each id, most significant first."""
        return ids_to_bits(ids, self.bits)

    def loss(self, batch: Batch) -> LossOutput:
        """EDM-weighted squared error of ``x0_hat`` per valid bit; ``sigma`` from the entropy-rate schedule.

        ``sigma = schedule(u)`` with ``u`` from ``batch["u"]`` (low-discrepancy). With probability ``self_condition``
        per batch (global torch RNG) a no-grad pass supplies ``x_sc = x0_hat``. While training, the per-sequence
        unweighted error ``m = mean (x0_hat - b)^2`` is handed to the schedule (``observe``; a row with clean spans
        reports its free bits' error, so every rank observes the same number of rows, as DDP's gather needs).
        ``nll`` of the returned ``LossOutput`` is the weighted error per token (summed over bits), not a likelihood;
        with ``condition_rate > 0`` the clean spans (``CleanSpans.training_spans``) are read clean and not scored.
        """
        ids, padding = batch["input_ids"], batch["attention_mask"].bool()  # [B, L]
        sigma = self.schedule.sample_training_sigma(training_u(batch)).float().to(ids.device)  # [B]
        b = self.clean_state(ids)  # [B, L, k]
        x = b + sigma[:, None, None] * draws.randn_like(b)  # [B, L, k]
        clean = self.training_spans(ids, padding)
        x_sc = None
        if draws.coin(self.self_condition):
            with torch.no_grad():
                x_sc = self.logits(x, sigma, None, padding, clean).sigmoid()
        x0_hat = self.logits(x, sigma, x_sc, padding, clean).sigmoid()  # [B, L, k]
        sq = (x0_hat - b).square()  # [B, L, k]
        scored = padding if clean is None else padding & ~clean.fixed  # [B, L]
        valid = scored.float()
        per_token = self.weight(sigma)[:, None] * sq.sum(-1) * valid  # [B, L]
        bits = valid.sum() * self.bits
        loss = per_token.sum() / bits.clamp_min(1)
        if self.training:
            seq_error = (sq.mean(-1) * valid).sum(1) / valid.sum(1).clamp_min(1)  # [B] unweighted, per bit
            self.schedule.observe(sigma, seq_error)
        logs = {**self.schedule.logs(), "mse": ((sq.mean(-1) * valid).sum() / valid.sum().clamp_min(1)).detach()}
        return LossOutput(loss, per_token.detach(), scored, logs)

    # ---- sampling view (cdlm.types.ContinuousObjective) -------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t)``: the inverse CDF of the schedule's training law (``EntropyRateSchedule.sigma_of_t``): the
        learned entropy-rate law once fitted and ramped in, the warm-up law of a model trained for less."""
        return self.schedule.sigma_of_t(t)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat = sigmoid(logit)`` ``[B, L, k]`` (per-bit probability of a one) at ``sigma`` ``[B]``."""
        return self.logits(x, sigma, x0_prev).sigmoid().to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, L]`` from the final estimate (bits ``> 1/2``); invalid codes (``>= V``) become the most
        probable valid id under the independent-bit estimate and are counted in ``invalid_decoded``."""
        ids, invalid = decode_bits(x.clamp(0.0, 1.0), self.vocab_size)
        self.invalid_decoded += int(invalid.sum())
        return ids

    def decode_confidence(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode`` of an estimate ``x0`` ``[B, L, k]`` (not counted in ``invalid_decoded``) and the probability
        ``[B, L]`` of each decoded code under independent bits, for traces (``cdlm.trace``)."""
        p = x0.float().clamp(0.0, 1.0)  # [B, L, k]
        ids, _ = decode_bits(p, self.vocab_size)
        return ids, torch.where(ids_to_bits(ids, p.shape[-1]) > 0.5, p, 1 - p).prod(-1)

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``-log p(ids | x)`` ``[B, L]`` under independent bits read at ``sigma_min`` (one pass; with
        ``ode_self_condition`` a second pass self-conditioned on the first's estimate).

        Mass on invalid codes is lost, so this is an upper bound on the NLL of a renormalised decoder.
        """
        sigma = torch.full((x.shape[0],), self.sigma_min, device=x.device)
        logits = self.logits(x, sigma, None)  # [B, L, k]
        if self.ode_self_condition:
            logits = self.logits(x, sigma, logits.sigmoid())
        bits = self.clean_state(ids)
        return F.binary_cross_entropy_with_logits(logits, bits, reduction="none").sum(-1)

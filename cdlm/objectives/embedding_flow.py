"""Embedding-space VP diffusion: LangFlow (Chen et al. 2026), after Plaid and CDCD (Dieleman et al. 2022).

docs/math.md §3, handled by samplers in the VE coordinates of section 0. Tokens are embeddings ``e_v`` of norm
``sqrt(D)``; the path is variance preserving in ``gamma = log(s^2 / alpha^2)``:

    z = alpha * e_x + s * eps,   alpha^2 = sigmoid(-gamma),   s^2 = sigmoid(gamma),
    x~ = z / alpha = e_x + sigma * eps,   sigma = s / alpha = exp(gamma / 2).

The network predicts token logits with the analytic posterior skip (docs/math.md §3)

    logits = f_theta(z, gamma, x_sc) + c_skip * z @ E^T,   c_skip = alpha / s^2 = exp((softplus(-gamma) - gamma) / 2),

which, all ``||e_v||`` being equal, is the exact log-posterior ``log p(v | z)`` of a factorised Gaussian with a
uniform token prior, up to a per-position constant; ``f_theta`` learns the contextual residual. The loss is CE,
``x0_hat = softmax(logits) @ E``, and ``gamma`` is drawn from the learnable Gumbel schedule
(``cdlm.objectives.gumbel_schedule``), fitted by CDCD's recipe on the side. The likelihood is the ODE bound of
docs/math.md §6 (LangFlow's bound).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cdlm import checks, draws
from cdlm.models.backbone import Backbone
from cdlm.models.embeddings import TimeEmbedding
from cdlm.objectives.clean_spans import CleanSpans
from cdlm.objectives.gumbel_schedule import GumbelSchedule
from cdlm.objectives.sigma_range import SigmaRange
from cdlm.objectives.training_time import training_u
from cdlm.objectives.ve import VEObjective, row_sigma
from cdlm.prompts import Prompt
from cdlm.types import Batch, LossOutput

REFERENCE_WIDTH = 768  # LangFlow's published loc = 4.723, scale = 0.852 are for D = 768
REFERENCE_LOC = 4.723
# gamma spans about [0, 20] over the schedule's clamped quantiles; x50 maps it onto the [0, 1000] range that
# DiT's sinusoidal features were designed for (integer timesteps), as TimeEmbedding's default 1000 does for t.
GAMMA_EMBED_SCALE = 50.0


def c_skip(gamma: torch.Tensor) -> torch.Tensor:
    """Posterior skip gain ``alpha / s^2 = exp((softplus(-gamma) - gamma) / 2)`` (docs/math.md §3), ``[B]``."""
    return torch.exp((F.softplus(-gamma) - gamma) / 2)


def default_loc(dim: int) -> float:
    """Published ``loc`` moved to width ``D``: ``4.723 + log(D / 768)``.

    With unit-variance coordinates, the evidence separating two tokens at noise ``sigma`` scales as
    ``sqrt(D) / sigma``, so an equally informative noise level has ``sigma^2 ∝ D``: ``gamma`` shifts by
    ``log(D / 768)`` (3.624 for ``D = 256``, 2.238 for ``D = 64``); ``scale`` is kept. The fit then adjusts both.
    """
    return REFERENCE_LOC + math.log(dim / REFERENCE_WIDTH)


class EmbeddingFlow(CleanSpans, SigmaRange, VEObjective, nn.Module):
    """LangFlow objective; owns the token embedding, self-conditioning map, time embedding, head and schedule.

    Args:
        backbone: the shared transformer (bidirectional mask).
        vocab_size: ``V``.
        loc, scale: initial Gumbel schedule of ``gamma``; ``loc=None`` is ``default_loc(D)``.
        self_condition: probability of a self-conditioning pass per training batch (LangFlow: 0.5).
        ode_steps: Heun steps of the ODE likelihood bound used by ``nll``.
        embed_dim: embedding width ``D`` (None: the backbone width; otherwise linear maps in and out).
        ode_probes: Hutchinson probes per sequence in ``nll``, all on one ODE trajectory; ``>= 2`` also reports the
            bound's standard error ``nll_se`` (docs/math.md §6).
        analytic_skip: add the factorised posterior ``c_skip z @ E^T`` to the network's logits (LangFlow; the
            default); ``False`` leaves the whole posterior to the network (an ablation, docs/math.md §3).
        learn_schedule: fit the Gumbel schedule to the CE curve during training (CDCD's rule, LangFlow; the default);
            False keeps ``loc, scale, A`` at their initial values (an ablation of the learned time sampling).
        ode_self_condition: the bound integrates the self-conditioned two-pass denoiser the sampler uses and reads
            its decoder self-conditioned too (``cdlm.types.SelfConditionedBound``; docs/math.md §6); False (the
            default) scores the one-pass model. Either is a valid bound; they score different models.

    The clean state ``x0 = E_n[ids]`` has norm ``sqrt(D)``: each coordinate has unit second moment on average
    over coordinates, so ``data_mean = 0`` and ``data_scale = 1`` describe it for the Gaussian at ``sigma_max``
    (``VEObjective.prior``; the data term is ~1e-6 of the variance there, kept so that the prior is exactly the
    Gaussian the ODE bound scores). ``nll`` is ``VEObjective``'s ODE bound.
    """

    space = "continuous"
    data_mean = 0.0
    data_scale = 1.0

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        loc: float | None = None,
        scale: float = 0.852,
        self_condition: float = 0.5,
        ode_steps: int = 32,
        embed_dim: int | None = None,
        ode_probes: int = 1,
        analytic_skip: bool = True,
        condition_rate: float = 0.0,
        ode_self_condition: bool = False,
        learn_schedule: bool = True,
    ) -> None:
        super().__init__()
        if not (checks.is_real(self_condition) and 0.0 <= self_condition <= 1.0):
            raise checks.ArgumentError(f"self_condition is a probability in [0, 1], got {self_condition}")
        checks.at_least(2, vocab_size=vocab_size)  # log V is the schedule's initial amplitude
        checks.positive(scale=scale)
        checks.positive_ints(ode_steps=ode_steps, ode_probes=ode_probes)
        checks.booleans(
            analytic_skip=analytic_skip, ode_self_condition=ode_self_condition, learn_schedule=learn_schedule
        )
        if loc is not None:
            checks.finite(loc=loc)
        if embed_dim is not None:
            checks.positive_ints(embed_dim=embed_dim)
        self.backbone, self.vocab_size = backbone, vocab_size
        self.self_condition, self.ode_steps, self.ode_probes = self_condition, ode_steps, ode_probes
        self.analytic_skip, self.ode_self_condition = analytic_skip, ode_self_condition
        width = backbone.width
        self.dim = dim = embed_dim or width
        # the noise schedule (a NoiseSchedule: sigma(t) reads it); named ``schedule`` for its checkpoint keys
        self.schedule = GumbelSchedule(default_loc(dim) if loc is None else loc, scale, math.log(vocab_size))
        self.learn_schedule = learn_schedule
        self.schedule.requires_grad_(learn_schedule)  # frozen: no gradient, no optimizer update
        self.embed = nn.Embedding(vocab_size, dim)  # rows are normalised to norm sqrt(D) in every use
        nn.init.normal_(self.embed.weight)
        self.self_cond = nn.Linear(2 * dim, dim)  # W_sc [z ; x_sc], zero at init: the input is unchanged
        nn.init.zeros_(self.self_cond.weight)
        nn.init.zeros_(self.self_cond.bias)
        self.proj_in = nn.Linear(dim, width) if dim != width else nn.Identity()
        self.time_embed = TimeEmbedding(backbone.cond_width, scale=GAMMA_EMBED_SCALE)
        self.head = nn.Linear(width, vocab_size)  # zero at init: the model starts as the factorised posterior
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.init_clean_spans(condition_rate, dim)  # the flag marks positions given clean (zero at init)

    @property
    def state_width(self) -> int:
        """``D``: the embedding width."""
        return self.dim

    # ---- embeddings and the network ---------------------------------------------------------------------------
    def embeddings(self) -> torch.Tensor:
        """``E_n`` ``[V, D]`` float32: the embedding rows rescaled to norm ``sqrt(D)``."""
        return math.sqrt(self.dim) * F.normalize(self.embed.weight.float(), dim=-1)

    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        """``x0 = E_n[ids]`` ``[B, L, D]`` (the same point in native and VE coordinates)."""
        return F.embedding(ids, self.embeddings())

    def logits(
        self,
        z: torch.Tensor,
        gamma: torch.Tensor,
        x_sc: torch.Tensor,
        padding: torch.Tensor | None = None,
        clean: Prompt | None = None,
    ) -> torch.Tensor:
        """Token logits ``[B, L, V]`` (float32) for the native state ``z`` ``[B, L, D]`` at ``gamma`` ``[B]``.

        ``x_sc`` ``[B, L, D]`` is the self-conditioning estimate (zeros when absent). ``clean``: the positions read
        as clean embeddings and flagged (``CleanSpans.spans``; None: the prompt given to the sampler, if the model was
        trained with clean spans).
        """
        clean = self.spans(clean, z.shape[0], z.shape[1])
        if clean is not None:
            z = torch.where(clean.fixed[..., None], self.clean_state(clean.ids).to(z.dtype), z)
        h = z + self.self_cond(torch.cat([z, x_sc], dim=-1))  # [B, L, D]
        if clean is not None:
            h = self.flagged(h, clean.fixed)
        h = self.backbone(self.proj_in(h), self.time_embed(gamma), padding)  # [B, L, W]
        residual = self.head(h).float()  # [B, L, V]
        if not self.analytic_skip:
            return residual
        # float32 upcast: at small sigma the skip reaches ~c_skip * alpha * D (tens of nats); bf16 would round it
        with torch.autocast(z.device.type, enabled=False):
            skip = c_skip(gamma.float())[:, None, None] * (z.float() @ self.embeddings().T)  # [B, L, V]
        return residual + skip

    def estimate(self, logits: torch.Tensor) -> torch.Tensor:
        """``x0_hat = softmax(logits) @ E_n`` ``[B, L, D]`` in float32 (the estimate feeds the ODE and the sampler)."""
        with torch.autocast(logits.device.type, enabled=False):
            return logits.float().softmax(-1) @ self.embeddings()

    # ---- training ---------------------------------------------------------------------------------------------
    def noisy(self, x0: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Native VP state ``z = alpha x0 + s eps`` ``[B, L, D]`` at ``gamma`` ``[B]``."""
        alpha, s = torch.sigmoid(-gamma).sqrt()[:, None, None], torch.sigmoid(gamma).sqrt()[:, None, None]
        return alpha * x0 + s * draws.randn_like(x0)

    def loss(self, batch: Batch) -> LossOutput:
        """CE per valid token plus the schedule's fit on the per-sequence mean CE (docs/math.md §3).

        ``gamma = gamma(u)`` with ``u`` from ``batch["u"]`` (low-discrepancy) and the schedule's parameters detached,
        so ``loc, scale, A`` learn only through ``fit_loss``. With probability ``self_condition`` per batch (global
        torch RNG) a no-grad pass supplies ``x_sc = x0_hat``, else ``x_sc = 0``. ``fit_loss`` is added with weight
        1: it is dimensionless and reaches only the schedule's parameters (see ``GumbelSchedule.fit_loss``).
        """
        x, padding = batch["input_ids"], batch["attention_mask"].bool()  # [B, L]
        gamma = self.schedule.gamma(training_u(batch).float())  # [B]
        x0 = self.clean_state(x)  # [B, L, D]
        z = self.noisy(x0, gamma)  # [B, L, D]
        clean = self.training_spans(x, padding)  # given positions: the clean embedding, flagged, not scored
        x_sc = torch.zeros_like(z)
        if draws.coin(self.self_condition):
            with torch.no_grad():
                x_sc = self.estimate(self.logits(z, gamma, x_sc, padding, clean))
        logits = self.logits(z, gamma, x_sc, padding, clean)  # [B, L, V]
        scored = padding if clean is None else padding & ~clean.fixed  # [B, L]
        ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none") * scored  # [B, L]
        tokens = scored.sum(1)  # [B]
        mean_ce = ce.sum() / tokens.sum().clamp_min(1)
        seq_ce = ce.sum(1) / tokens.clamp_min(1)  # [B]
        valid = tokens > 0 if clean is None else (tokens > 0) & ~clean.fixed.any(1)  # the fit reads unconditioned rows
        fit = self.schedule.fit_loss(gamma, seq_ce, valid=valid) if self.learn_schedule else mean_ce.new_zeros(())
        logs = {**self.schedule.logs(), "ce": mean_ce.detach(), "fit_loss": fit.detach()}
        return LossOutput(mean_ce + fit, ce, scored, logs)

    # ---- sampling view (cdlm.types.ContinuousObjective) -------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = exp(gamma(t) / 2)``, float64, increasing; sampler time ``t`` in [0, 1] (1 = noisiest)."""
        return self.schedule.sigma_of_t(t)

    def _native(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """VE state ``x~`` ``[B, L, D]`` and ``sigma`` (``[B]`` or scalar) to float32 ``z = x~ / sqrt(1 + sigma^2)``
        and ``gamma = 2 log sigma`` ``[B]``."""
        sigma = row_sigma(sigma, x)  # [B] float64
        z = x.to(torch.float64) / torch.sqrt(1 + sigma.square())[:, None, None]  # [B, L, D]
        return z.float(), (2 * sigma.log()).float()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat = softmax(logits) @ E_n`` ``[B, L, D]`` from the VE state ``x`` at ``sigma`` ``[B]``.

        ``x0_prev`` is the self-conditioning input (the previous estimate) or None (``x_sc = 0``).
        """
        z, gamma = self._native(x, sigma)
        x_sc = torch.zeros_like(z) if x0_prev is None else x0_prev.float()
        return self.estimate(self.logits(z, gamma, x_sc)).to(x.dtype)

    def decoder_logits(self, x: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, L, V]`` of the VE state ``x`` read at ``sigma_min``, self-conditioned on ``x0_prev``
        ``[B, L, D]`` (None: ``x_sc = 0``, as the ODE bound reads them)."""
        z, gamma = self._native(x, self.sigma_min)
        return self.logits(z, gamma, torch.zeros_like(z) if x0_prev is None else x0_prev.float())

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]``: the argmax of the logits at ``sigma_min`` (the decoder's mode).

        Unlike the nearest embedding (the skip term alone), this uses the context the network sees.
        """
        return self.decoder_logits(x).argmax(-1)

    def decode_final(self, x: torch.Tensor, x0_prev: torch.Tensor | None) -> torch.Tensor:
        """Token ids ``[B, L]`` of a sampler's final state ``x`` at ``sigma_min``: LangFlow's last pass, the network
        at ``sigma_min`` self-conditioned on the sampler's last clean estimate ``x0_prev`` (docs/math.md §3)."""
        return self.decoder_logits(x, x0_prev).argmax(-1)

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``-log p(ids | x)`` ``[B, L]`` from the logits at ``sigma_min`` (the ODE bound's decoder term); with
        ``ode_self_condition`` the second pass, self-conditioned on the first pass's estimate (as ``decode_final``)."""
        logits = self.decoder_logits(x)  # [B, L, V]
        if self.ode_self_condition:
            logits = self.decoder_logits(x, self.estimate(logits))
        return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")

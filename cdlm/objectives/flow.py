"""One-hot flow matching: FLM (Lee et al. 2026, "Flow map language models"), docs/math.md §2.

The state is the one-hot ``x0 = e_x`` in ``R^V`` per position on the linear path (FLM's interpolant)

    z = c x0 + (1 - c) eps,    c = 0 noise, c = 1 data,

handled by the shared samplers in the VE coordinates of docs/math.md §0 (``a = c``, ``b = 1 - c``):

    x~ = z / c = x0 + sigma eps,    sigma = (1 - c) / c.

The network reads ``z @ E`` (the token embedding applied to the dense state), is conditioned on ``log sigma``
and predicts ``x0`` as token logits; the loss is the x-prediction CE (FLM's flow-matching loss in its
cross-entropy form), ``x0_hat = softmax(f)``, optionally with the soft cap ``cap * tanh(f / cap)``. Sampler time
goes through the discrete-equivalent time ``c(t) = alpha^{-1}(1 - t)`` (``cdlm.objectives.time_warps``), so a
uniform ``t`` grid reveals tokens at the masked schedule's rate. FLM's native Euler step
``z <- z + (c' - c)(x0_hat - z)/(1 - c)`` is the VE Euler step of section 0. The likelihood is the ODE bound of
docs/math.md §6 (FLM's own code has none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cdlm import checks, draws
from cdlm.models.backbone import Backbone
from cdlm.models.embeddings import TimeEmbedding
from cdlm.objectives.chunked_ce import chunk_rows
from cdlm.objectives.clean_spans import CleanSpans
from cdlm.objectives.sigma_range import SigmaRange
from cdlm.objectives.time_warps import OneHotTimeWarp
from cdlm.objectives.training_time import training_u
from cdlm.objectives.ve import VEObjective, row_sigma
from cdlm.prompts import Prompt
from cdlm.types import Batch, LossOutput, StateProjection

# log sigma spans about [-2.1, 5.1] for V = 2048 at the default t range; x100 spreads it over ~700 rad of DiT's
# sinusoids, the per-unit scale LangFlow uses (50 per unit of gamma = 2 log sigma), so a sigma means the same to both.
LOG_SIGMA_EMBED_SCALE = 100.0
CPU_SCALE_ELEMENTS = 2**18  # elements per chunk of scale_rows on CPUs: 2 MiB of float64 temporaries


def scale_rows(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``c x`` rounded to float32 ``[B, L, V]`` for float64 ``c`` ``[B]`` and ``x`` ``[B, L, V]``: the product is
    formed in float64 and rounded once, a chunk of positions at a time (``chunk_rows``; on CPUs chunks of about
    ``CPU_SCALE_ELEMENTS``, whose float64 temporaries stay in cache and are reused by the allocator, where whole-batch
    ones would be fresh mappings to fault in at every call)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows, out_rows = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])  # [B L, V]
    scale = c.to(torch.float64).repeat_interleave(x.shape[1])[:, None]  # [B L, 1]
    step = chunk_rows(x.shape[-1])
    if x.device.type == "cpu":
        step = min(step, max(1, CPU_SCALE_ELEMENTS // x.shape[-1]))
    for part in row_slices(rows.shape[0], step):
        out_rows[part].copy_(scale[part] * rows[part].to(torch.float64))
    return out


def row_slices(rows: int, step: int) -> list[slice]:
    """Slices of ``step`` rows (the last may be shorter) covering ``rows`` rows."""
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class ScaleFloat32(torch.autograd.Function):
    """``z = float32(c x)`` with float64 products, and its backward ``float32(c g)`` the same way, chunk by chunk.

    The values are those of ``(c[:, None, None] * x.double()).float()`` and of autograd's backward through it, but
    no float64 ``[B, L, V]`` exists in either direction (the ODE bound differentiates the denoiser through it).
    """

    @staticmethod
    def forward(ctx, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(c)
        ctx.x_dtype = x.dtype
        return scale_rows(c, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (c,) = ctx.saved_tensors
        return None, scale_rows(c, grad).to(ctx.x_dtype)


def gram_factor(E: torch.Tensor) -> torch.Tensor:
    """``C`` ``[W, W]`` float32, lower triangular, with ``C C^T = E^T E`` for ``E`` ``[V, W]`` (Cholesky of the float64
    Gram matrix plus a 1e-9 relative jitter): ``g @ C^T`` (``g ~ N(0, I_W)``) has the law of ``eps @ E``,
    ``eps ~ N(0, I_V)``. ``cholesky_ex``: no host sync (an all-zero embedding, the one
    case the jitter does not cover, would give NaNs)."""
    gram = E.double().T @ E.double()  # [W, W]
    jitter = 1e-9 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.cholesky_ex(gram + jitter).L.float()


def check_flow(
    vocab_size: int, soft_cap: float | None, t_min: float, t_max: float, ode_steps: int, ode_rows: int | None = None
) -> None:
    """A clear error for an out-of-range ``OneHotFlow`` setting."""
    checks.at_least(2, vocab_size=vocab_size)  # the warp compares the true token with K - 1 others
    checks.finite(t_min=t_min, t_max=t_max)
    if not 0.0 < t_min < t_max < 1.0:
        raise checks.ArgumentError(f"need 0 < t_min < t_max < 1 so that sigma stays finite, got {t_min}, {t_max}")
    if soft_cap is not None and not (checks.is_real(soft_cap) and soft_cap > 0):
        raise checks.ArgumentError(f"soft_cap must be positive or None, got {soft_cap}")
    checks.positive_ints(ode_steps=ode_steps, **({} if ode_rows is None else {"ode_rows": ode_rows}))


class OneHotFlow(CleanSpans, SigmaRange, VEObjective, nn.Module):
    """FLM objective; owns the token embedding ``E`` ``[V, width]``, the time embedding, the head and the warp.

    Args:
        backbone: the shared transformer (bidirectional mask).
        vocab_size: ``V``; the state dimension is ``D = V`` and the warp uses ``K = V``.
        soft_cap: None, or ``cap`` for logits ``cap * tanh(f / cap)`` (FLM uses 30).
        t_min, t_max: sampler and training time are clamped to ``[t_min, t_max]`` before ``c(t)``, which keeps
            ``c`` in (0, 1) and ``sigma`` finite. For ``V = 2048``: ``sigma_min = 0.124`` (``c = 0.890``,
            ``1 - alpha = 1e-5``) and ``sigma_max = 170.2`` (``c = 0.0058``, ``alpha = 1e-5``).
        ode_steps: Heun steps of the ODE bound in ``nll``; 32 keeps validation fast, 128 is the published default
            (docs/math.md §6) for reported numbers.
        matched_filter: add the exact Gaussian log-likelihood of each token, ``x~_v / sigma^2`` in VE coordinates,
            to the logits (off = FLM as published). With ``W < V`` the input map ``z @ E`` cannot carry a token's
            identity at low noise (the projected noise swamps it), so FLM's denoiser stays unsure where the exact
            posterior is certain; the filter gives the network the evidence of its own position exactly, as
            LangFlow's skip and CoBit's residual do, and the network learns the context on top. Training then
            forms the ``[B, L, V]`` state (one head-sized matmul more per step).
        ode_rows: sequences per ODE solve in ``nll`` (None = the whole batch at once). The bound holds float64
            ``[rows, L, V]`` states and differentiates the network over them (docs/runs.md, "Memory"); at GPT-2's
            ``V`` a few rows at a time keep validation within memory. The noise is then drawn chunk by chunk, so the
            figures differ from a whole-batch solve by the bound's sampling noise only.
        ode_probes: Hutchinson probes per sequence in ``nll``, all on one ODE trajectory (one forward, ``ode_probes``
            vector-Jacobian products per evaluation); ``>= 2`` also reports the bound's standard error ``nll_se``.
        condition_rate: the fraction of training rows that keep clean spans (a prefix or scattered positions), read
            by the network as ``E[x]`` (the input map of the clean one-hot) plus a learned flag and not scored, so
            that a prompt can be given clean at sampling time (``cdlm.objectives.clean_spans``; docs/math.md §3,
            "Conditional training"). 0: unconditional (FLM as published; prompts by replacement only).

    The clean state is one-hot: each coordinate has mean ``1/V`` and std ``sqrt((1/V)(1 - 1/V))``. ``prior`` and
    ``nll`` (the ODE bound) are ``VEObjective``'s. FLM itself starts from ``z = (1 - c) eps`` at ``c -> 0``, i.e.
    ``x~ = sigma_max eps``; the prior's data mean and variance are negligible at ``sigma_max`` (170 for
    ``V = 2048``) and make it the Gaussian the bound scores.
    """

    space = "continuous"

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        soft_cap: float | None = None,
        t_min: float = 1e-5,
        t_max: float = 1 - 1e-5,
        ode_steps: int = 32,
        matched_filter: bool = False,
        ode_rows: int | None = None,
        ode_probes: int = 1,
        condition_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_flow(vocab_size, soft_cap, t_min, t_max, ode_steps, ode_rows)
        checks.positive_ints(ode_probes=ode_probes)
        self.backbone, self.vocab_size, self.soft_cap = backbone, vocab_size, soft_cap
        self.t_min, self.t_max, self.ode_steps, self.matched_filter = t_min, t_max, ode_steps, matched_filter
        self.ode_rows, self.ode_probes = ode_rows, ode_probes
        self.data_mean = 1.0 / vocab_size
        self.data_scale = math.sqrt((1.0 / vocab_size) * (1.0 - 1.0 / vocab_size))
        self.warp = OneHotTimeWarp(vocab_size)
        width = backbone.width
        self.embed = nn.Embedding(vocab_size, width)  # E, applied to the dense state as z @ E
        nn.init.normal_(self.embed.weight, std=0.02)
        self.time_embed = TimeEmbedding(backbone.cond_width, scale=LOG_SIGMA_EMBED_SCALE)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.init_clean_spans(condition_rate, width)  # the flag marks positions given clean (zero at init)

    @property
    def state_width(self) -> int:
        """``D = V``: the one-hot state has one coordinate per token."""
        return self.vocab_size

    # ---- the network ------------------------------------------------------------------------------------------
    def logits(
        self, z: torch.Tensor, log_sigma: torch.Tensor, padding: torch.Tensor | None = None, clean: Prompt | None = None
    ) -> torch.Tensor:
        """Token logits ``[B, L, V]`` (float32) for the native state ``z`` ``[B, L, V]`` at ``log_sigma`` ``[B]``;
        ``clean``: positions read clean (``network``)."""
        logits = self.network(self.input_map(z), log_sigma, padding, clean=clean)  # [B, L, V]
        return logits + self.evidence(z, log_sigma) if self.matched_filter else logits

    def input_map(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ E`` ``[B, L, W]`` (float32) for the dense native state ``z`` ``[B, L, V]``."""
        # float32 input map: at high noise the token signal c e_x is ~1/50 of the noise projection (1-c) eps @ E,
        # about the size of bf16's rounding of that 2048-term sum
        with torch.autocast(z.device.type, enabled=False):
            return z.float() @ self.embed.weight.float()  # [B, L, W]

    @staticmethod
    def evidence(z: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """``log N(x~; e_v, sigma^2 I)`` over ``v`` up to a per-position constant: ``x~_v / sigma^2``, with
        ``x~ = z / c = (1 + sigma) z``. ``[B, L, V]`` float32 from the native ``z`` ``[B, L, V]`` and ``log_sigma``
        ``[B]``.
        """
        sigma = log_sigma.double().exp()[:, None, None]  # [B, 1, 1]
        with torch.autocast(z.device.type, enabled=False):
            return z.float() * ((1 + sigma) / sigma.square()).float()

    def network(
        self,
        h: torch.Tensor,
        log_sigma: torch.Tensor,
        padding: torch.Tensor | None = None,
        clean: Prompt | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` from the projected input ``h = z @ E`` ``[B, L, W]``; ``clean``: the positions read
        clean (``given_clean``)."""
        h = self.given_clean(h, clean)
        return self.readout(self.backbone(h, self.time_embed(log_sigma.float()), padding))

    def given_clean(self, h: torch.Tensor, clean: Prompt | None) -> torch.Tensor:
        """The network input ``h`` ``[B, L, W]`` with the clean positions (``CleanSpans.spans``: ``clean`` in
        training, else the sampler's prompt for a model trained with clean spans) set to ``E[x]``, the input map of
        the clean one-hot, and flagged."""
        clean = self.spans(clean, h.shape[0], h.shape[1])
        if clean is None:
            return h
        with torch.autocast(h.device.type, enabled=False):
            e = F.embedding(clean.ids, self.embed.weight.float())  # [B, L, W]
        return self.flagged(torch.where(clean.fixed[..., None], e.to(h.dtype), h), clean.fixed)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, L, V]`` from the backbone output ``[B, L, W]``, soft-capped if ``soft_cap``."""
        f = self.head(h).float()  # [B, L, V]
        return f if self.soft_cap is None else self.soft_cap * torch.tanh(f / self.soft_cap)

    def noisy_input(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``z @ E`` ``[B, L, W]`` for ``z = c onehot(x) + (1 - c) eps`` without forming the ``[B, L, V]`` state.

        ``eps @ E`` with ``eps ~ N(0, I_V)`` is Gaussian with covariance ``E^T E``, so it is drawn as ``g @ C^T``
        with ``C C^T = E^T E`` (Cholesky, float64) and ``g ~ N(0, I_W)``: the same distribution of the network
        input, and a reparameterisation that still trains ``E``, at ``W/V`` of the cost. ``c`` is ``[B, 1, 1]``.
        """
        with torch.autocast(x.device.type, enabled=False):
            E = self.embed.weight.float()  # [V, W]
            g = draws.randn(*x.shape, E.shape[1], device=x.device)  # [B, L, W]
            return c * E[x] + (1 - c) * (g @ gram_factor(E).T)  # [B, L, W]

    # ---- time ---------------------------------------------------------------------------------------------------
    def c_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """``c(t) = alpha^{-1}(1 - t)`` with ``t`` clamped to ``[t_min, t_max]``; float64, decreasing in ``t``."""
        return self.warp.c_of_t(t.to(torch.float64).clamp(self.t_min, self.t_max))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = (1 - c(t)) / c(t)``, float64, increasing; sampler time ``t`` in [0, 1] (1 = noisiest)."""
        c = self.c_of_t(t)
        return ((1 - c) / c).to(t.device)

    # ---- training -----------------------------------------------------------------------------------------------
    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        """``x0 = onehot(ids)`` ``[B, L, V]`` float32 (the same point in native and VE coordinates)."""
        return F.one_hot(ids, self.vocab_size).float()

    def loss(self, batch: Batch) -> LossOutput:
        """x-prediction CE per valid token at ``c = c(t)``, ``t = u`` (``batch["u"]``, low-discrepancy).

        ``z = c onehot(x) + (1 - c) eps`` (FLM's interpolant), fed to the network as ``z @ E`` drawn directly in
        width ``W`` (``noisy_input``); the CE is averaged over ``attention_mask``, less the positions given clean
        when ``condition_rate > 0`` (``CleanSpans.training_spans``).
        """
        x, padding = batch["input_ids"], batch["attention_mask"].bool()  # [B, L]
        c = self.c_of_t(training_u(batch))  # [B] float64
        log_sigma = torch.log((1 - c) / c).float()  # [B]
        c = c.float()[:, None, None]  # [B, 1, 1]
        clean = self.training_spans(x, padding)
        if self.matched_filter:  # the filter needs the dense state
            onehot = self.clean_state(x)  # [B, L, V]
            logits = self.logits(c * onehot + (1 - c) * draws.randn_like(onehot), log_sigma, padding, clean)
        else:
            logits = self.network(self.noisy_input(x, c), log_sigma, padding, clean=clean)  # [B, L, V]
        scored = padding if clean is None else padding & ~clean.fixed  # [B, L]
        ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none") * scored  # [B, L]
        loss = ce.sum() / scored.sum().clamp_min(1)
        return LossOutput(loss, ce, scored, {"c": c.mean().detach()})

    # ---- sampling view (cdlm.types.ContinuousObjective) ---------------------------------------------------------
    def _native(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """VE state ``x~`` ``[B, L, V]`` and ``sigma`` (``[B]`` or scalar) to the float32 native state ``z = c x~``,
        ``c = 1 / (1 + sigma)``, and ``log sigma`` ``[B]``."""
        sigma = row_sigma(sigma, x)  # [B] float64
        c = 1 / (1 + sigma)  # [B]
        return ScaleFloat32.apply(c, x), sigma.log().float()  # z = c x~ [B, L, V]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat = softmax(logits)`` ``[B, L, V]`` float32 from the VE state ``x`` at ``sigma`` ``[B]``.

        ``x0_prev`` is accepted for the shared signature and ignored: FLM has no self-conditioning.
        """
        z, log_sigma = self._native(x, sigma)
        return self.logits(z, log_sigma).softmax(-1)

    def decoder_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, V]`` of the VE state ``x`` read at ``sigma_min``."""
        z, log_sigma = self._native(x, self.sigma_min)
        return self.logits(z, log_sigma)

    # ---- the projected sampling view (cdlm.types.ProjectedState) -----------------------------------------------
    def state_projection(self) -> StateProjection | None:
        """``P = E`` ``[V, W]`` and ``M = C^T`` (``C C^T = E^T E``; float32, detached): without the matched filter
        the network reads the one-hot state only through ``z @ E``, so the samplers may keep ``x @ E`` (docs/math.md
        §0, "Projected state"). None with the filter (it reads every coordinate) or when ``W >= V``."""
        weight = self.embed.weight
        if self.matched_filter or weight.shape[1] >= weight.shape[0]:
            return None
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)  # the weights as they are now
        cached = getattr(self, "_projection", None)
        if cached is None or cached[0] != key:  # one factorisation per set of weights, not per call
            with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                E = weight.detach().float()  # [V, W]
                self._projection = key, StateProjection(E, gram_factor(E).T.contiguous())
        return self._projection[1]

    def prior_projected(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``prior(n, length) @ E`` in law, ``[n, length, W]`` float32: ``data_mean (1 @ E) + std g @ C^T`` with
        ``g ~ N(0, I_W)`` (``W`` draws a position instead of ``V``)."""
        projection = self.state_projection()
        if projection is None:
            raise ValueError("prior_projected needs a projected state (no matched filter and width < vocab_size)")
        std = math.sqrt(self.sigma_max**2 + self.data_scale**2)
        g = torch.randn(n, length, projection.matrix.shape[1], device=device, generator=generator)  # [n, L, W]
        with torch.autocast(g.device.type, enabled=False):
            mean = self.data_mean * projection.matrix.sum(0)  # [W]: data_mean (1 @ E)
            return (g @ projection.noise).mul_(std).add_(mean)

    def projected_input(self, y: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """The network input ``z @ E = c (x @ E)`` ``[B, L, W]`` (float32, products in float64) and ``log sigma``
        ``[B]`` from the projected VE state ``y = x @ E`` ``[B, L, W]`` at ``sigma`` (``[B]`` or scalar)."""
        sigma = row_sigma(sigma, y)  # [B] float64
        c = (1 / (1 + sigma))[:, None, None]  # [B, 1, 1]
        return (c * y.double()).float(), sigma.log().float()

    def denoise_projected(
        self, y: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, x0_hat @ E)``: ``[B, L, V]`` and ``[B, L, W]`` float32 from ``y = x @ E`` ``[B, L, W]`` at
        ``sigma`` ``[B]``; ``x0_hat`` is ``denoise(x, sigma)``'s (``x0_prev`` ignored, as there)."""
        h, log_sigma = self.projected_input(y, sigma)
        x0 = self.network(h, log_sigma).softmax(-1)  # [B, L, V]
        return x0, self.input_map(x0)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]``: the argmax of the final state (or of the final ``x0_hat``) over ``V``."""
        return x.argmax(-1)

    def decode_confidence(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode`` of a clean estimate ``x0`` ``[B, L, V]`` (on the simplex) and its probability ``[B, L]``, for
        traces (``cdlm.trace``)."""
        confidence, ids = x0.max(-1)
        return ids, confidence.clamp(0.0, 1.0)

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``-log p(ids | x)`` ``[B, L]`` (the ODE bound's decoder term): the network's logits at ``sigma_min`` times
        the exact Gaussian likelihood of ``x`` under each token, ``softmax(logits + x / sigma_min^2)`` (already the
        logits when ``matched_filter``). Any normalised decoder keeps the bound valid; at ``sigma_min`` the
        likelihood makes this one near-certain where the network alone, reading ``x @ E``, is not.
        """
        logits = self.decoder_logits(x)  # [B, L, V]
        if not self.matched_filter:
            logits = logits + x.float() / self.sigma_min**2
        return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")

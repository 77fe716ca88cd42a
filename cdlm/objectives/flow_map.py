"""FMLM: the flow map of a one-hot flow, distilled from an FLM teacher (Lee et al. 2026, "Flow map language models").

docs/math.md §2. Times here are FMLM's ``c`` units (``c = 0`` noise, ``c = 1`` data) with ``s <= t``; each is the
image ``c = c(tau)`` of a sampler time ``tau`` (1 = noise, 0 = data) under FLM's information-uniform warp
(``OneHotFlow.c_of_t``), so ``tau_s >= tau_t``. The two-time denoiser ``D_{s,t}(z)`` is the FLM network with a second
time embedding, of the target time ``t``, added to its adaLN conditioning, and the flow map is

    X_{s->t}(z) = ((1 - t) / (1 - s)) z + ((t - s) / (1 - s)) D_{s,t}(z),

which in the VE coordinates of docs/math.md §0 (``x~ = z / c``, ``sigma = (1 - c) / c``) is exactly the DDIM step
``x~_t = D + (sigma_t / sigma_s)(x~_s - D)`` with ``D = D_{s,t}`` (``cdlm.samplers.continuous.euler_step``).

The second embedding enters as ``g(log sigma_t) - g(log sigma_s)``: the conditioning is
``f(s) + g(t) - g(s)``, the same function class as ``f(s) + g(t)`` (take ``f - g`` for ``f``), but ``D_{s,s}`` is the
one-time FLM network for every value of the weights, so the diagonal sampling view, the ODE bound and the euler /
heun / churn samplers run the plain FLM denoiser. ``g``'s last layer is zero-initialised, so at initialisation
``D_{s,t} = D_s`` for every ``t``: the student starts as its teacher.

Training (``loss``), one batch split by rows:

- diagonal (``s = t``, ``diagonal_fraction`` = 0.5): soft-target CE against the frozen teacher's ``sg[D_t]``;
- boundary (``s = 0``, ``t = 1``, ``boundary_fraction`` = 0.5 / 32): the one-jump map, a self-distillation row like
  the next;
- off-diagonal (the rest): with ``u`` the midpoint of ``s`` and ``t`` in sampler time (the jump split into two
  halves that reveal equally many tokens) and ``lambda = (1 - t)(u - s) / ((1 - u)(t - s))``, the target
  ``sg[lambda D_{s,u}(z) + (1 - lambda) D_{u,t}(X_{s->u}(z))]`` computed by the student without gradient, so that
  ``X_{s->t} = X_{u->t} o X_{s->u}``; soft-target CE of ``D_{s,t}(z)``.

"0" and "1" are the ends of the clamped sampler time, ``c(t_max)`` and ``c(t_min)``, as everywhere in FLM.
"""

from __future__ import annotations

import torch
from torch import nn

from cdlm import draws
from cdlm.checks import ArgumentError, is_real
from cdlm.models.backbone import Backbone
from cdlm.models.embeddings import TimeEmbedding
from cdlm.objectives.flow import LOG_SIGMA_EMBED_SCALE, OneHotFlow
from cdlm.objectives.teacher import FrozenTeacher, state_differences
from cdlm.objectives.training_time import training_u
from cdlm.objectives.ve import row_sigma
from cdlm.prompts import Prompt
from cdlm.types import Batch, LossOutput

DIAGONAL, JUMP, BOUNDARY = 0, 1, 2  # row kinds of a training batch
SETTINGS = ("vocab_size", "soft_cap", "t_min", "t_max", "matched_filter", "condition_rate")  # must equal the teacher's
BACKBONE_SETTINGS = ("width", "depth", "heads", "cond_width", "mask_mode", "block_size")


class FlowMap(OneHotFlow):
    """FMLM objective: FLM's network and warp plus a zero-initialised target-time embedding ``g``; docs/math.md §2.

    Args:
        backbone, vocab_size, soft_cap, t_min, t_max, ode_steps, matched_filter, condition_rate: as ``OneHotFlow``;
            they must equal the teacher's (checked when the teacher is attached), so that the student starts as the
            teacher. With ``condition_rate > 0`` the student trains on the same kind of clean spans, given to the
            teacher and to both halves of the bootstrap target, and reads a sampler's prompt clean.
        teacher: path of the FLM teacher run (a ``save_pretrained`` folder or a ``.ckpt``). The run builder loads it
            (``cdlm.checkpoint.load_frozen``: a missing path fails there, before any work) and passes it as
            ``teacher_model``; the constructor never reads disk.
        teacher_model: the loaded teacher (injected): checked, copied into the student and kept frozen for the
            diagonal targets. None inside ``cdlm.load``, which replaces the weights, so a student checkpoint loads
            and samples without its teacher (training and resuming need it), or for a student built in code (attach
            one with ``attach_teacher``; ``loss`` refuses to run without).
        diagonal_fraction: share of the rows trained on the diagonal against the teacher (FMLM: 0.5).
        boundary_fraction: share of the rows at the one-jump pair ``(s, t) = (0, 1)`` (FMLM: 0.5 / 32).
        ode_probes: as ``OneHotFlow`` (Hutchinson probes of the bound; need not equal the teacher's).

    The teacher is never saved: a student checkpoint holds the student's weights (the FLM network plus ``g``) and its
    config, which is all sampling and the likelihood bound need.
    """

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        teacher: str | None = None,
        soft_cap: float | None = None,
        t_min: float = 1e-5,
        t_max: float = 1 - 1e-5,
        ode_steps: int = 32,
        matched_filter: bool = False,
        diagonal_fraction: float = 0.5,
        boundary_fraction: float = 0.5 / 32,
        teacher_model: OneHotFlow | None = None,
        ode_probes: int = 1,
        condition_rate: float = 0.0,
    ) -> None:
        super().__init__(
            backbone,
            vocab_size,
            soft_cap,
            t_min,
            t_max,
            ode_steps,
            matched_filter,
            ode_probes=ode_probes,
            condition_rate=condition_rate,
        )
        fractions = (diagonal_fraction, boundary_fraction)
        if not (all(is_real(f) and f >= 0 for f in fractions) and sum(fractions) <= 1):
            raise ArgumentError(
                "need diagonal_fraction, boundary_fraction >= 0 with a sum <= 1, "
                f"got {diagonal_fraction} and {boundary_fraction}"
            )
        self.diagonal_fraction, self.boundary_fraction = diagonal_fraction, boundary_fraction
        self.target_embed = TimeEmbedding(backbone.cond_width, scale=LOG_SIGMA_EMBED_SCALE)  # g
        nn.init.zeros_(self.target_embed.mlp[-1].weight)  # g = 0 at init: D_{s,t} = D_s
        nn.init.zeros_(self.target_embed.mlp[-1].bias)
        self.teacher_path, self.frozen = teacher, FrozenTeacher()
        if teacher_model is not None:
            self.attach_teacher(teacher_model)

    # ---- the teacher --------------------------------------------------------------------------------------------
    def attach_teacher(self, teacher: OneHotFlow, model_config: dict | None = None, initialise: bool = True) -> None:
        """Check that ``teacher`` has this objective's settings and weights' shapes, copy its weights into the student
        (``initialise``) and keep it frozen, outside the module tree. ``model_config``: the teacher's ``model``
        config, quoted in the error message."""
        hint = f"; the teacher's model config: {model_config}" if model_config else ""
        if not isinstance(teacher, OneHotFlow):
            raise ValueError(f"a FlowMap teacher must be a OneHotFlow (objective=flow), got {type(teacher).__name__}")
        pairs = [(k, getattr(teacher, k), getattr(self, k)) for k in SETTINGS]
        pairs += [(f"backbone.{k}", getattr(teacher.backbone, k), getattr(self.backbone, k)) for k in BACKBONE_SETTINGS]
        diffs = [f"{k}: teacher {a!r} vs student {b!r}" for k, a, b in pairs if a != b]
        own, theirs = self.state_dict(), teacher.state_dict()
        diffs += [d for d in state_differences(own, theirs) if not d.startswith("target_embed.")]  # g is FMLM's own
        if diffs:
            raise ValueError(f"the FlowMap student does not match its teacher: {diffs[:6]}{hint}")
        if initialise:
            self.load_state_dict(theirs, strict=False)
        self.frozen.attach(teacher)

    def teacher(self, device: torch.device) -> OneHotFlow:
        """The frozen teacher on ``device``; an error if there is none (training needs it, sampling does not)."""
        if self.frozen.objective is None:
            raise ValueError(
                f"FlowMap trains against its FLM teacher, but none is attached (teacher={self.teacher_path!r}; "
                "cdlm.load does not read it). Train through the config with objective.teacher set to a flow run "
                "(e.g. runs/flow_quickstart/final), or call attach_teacher."
            )
        return self.frozen.on(device)

    # ---- the two-time network -----------------------------------------------------------------------------------
    def network(
        self,
        h: torch.Tensor,
        log_sigma: torch.Tensor,
        padding: torch.Tensor | None = None,
        log_sigma_target: torch.Tensor | None = None,
        clean: Prompt | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` of ``D_{s,t}`` from ``h = z @ E`` ``[B, L, W]`` at ``log sigma_s`` ``[B]``; the target
        ``log sigma_t`` ``[B]`` adds ``g(log sigma_t) - g(log sigma_s)`` to the conditioning (None: the diagonal).
        ``clean``: the positions read clean (``OneHotFlow.given_clean``)."""
        h = self.given_clean(h, clean)
        cond = self.time_embed(log_sigma.float())  # [B, C]
        if log_sigma_target is not None:
            g_t, g_s = self.target_embed(torch.cat([log_sigma_target, log_sigma]).float()).chunk(2)  # 2 x [B, C]
            cond = cond + (g_t - g_s)
        return self.readout(self.backbone(h, cond, padding))

    def map_logits(
        self,
        z: torch.Tensor,
        log_sigma_s: torch.Tensor,
        log_sigma_t: torch.Tensor,
        padding: torch.Tensor | None = None,
        clean: Prompt | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` (float32) of ``D_{s,t}(z)`` for the native state ``z`` ``[B, L, V]`` at time ``s``;
        ``clean``: the positions read clean."""
        logits = self.network(self.input_map(z), log_sigma_s, padding, log_sigma_t, clean)  # [B, L, V]
        return logits + self.evidence(z, log_sigma_s) if self.matched_filter else logits

    def bootstrap_target(
        self,
        z: torch.Tensor,
        tau_s: torch.Tensor,
        tau_t: torch.Tensor,
        padding: torch.Tensor | None = None,
        clean: Prompt | None = None,
    ) -> torch.Tensor:
        """``lambda D_{s,u}(z) + (1 - lambda) D_{u,t}(X_{s->u}(z))`` ``[B, L, V]``, on the simplex, computed by the
        student at the sampler-time midpoint ``tau_u = (tau_s + tau_t) / 2``; ``z`` ``[B, L, V]`` is native at ``s``,
        ``tau_s >= tau_t`` are ``[B]``; ``clean``: the positions read clean in both calls. Call it under
        ``torch.no_grad()`` for the stop-gradient target.
        """
        tau_u = (tau_s + tau_t) / 2
        c_s, c_u, c_t = self.c_of_t(tau_s), self.c_of_t(tau_u), self.c_of_t(tau_t)  # [B] float64
        d_su = self.map_logits(z, log_sigma_of_c(c_s), log_sigma_of_c(c_u), padding, clean).softmax(-1)  # [B, L, V]
        y = flow_map(z, d_su, c_s, c_u)  # X_{s->u}(z) [B, L, V]
        d_ut = self.map_logits(y, log_sigma_of_c(c_u), log_sigma_of_c(c_t), padding, clean).softmax(-1)  # [B, L, V]
        lam = jump_weight(c_s, c_u, c_t).float()[:, None, None]  # [B, 1, 1]
        return lam * d_su + (1 - lam) * d_ut

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        """Soft-target CE of ``D_{s,t}(z)`` per valid token over the diagonal / boundary / off-diagonal rows.

        ``z = c_s onehot(x) + (1 - c_s) eps`` (dense: the targets need the state itself). Times: ``time_pairs`` from
        ``batch["u"]`` (low-discrepancy). ``loss`` and ``nll`` ``[B, L]`` report the CE less the targets' entropy, i.e.
        ``KL(target || D_{s,t})``: the same gradient as the CE (the targets carry none), but 0 at a perfect fit, where
        the CE's floor moves with the bootstrap targets and would hide progress. Logs the CE itself (``ce``) and the
        KL per row kind (``kl_diagonal``, ``kl_jump`` = off-diagonal and boundary rows). With ``condition_rate > 0``
        the rows' clean spans (``CleanSpans.training_spans``) are read clean by the teacher and the student alike and
        are not scored.
        """
        x, padding = batch["input_ids"], batch["attention_mask"].bool()  # [B, L]
        teacher = self.teacher(x.device)
        u = training_u(batch)
        kind = row_kinds(x.shape[0], self.diagonal_fraction, self.boundary_fraction, x.device)  # [B]
        tau_s, tau_t = time_pairs(u, kind)  # [B] float64 each
        c_s, c_t = self.c_of_t(tau_s), self.c_of_t(tau_t)  # [B] float64, c_s <= c_t
        onehot = self.clean_state(x)  # [B, L, V]
        a = c_s.float()[:, None, None]  # [B, 1, 1]
        z = a * onehot + (1 - a) * draws.randn_like(onehot)  # [B, L, V]
        diag = kind == DIAGONAL
        clean = self.training_spans(x, padding)
        with torch.no_grad():
            target = torch.empty_like(z)  # [B, L, V]
            if diag.any():
                logits = teacher.logits(z[diag], log_sigma_of_c(c_s[diag]), padding[diag], row_subset(clean, diag))
                target[diag] = logits.softmax(-1)
            if (~diag).any():
                rest = ~diag
                spans = row_subset(clean, rest)
                target[rest] = self.bootstrap_target(z[rest], tau_s[rest], tau_t[rest], padding[rest], spans)
        logits = self.map_logits(z, log_sigma_of_c(c_s), log_sigma_of_c(c_t), padding, clean)  # [B, L, V]
        scored = padding if clean is None else padding & ~clean.fixed  # [B, L]
        ce = -(target * logits.log_softmax(-1)).sum(-1) * scored  # [B, L] soft-target CE
        kl = ce - torch.special.entr(target).sum(-1) * scored  # [B, L]: the CE less its floor, the targets' entropy
        logs = {
            "ce": _mean(ce, scored),
            "kl_diagonal": _mean(kl, scored & diag[:, None]),
            "kl_jump": _mean(kl, scored & ~diag[:, None]),
        }
        return LossOutput(kl.sum() / scored.sum().clamp_min(1), kl, scored, logs)

    # ---- sampling view (cdlm.types.FlowMapObjective) ------------------------------------------------------------
    def flow_denoise(self, x: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        """``D_{s,t}`` ``[B, L, V]`` float32 (on the simplex) from the VE state ``x`` ``[B, L, V]`` at ``sigma_s``.

        ``sigma_t <= sigma_s`` is the target level (both ``[B]`` or scalars); ``sigma_t = sigma_s`` gives ``denoise``.
        The jump itself is ``euler_step(x, D_{s,t}, sigma_s, sigma_t)`` (see the module docstring).
        """
        z, log_sigma_s = self._native(x, sigma_s)
        sigma_t = row_sigma(sigma_t, x)  # [B] float64
        return self.map_logits(z, log_sigma_s, sigma_t.log().float()).softmax(-1)

    def flow_denoise_projected(
        self, y: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_{s,t}, D_{s,t} @ E)``: ``[B, L, V]`` and ``[B, L, W]`` float32 from the projected state ``y = x @ E``
        ``[B, L, W]`` at ``sigma_s`` (``cdlm.types.ProjectedFlowMap``; docs/math.md §0, "Projected state")."""
        h, log_sigma_s = self.projected_input(y, sigma_s)
        sigma_t = row_sigma(sigma_t, y)  # [B] float64
        d = self.network(h, log_sigma_s, None, sigma_t.log().float()).softmax(-1)  # [B, L, V]
        return d, self.input_map(d)


# ---- the pieces of the objective, as functions ----------------------------------------------------------------------
def row_subset(clean: Prompt | None, rows: torch.Tensor) -> Prompt | None:
    """The ``rows`` ``[B]`` (bool) of a batch's clean spans (None stays None)."""
    return None if clean is None else Prompt(clean.ids[rows], clean.fixed[rows])


def log_sigma_of_c(c: torch.Tensor) -> torch.Tensor:
    """``log sigma = log((1 - c) / c)`` float32 ``[B]`` from ``c`` ``[B]`` (float64)."""
    return torch.log((1 - c) / c).float()


def flow_map(z: torch.Tensor, d: torch.Tensor, c_s: torch.Tensor, c_t: torch.Tensor) -> torch.Tensor:
    """``X_{s->t}(z) = ((1 - t)/(1 - s)) z + ((t - s)/(1 - s)) D`` in ``c`` units (FMLM; docs/math.md §2).

    ``z``, ``d`` ``[B, L, V]``; ``c_s <= c_t`` ``[B]`` (float64, ``c_s < 1``); returns ``[B, L, V]`` in ``z``'s dtype.
    """
    keep = ((1 - c_t) / (1 - c_s)).to(z.dtype)[:, None, None]  # [B, 1, 1]
    return keep * z + (1 - keep) * d  # (t - s)/(1 - s) = 1 - (1 - t)/(1 - s)


def jump_weight(c_s: torch.Tensor, c_u: torch.Tensor, c_t: torch.Tensor) -> torch.Tensor:
    """``lambda = (1 - t)(u - s) / ((1 - u)(t - s))`` ``[B]`` in [0, 1] for ``s <= u <= t < 1`` in ``c`` units.

    The weight that makes ``X_{u->t}(X_{s->u}(z))`` a flow-map step from ``s`` with
    ``D = lambda D_{s,u} + (1 - lambda) D_{u,t}`` (docs/math.md §2); 1/2 where ``t = s``, where any value works.
    """
    num, den = (1 - c_t) * (c_u - c_s), (1 - c_u) * (c_t - c_s)
    return torch.where(den > 0, num / den.clamp_min(1e-300), 0.5).clamp(0.0, 1.0)


def evenly_spread(n: int, fraction: float, offset: float) -> torch.Tensor:
    """Bool ``[n]``: row ``i`` is picked iff ``floor((i + 1) f + offset) > floor(i f + offset)``.

    ``floor(n f + offset)`` rows, i.e. ``n f`` in expectation over ``offset ~ U(0, 1)``, spread evenly along the rows,
    so the picked rows keep the low-discrepancy spacing of ``batch["u"]``.
    """
    k = torch.floor(torch.arange(n + 1, dtype=torch.float64) * fraction + offset)  # [n + 1]
    return k[1:] > k[:-1]


def row_kinds(n: int, diagonal_fraction: float, boundary_fraction: float, device: torch.device | str) -> torch.Tensor:
    """``[n]`` long: ``DIAGONAL``, ``BOUNDARY`` or ``JUMP`` (off-diagonal) per row, in the expected fractions.

    Diagonal rows are spread evenly over the batch (every other row at 0.5), boundary rows evenly over the rest; the
    counts round stochastically (global RNG), so e.g. 32 rows hold a boundary row half of the time.
    """
    offsets = torch.rand(2, dtype=torch.float64).tolist()
    diag = evenly_spread(n, diagonal_fraction, offsets[0])  # [n]
    kind = torch.full((n,), JUMP, dtype=torch.long)
    kind[diag] = DIAGONAL
    if diagonal_fraction < 1:
        rest = (~diag).nonzero().squeeze(-1)  # [m]
        boundary = evenly_spread(len(rest), boundary_fraction / (1 - diagonal_fraction), offsets[1])  # [m]
        kind[rest[boundary]] = BOUNDARY
    return kind.to(device)


def time_pairs(u: torch.Tensor, kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler times ``(tau_s, tau_t)`` ``[B]`` float64, ``tau_s >= tau_t``, from ``u`` ``[B]`` and the row kinds.

    Diagonal: ``tau_s = tau_t = u``. Boundary: ``(1, 0)``. Off-diagonal: the jump length ``tau_s - tau_t = u`` and its
    start uniform over the ``1 - u`` that fit. Jump lengths are then uniform (stratified by ``u``): the sampler's
    jumps ``1/K`` for ``K = 1..32`` are all trained, where pairs uniform on the triangle would thin out long jumps
    (density ``2(1 - u)``). All in sampler time, i.e. information-uniform: ``c = c(tau)`` reveals tokens at a
    uniform rate, and the midpoint ``(tau_s + tau_t) / 2`` halves the tokens a jump reveals.
    """
    u = u.to(torch.float64)
    tau_s = 1 - draws.rand_like(u) * (1 - u)  # [B]: start such that tau_t = tau_s - u >= 0
    tau_t = tau_s - u
    diag, boundary = kind == DIAGONAL, kind == BOUNDARY
    tau_s = torch.where(diag, u, torch.where(boundary, 1.0, tau_s))
    tau_t = torch.where(diag, u, torch.where(boundary, 0.0, tau_t))
    return tau_s, tau_t.clamp_min(0.0)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum().detach() / mask.sum().clamp_min(1)

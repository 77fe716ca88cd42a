"""Consistency distillation of a masked (MDLM) checkpoint with nested masks: CD4LM's DSCD (docs/math.md §1, 7).

Liang et al., 2026, "CD4LM: Consistency Distillation and aDaptive Decoding for Diffusion Language Models"
(arXiv:2601.02236), Discrete-Space Consistency Distillation; docs/math.md §7, "Few-step training for discrete
models". A student, initialised as a copy of a frozen MDLM teacher, learns to predict from a heavily masked state
what the teacher predicts from a less masked state of the *same* forward trajectory, so that one network call
from a noisy state lands where several teacher steps would: the property few-step samplers need.

Per sequence with ``n`` valid (non-padding) tokens:

- the student masks ``n_S = round(r_S n)`` positions chosen uniformly, ``r_S ~ U(0.4, 0.9)`` (from the batch's
  low-discrepancy ``u`` when given; docs/math.md §0);
- the teacher masks the first ``n_T = floor(k n_S)`` of them (in the same random order), ``k ~ U(0.3, 0.7)``:
  teacher-masked ⊆ student-masked, i.e. the teacher's state is a less noisy point of the same forward trajectory;
- on the student-masked positions ``M_S`` (mean over them):

      loss = λ T² KL(softmax(ℓ_T / T) || softmax(ℓ_S / T)) + (1 - λ) CE(softmax(ℓ_S), x),   T = 2, λ = 0.5,

  with ``ℓ_T`` the teacher's SUBS log-probabilities ``log p_T(x0 | z_T)`` (docs/math.md §1): at the positions the
  teacher sees, its distribution is the one-hot of the visible token and the KL term is a softened CE; at the ones
  it does not see, it is the teacher's prediction with more context than the student had.

CD4LM's reference code draws ``r_T = clip(r_S k, 0.1, 0.6)``; ``r_S k`` already lies in [0.12, 0.63], so the clip is
dropped here. Its loss clamps each term at 5 nats; not done here (the non-finite guard of ``DiffusionLM`` stays). Its
optional λ schedule (0.9 -> 0.5, cosine) is not implemented: λ is fixed, as in docs/math.md.

Why CD4LM rather than Duo's DCD (Sahoo et al., 2025, "The Diffusion Duality", arXiv:2506.10892, sec. 4): DCD rests
on the duality between *uniform-state* diffusion and Gaussian diffusion, which gives deterministic (DDIM) trajectories
to distil along; the absorbing process of our checkpoints has no such map. DCD's teacher is also a periodically
refreshed copy of the student with a step-size doubling schedule, state that the training loop would have to carry.
CD4LM needs only a frozen MDLM teacher (a ``save_pretrained`` folder such as ``runs/quickstart/final``), one extra
no-grad forward pass per step, and leaves the sampling view untouched, so ``ancestral`` and ``parallel`` run on the
student as they do on any MDLM.

The teacher is *not* part of the module: it is held outside ``nn.Module``'s registry, so it is absent from
``parameters()`` (the optimizer, EMA), from ``state_dict()`` (checkpoints, ``save_pretrained``) and from
``.to()`` (it follows the batch's device lazily). The objective never reads disk: the run builder loads the teacher
(``cdlm.checkpoint.load_frozen``) and passes it in; ``cdlm.load`` passes none, so a student checkpoint loads
and samples whether or not the teacher folder still exists, with one model in memory; only ``loss`` needs the teacher
(training and resuming through ``cdlm train``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cdlm import draws
from cdlm.checks import is_real
from cdlm.config import ConfigError
from cdlm.models.backbone import Backbone
from cdlm.models.span_cache import SpanCache
from cdlm.objectives.masked import MaskedDiffusion
from cdlm.objectives.schedules import Schedule
from cdlm.objectives.teacher import FrozenTeacher, state_differences
from cdlm.objectives.training_time import training_u
from cdlm.types import Batch, LossOutput


def nested_masks(
    padding: torch.Tensor, student_ratio: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CD4LM's paired masks: student-masked ``[B, L]`` and teacher-masked ``[B, L]`` (a subset), both bool.

    ``padding`` ``[B, L]`` marks valid tokens; ``student_ratio`` ``[B]`` in [0, 1]; ``keep`` ``[B]`` in [0, 1] is the
    fraction of the student's masks the teacher keeps. Row ``b`` masks ``n_S = round(r_S n)`` of its ``n`` valid
    positions (at least one when ``n > 0``), uniformly at random; the teacher masks the ``floor(keep n_S)`` of them
    that come first in the same random order. Padding is never masked.
    """
    n_valid = padding.sum(-1)  # [B]
    n_student = torch.minimum(torch.round(student_ratio * n_valid).long().clamp_min(1), n_valid)  # [B]
    n_teacher = torch.floor(keep * n_student).long()  # [B], <= n_student
    scores = draws.rand(*padding.shape, device=padding.device).masked_fill(~padding, 2.0)  # [B, L] padding last
    rank = scores.argsort(-1).argsort(-1)  # [B, L]: the position's place in a random order of the valid ones
    return rank < n_student[:, None], rank < n_teacher[:, None]


def time_of_ratio(schedule: Schedule, ratio: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """``t`` ``[B]`` with ``1 - alpha(t) = ratio`` ``[B]`` by bisection on [0, 1] (any increasing masking schedule).

    Only a time-conditioned network reads it; the mask ratio, not ``t``, sets the states.
    """
    lo, hi = torch.zeros_like(ratio), torch.ones_like(ratio)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = 1 - schedule.alpha(mid) < ratio  # [B]
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


class MaskedDistill(nn.Module):
    """CD4LM consistency distillation of an MDLM teacher into a student ``MaskedDiffusion`` of the same shape.

    The sampling view (``denoise``, ``prior``, ``mask_id``, ``vocab_size``, ``schedule``, ``time_conditioning``)
    and ``nll`` (the NELBO, docs/math.md §1) are the student's, so every discrete sampler and the validation bound
    work unchanged.

    Args:
        backbone: the student's transformer, built from the run's ``model`` group: it must be the teacher's.
        vocab_size: ``V`` of the run's tokenizer (the teacher's tokenizer: same data group).
        teacher: path of the masked run to distil (a ``save_pretrained`` folder or ``.ckpt``); the run builder loads
            it (``cdlm.checkpoint.load_frozen``; a missing path fails there, before any work) and passes it
            as ``teacher_model``.
        student_ratio: ``(lo, hi)`` of the student's mask ratio ``r_S ~ U(lo, hi)``.
        teacher_keep: ``(lo, hi)`` of the fraction ``k ~ U(lo, hi)`` of the student's masks the teacher keeps.
        kl_weight: ``λ``, the weight of the KL term (``1 - λ`` on the CE).
        temperature: ``T`` of the softened distributions in the KL (the term is scaled by ``T²``).
        schedule, eps, time_conditioning: the student ``MaskedDiffusion``'s; they must be the teacher's.
        teacher_model: the loaded teacher (injected; a ``MaskedDistill`` teaches through its student): the student
            starts as a copy of it. None inside ``cdlm.load`` (the saved weights replace the initial ones) or for a
            student built in code: then ``loss`` refuses to run.
    """

    space = "discrete"

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        teacher: str | None = None,
        student_ratio: tuple[float, float] | list[float] = (0.4, 0.9),
        teacher_keep: tuple[float, float] | list[float] = (0.3, 0.7),
        kl_weight: float = 0.5,
        temperature: float = 2.0,
        schedule: str = "loglinear",
        eps: float = 1e-3,
        time_conditioning: bool = False,
        teacher_model: MaskedDiffusion | MaskedDistill | None = None,
    ) -> None:
        super().__init__()
        self.student_ratio = check_range("student_ratio", student_ratio)
        self.teacher_keep = check_range("teacher_keep", teacher_keep)
        if not (is_real(kl_weight) and 0.0 <= kl_weight <= 1.0):
            raise ConfigError(f"kl_weight (lambda) must be in [0, 1], got {kl_weight}")
        if not (is_real(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.kl_weight, self.temperature, self.teacher_path = kl_weight, temperature, teacher
        self.student = MaskedDiffusion(backbone, vocab_size, schedule, eps, time_conditioning=time_conditioning)
        self.mask_id, self.vocab_size = self.student.mask_id, self.student.vocab_size
        self.teacher: FrozenTeacher | None = None
        if teacher_model is not None:
            source = getattr(teacher_model, "student", teacher_model)  # a distilled student teaches in turn
            self.teacher = FrozenTeacher(source)
            copy_teacher(self.student, source, teacher)

    # ---- the student's sampling view (docs/math.md §0, discrete) ---------------------------------------------
    @property
    def schedule(self) -> Schedule:
        return self.student.schedule

    @property
    def time_conditioning(self) -> bool:
        return self.student.time_conditioning

    def denoise(self, z: torch.Tensor, t: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """The student's SUBS ``log p_theta(x0 | z_t)`` ``[B, L, V]`` (float32)."""
        return self.student.denoise(z, t, padding)

    def denoise_span(self, z: torch.Tensor, t: torch.Tensor, cache: SpanCache, span: slice) -> torch.Tensor:
        """The student's ``denoise_span`` (``MaskedDiffusion.denoise_span``): rows ``[B, n, V]`` of ``span``."""
        return self.student.denoise_span(z, t, cache, span)

    def denoise_positions(
        self, z: torch.Tensor, t: torch.Tensor, cache: SpanCache, index: torch.Tensor
    ) -> torch.Tensor:
        """The student's ``denoise_positions``: rows ``[B, m, V]`` at ``index`` ``[B, m]``."""
        return self.student.denoise_positions(z, t, cache, index)

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The absorbing prior: every position masked, ``[n, length]``."""
        return self.student.prior(n, length, device, generator)

    def nll(self, batch: Batch) -> LossOutput:
        """The student's NELBO over ``t ∈ (0, 1]`` (docs/math.md §1): the bound validation reports."""
        return self.student.nll(batch)

    # ---- training ----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        """``λ T² KL(teacher_T || student_T) + (1 - λ) CE`` per student-masked token (module docstring).

        ``nll`` ``[B, L]`` holds each student-masked token's term (zero elsewhere) and ``mask`` the student masks:
        a training signal, not a likelihood bound.
        """
        if self.teacher is None:
            raise ConfigError(
                f"MaskedDistill has no teacher (objective.teacher={self.teacher_path!r}): the module came from "
                "cdlm.load, which never reads it, or was built in code without teacher_model. Training (and resuming, "
                "through `cdlm train`) needs the masked run to distil from; sampling a distilled student does not."
            )
        x, padding = batch["input_ids"], batch["attention_mask"].bool()
        u = training_u(batch)
        r_student = self.student_ratio[0] + (self.student_ratio[1] - self.student_ratio[0]) * u.float()  # [B]
        keep = torch.empty_like(r_student).uniform_(*self.teacher_keep)  # [B]
        student_masked, teacher_masked = nested_masks(padding, r_student, keep)  # [B, L] each, teacher's ⊆ student's
        n_valid = padding.sum(-1).clamp_min(1)  # [B]
        t_student = time_of_ratio(self.schedule, student_masked.sum(-1) / n_valid)  # [B]
        t_teacher = time_of_ratio(self.schedule, teacher_masked.sum(-1) / n_valid)  # [B]
        with torch.no_grad():
            z_teacher = torch.where(teacher_masked, self.mask_id, x)  # [B, L] the less masked state
            teacher = self.teacher.on(x.device)
            teacher_logp = teacher.denoise(z_teacher, t_teacher, padding)[student_masked]  # [N, V] SUBS, float32
        z_student = torch.where(student_masked, self.mask_id, x)  # [B, L]
        hidden = self.student.hidden(z_student, t_student, padding)[student_masked]  # [N, D]
        logits = self.student.head(hidden).float()  # [N, V]
        kl, ce = distill_terms(logits, teacher_logp, x[student_masked], self.temperature)  # [N] each
        terms = self.kl_weight * self.temperature**2 * kl + (1 - self.kl_weight) * ce  # [N]
        per_token = torch.zeros(x.shape, device=x.device)
        per_token[student_masked] = terms
        count, n_tokens = student_masked.sum().clamp_min(1), padding.sum().clamp_min(1)
        logs = {
            "kl": kl.sum().detach() / count,
            "ce": ce.sum().detach() / count,
            "student_ratio": student_masked.sum() / n_tokens,
            "teacher_ratio": teacher_masked.sum() / n_tokens,
        }
        return LossOutput(terms.sum() / count, per_token, student_masked, logs)


def distill_terms(
    logits: torch.Tensor, teacher_logp: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``KL(softmax(ℓ_T / T) || softmax(ℓ_S / T))`` and ``CE(softmax(ℓ_S), x)``, both ``[N]`` (float32).

    ``logits`` ``[N, V]`` are the student's, ``teacher_logp`` ``[N, V]`` the teacher's log-probabilities (SUBS: the
    one-hot ``log`` is 0 / -1e6, whose zero-probability entries contribute exactly 0), ``target`` ``[N]`` the tokens.
    """
    student_soft = (logits / temperature).log_softmax(-1)  # [N, V]
    teacher_soft = (teacher_logp / temperature).log_softmax(-1)  # [N, V]
    kl = F.kl_div(student_soft, teacher_soft, reduction="none", log_target=True).sum(-1)  # [N]
    ce = F.cross_entropy(logits, target, reduction="none")  # [N]
    return kl, ce


def check_range(name: str, bounds: tuple[float, float] | list[float]) -> tuple[float, float]:
    """``(lo, hi)`` with ``0 <= lo <= hi <= 1``, or a ConfigError that says so."""
    sequence = isinstance(bounds, Sequence) and not isinstance(bounds, str)
    pair = sequence and len(bounds) == 2 and all(is_real(b) for b in bounds)
    if not (pair and 0.0 <= bounds[0] <= bounds[1] <= 1.0):
        shown = list(bounds) if sequence else bounds
        raise ConfigError(f"{name} must be (lo, hi) with 0 <= lo <= hi <= 1, got {shown!r}")
    return float(bounds[0]), float(bounds[1])


def copy_teacher(student: MaskedDiffusion, teacher: MaskedDiffusion, source: str | None) -> None:
    """Start the student as a copy of the teacher; refuse a teacher of another shape or schedule."""
    same_schedule = type(student.schedule) is type(teacher.schedule) and student.schedule.eps == teacher.schedule.eps
    if not same_schedule or student.time_conditioning != teacher.time_conditioning:
        raise ConfigError(
            f"teacher {source} uses schedule {type(teacher.schedule).__name__}(eps={teacher.schedule.eps}), "
            f"time_conditioning={teacher.time_conditioning}; set objective.schedule, objective.eps and "
            "objective.time_conditioning to match"
        )
    theirs = teacher.state_dict()
    differ = state_differences(student.state_dict(), theirs)
    if differ:
        raise ConfigError(
            f"the student's architecture differs from teacher {source}'s ({differ[:4]}); the run must use the "
            "teacher's model group (e.g. model=mini for runs/quickstart/final) and data group (its tokenizer)"
        )
    student.load_state_dict(theirs)

"""EDLM: ancestral sampling whose clean estimate is importance-resampled under an autoregressive energy (Xu et al.,
2025, "Energy-Based Diffusion Language Models"), docs/math.md §7.

A masked-diffusion denoiser predicts each masked position on its own: a step that unmasks several positions draws
them from the product of their marginals, which can join tokens that never occur together. EDLM corrects the joint
with a sequence-level energy. At a step ``t -> s`` the sampler draws ``K`` candidate clean sequences ``x0^k`` from
the factorised ``p_theta(x0 | x_t)`` (the proposal), weights each by ``p_AR(x0^k) / prod_l p_theta(x0^k_l | x_t)``
-- an autoregressive model's likelihood over the proposal's, i.e. the energy ``-log p_AR`` corrected for the proposal
-- resamples one, and takes MDLM's posterior step ``q(x_s | x_t, x0)`` from it: each masked position unmasks with
probability ``(alpha_s - alpha_t) / (1 - alpha_t)`` and then holds the resampled token. With ``K = 1`` this is the
ancestral sampler; as ``K`` grows the clean estimate tends to ``p_AR(x0)`` restricted to the sequences that agree
with ``x_t``, the exact posterior when the autoregressive model is the data's law.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdlm.samplers.categorical import draw_tokens, sample_categorical
from cdlm.samplers.grids import linear_grid
from cdlm.samplers.registry import Range, register_sampler
from cdlm.types import AbsorbingObjective, SamplerStep

Energy = Callable[[torch.Tensor], torch.Tensor]  # ids [N, L] -> log p(ids) [N]


def log_likelihood(model: torch.nn.Module) -> Energy:
    """``log p(ids)`` ``[N]`` of every row of ``ids`` ``[N, L]`` under an autoregressive objective (teacher forcing)."""

    def score(ids: torch.Tensor) -> torch.Tensor:
        padding = torch.ones_like(ids, dtype=torch.bool)
        return -model.nll({"input_ids": ids, "attention_mask": padding}).nll.double().sum(-1)

    return score


def resolve_energy(energy: str | Energy | None, vocab_size: int) -> Energy:
    """The energy as a function: a run's path (an autoregressive model of the same vocabulary) or a function."""
    if energy is None:
        raise ValueError("sampler=edlm needs energy=PATH, an autoregressive run with the model's tokenizer")
    if isinstance(energy, torch.nn.Module):  # an autoregressive objective (generate loads a path into one)
        return log_likelihood(energy)
    if callable(energy):
        return energy
    raise ValueError(f"energy={energy!r}: pass it through DiffusionLM.generate / sample.py, which load the run")


def resample_clean(
    logp: torch.Tensor, x: torch.Tensor, masked: torch.Tensor, energy: Energy, k: int, generator
) -> torch.Tensor:
    """One clean sequence per row ``[B, L]``: ``k`` draws of ``x``'s ``masked`` positions from ``logp`` ``[B, L, V]``
    (the rest kept), resampled with weights ``p_AR / p_theta`` (module docstring)."""
    if k == 1:  # one draft: nothing to resample, so the energy is not evaluated (the ancestral step)
        draft = x.clone()
        draft[masked] = draw_tokens(logp[masked], 1.0, 1.0, generator)
        return draft
    B = x.shape[0]
    drafts, log_w = x.new_empty(k, *x.shape), torch.empty(B, k, dtype=torch.float64, device=x.device)
    for j in range(k):
        draft = x.clone()
        draft[masked] = draw_tokens(logp[masked], 1.0, 1.0, generator)
        proposal = (logp.gather(-1, draft.clamp_max(logp.shape[-1] - 1)[..., None]).squeeze(-1) * masked).sum(-1)
        drafts[j], log_w[:, j] = draft, energy(draft) - proposal.double()
    pick = sample_categorical((log_w - log_w.amax(-1, keepdim=True)).exp(), generator)  # [B]
    return drafts[pick, torch.arange(B, device=x.device)]  # [B, L]


@register_sampler(
    "edlm",
    space="discrete",
    grid=linear_grid,
    requires=AbsorbingObjective,
    knobs={"candidates": Range(1, note="1 = ancestral"), "window": Range(0, 1, low_open=True)},
)
@torch.no_grad()
def sample_edlm(
    objective: AbsorbingObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    energy: str | None = None,
    candidates: int = 8,
    window: float = 1.0,
) -> torch.Tensor:
    """Reverse the absorbing process over ``ts`` ``[T + 1]`` from ``x`` ``[B, L]`` with EDLM's resampled clean
    estimate (module docstring); visible positions of ``x`` (a prompt) are kept.

    Args:
        energy: the path of an autoregressive run with the model's tokenizer (or, from Python, a function
            ``ids [N, L] -> log p [N]``).
        candidates: ``K`` proposals per row and step (``K`` energy evaluations of the whole sequence each step).
        window: resample at the steps with ``t > 1 - window`` (EDLM applies its correction early, where a step
            fixes the most structure); later steps draw each position from ``p_theta`` (``K = 1``).

    NFE counts denoiser calls (one per step in which the state changed); the energy's calls are not counted.
    """
    score = resolve_energy(energy, objective.vocab_size)
    mask_id, alpha, nfe, logp = objective.mask_id, objective.schedule.alpha, 0, None
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        masked = x == mask_id  # [B, L]
        if not masked.any():
            break
        if logp is None or objective.time_conditioning:
            logp, nfe = objective.denoise(x, t.expand(x.shape[0]).float()), nfe + 1
        k = candidates if float(t) > 1 - window else 1
        x0 = resample_clean(logp, x, masked, score, k, generator)  # [B, L]
        move = (float(alpha(s)) - float(alpha(t))) / (1 - float(alpha(t)))  # unmasking probability
        u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
        unmask = masked & ((u < move) if i < len(ts) - 2 else torch.ones_like(masked))  # the last step: all
        new = torch.where(unmask, x0, x)
        if not torch.equal(new, x):
            logp = None
        x = new
        if callback is not None:
            callback(SamplerStep(i, float(s), x, x0, nfe))
    return x

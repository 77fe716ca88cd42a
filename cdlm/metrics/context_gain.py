"""How much a continuous model reads its context: its denoiser against the best context-free one (docs/math.md §8).

A continuous objective whose clean state is one vector per token (``clean_state(ids)`` ``[B, L, D]``: FLM's
one-hot, LangFlow's embedding, CoBit's bits) has, at every noise level, a **context-free Bayes denoiser**: the
exact posterior mean of ``x0`` when the tokens are independent draws of the unigram model ``p``,

    log q(v | x~_l) = log p(v) - ||x~_l - c_v||^2 / (2 sigma^2) + const,   x0_hat = sum_v q(v | x~_l) c_v,

with ``c_v`` the clean state of token ``v``. No denoiser that sees one position alone does better in squared
error on data whose tokens have the unigram's frequencies; a network that beats it has read its neighbours.

``context_gain`` measures both denoisers' squared error per token, ``mse(sigma) = E ||x0 - x0_hat||^2`` (summed over
the state's ``D`` coordinates, averaged over valid tokens), on the same validation tokens and the same noise
``eps`` at a grid of noise levels log-uniform over ``[sigma_min, sigma_max]``, and integrates the difference with
the Gaussian ELBO's weight. For any Gaussian diffusion in VE coordinates the ELBO's diffusion term is
(Kingma et al. 2021, "Variational diffusion models", eq. 17, in ``sigma``)

    L_diff = (1/2) int ||x0 - x0_hat(x~, sigma)||^2 d(sigma^-2) = int mse(sigma) sigma^-2 d(log sigma),

so ``gain = int (mse_free - mse_model) sigma^-2 d(log sigma)`` (trapezoid rule in ``log sigma``) is how many
nats/token the model's diffusion term is below the context-free denoiser's: the part of the bound that can come
from context. ``gain`` near 0 says the network has learned token frequencies and the per-token evidence and
nothing else. The per-level ``removed = 1 - mse_model / mse_free`` shows where the context is read (0 where even
the context-free error is below ``RESOLVED`` of its largest value).

Adding the prior term (the KL of the state at ``sigma_max`` to the samplers' Gaussian) and the decoder's NLL at
``sigma_min`` gives each denoiser's whole Gaussian ELBO (``elbo_model``, ``elbo_free``, nats/token): a second bound
beside the ODE bound of docs/math.md §6, with no Hutchinson noise. By the I-MMSE relation (Guo, Shamai and Verdu
2005) the exact denoiser's diffusion term over the whole noise range is the entropy of the clean state, so
``elbo_free`` lands on the unigram's NLL of the same tokens when the grid covers the range: a check of the
quadrature that ``scripts/context_gain.py`` prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cdlm.types import ContinuousObjective

LEVELS = 32  # noise levels of the grid, log-uniform over [sigma_min, sigma_max]
RESOLVED = 1e-3  # levels whose context-free error is below this fraction of its largest have every token known


def token_table(objective: ContinuousObjective, vocab_size: int, device: torch.device) -> torch.Tensor:
    """``C`` ``[V, D]`` float64: the clean state of every token; refused when the state is not one vector per
    token (a latent objective's state has ``L / r`` positions)."""
    ids = torch.arange(vocab_size, device=device)[None]  # [1, V]
    table = objective.clean_state(ids)
    if table.dim() != 3 or table.shape[:2] != (1, vocab_size):
        raise ValueError(
            f"{type(objective).__name__}: the context-free denoiser needs one clean state per token, "
            f"got clean_state of shape {tuple(table.shape)} for [1, {vocab_size}] ids"
        )
    return table[0].double()


def context_free_logits(
    x: torch.Tensor, sigma: torch.Tensor, table: torch.Tensor, log_prior: torch.Tensor
) -> torch.Tensor:
    """``log q(v | x~)`` up to a per-position constant, ``[B, L, V]`` float64, when tokens are independent draws of
    the prior: ``log p(v) + (x~ . c_v - ||c_v||^2 / 2) / sigma^2`` (the ``||x~||^2`` term is the same for every
    ``v``). ``x`` ``[B, L, D]`` the VE state, ``sigma`` ``[B]``, ``table`` ``C`` ``[V, D]``, ``log_prior`` ``[V]``."""
    inv_var = sigma.double().pow(-2)[:, None, None]  # [B, 1, 1]
    return (x.double() @ table.T - 0.5 * table.square().sum(-1)) * inv_var + log_prior.double()


def context_free_denoise(
    x: torch.Tensor, sigma: torch.Tensor, table: torch.Tensor, log_prior: torch.Tensor
) -> torch.Tensor:
    """The posterior mean ``E[x0 | x~] = sum_v q(v | x~) c_v`` ``[B, L, D]`` (float64) of independent tokens."""
    return context_free_logits(x, sigma, table, log_prior).softmax(-1) @ table


def prior_kl(objective: ContinuousObjective, x0: torch.Tensor) -> torch.Tensor:
    """``KL(N(x0, sigma_max^2 I) || N(data_mean, (sigma_max^2 + data_scale^2) I))`` per position ``[B, L]``
    (float64): the ELBO's prior term, against the Gaussian the samplers start from."""
    var_q, var_p = objective.sigma_max**2, objective.sigma_max**2 + objective.data_scale**2
    per_dim = 0.5 * ((var_q + (x0.double() - objective.data_mean).square()) / var_p - 1 + math.log(var_p / var_q))
    return per_dim.sum(-1)


def noise_grid(objective: ContinuousObjective, levels: int = LEVELS) -> torch.Tensor:
    """``levels`` noise levels ``[K]`` float64, log-uniform from ``sigma_min`` to ``sigma_max``."""
    lo, hi = math.log(objective.sigma_min), math.log(objective.sigma_max)
    return torch.linspace(lo, hi, levels, dtype=torch.float64).exp()


@torch.no_grad()
def context_gain(
    objective: ContinuousObjective,
    log_prior: torch.Tensor,
    batches: Iterable[dict],
    levels: int = LEVELS,
    generator: torch.Generator | None = None,
) -> dict:
    """The model's denoiser against the context-free Bayes denoiser of ``log_prior`` (module docstring).

    ``log_prior`` ``[V]``: the unigram's log-probabilities (``UnigramModel.log_probs``). ``batches``: validation
    batches (``input_ids``, ``attention_mask`` ``[B, L]``); one ``eps`` per batch and level from ``generator``,
    shared by both denoisers. Returns ``sigma``, ``mse_model``, ``mse_free`` and ``removed`` (lists over the grid),
    the diffusion terms ``diffusion_model`` / ``diffusion_free`` and their difference ``gain``, and each one's
    Gaussian ELBO (``elbo_model`` / ``elbo_free`` = prior KL + diffusion term + decoder NLL at ``sigma_min``, the
    decoder the model's ``decoder_nll`` or the context-free posterior), all in nats/token, and ``tokens``.
    """
    sigmas = noise_grid(objective, levels)  # [K]
    device = log_prior.device
    table = token_table(objective, log_prior.numel(), device)  # [V, D]
    err_model = torch.zeros(levels, dtype=torch.float64)
    err_free = torch.zeros(levels, dtype=torch.float64)
    decoder_model = decoder_free = prior = 0.0
    tokens = 0
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()  # [B, L]
        x0 = objective.clean_state(ids).double()  # [B, L, D]
        rows = ids.shape[0]
        tokens += int(mask.sum())
        for k, sigma in enumerate(sigmas.tolist()):
            eps = torch.randn(x0.shape, dtype=torch.float64, generator=generator).to(device)
            x = x0 + sigma * eps  # [B, L, D]
            level = torch.full((rows,), sigma, dtype=torch.float64, device=device)  # [B]
            model = objective.denoise(x.float(), level).double()  # [B, L, D]
            free = context_free_denoise(x, level, table, log_prior)  # [B, L, D]
            err_model[k] += ((model - x0).square().sum(-1) * mask).sum().cpu()
            err_free[k] += ((free - x0).square().sum(-1) * mask).sum().cpu()
            if k == 0:  # the decoders read the state at sigma_min
                decoder_model += float((objective.decoder_nll(x.float(), ids).double() * mask).sum())
                free_logits = context_free_logits(x, level, table, log_prior)  # [B, L, V]
                free_nll = -free_logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]  # [B, L]
                decoder_free += float((free_nll * mask).sum())
        prior += float((prior_kl(objective, x0) * mask).sum())
    if tokens == 0:
        raise ValueError("context_gain: the batches hold no valid token")
    mse_model, mse_free = err_model / tokens, err_free / tokens  # [K]
    weight = sigmas.pow(-2)  # [K]: the ELBO's sigma^-2 d(log sigma)
    log_sigma = sigmas.log()
    diffusion_model = float(torch.trapezoid(mse_model * weight, log_sigma))
    diffusion_free = float(torch.trapezoid(mse_free * weight, log_sigma))
    prior, decoder_model, decoder_free = prior / tokens, decoder_model / tokens, decoder_free / tokens
    return {
        "sigma": sigmas.tolist(),
        "mse_model": mse_model.tolist(),
        "mse_free": mse_free.tolist(),
        "removed": torch.where(mse_free > RESOLVED * mse_free.max(), 1 - mse_model / mse_free, 0.0).tolist(),
        "diffusion_model": diffusion_model,
        "diffusion_free": diffusion_free,
        "gain": diffusion_free - diffusion_model,
        "prior": prior,
        "decoder_model": decoder_model,
        "decoder_free": decoder_free,
        "elbo_model": prior + diffusion_model + decoder_model,
        "elbo_free": prior + diffusion_free + decoder_free,
        "tokens": tokens,
    }

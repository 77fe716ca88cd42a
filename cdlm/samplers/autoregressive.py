"""Left-to-right ancestral sampling for the autoregressive reference (docs/math.md §0).

Position ``l`` draws ``x^l ~ p_theta(. | x^{<l})`` with temperature, top-k (Fan et al., 2018) and nucleus
(Holtzman et al., 2020) filtering, in float64 by inverse-CDF sampling. A causal model's keys and values at
earlier positions never change, so by default they are kept in a KV cache and each step runs the network on
one new position; ``cache=False`` reruns the whole prefix (the reference the cached path must equal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdlm.prompts import Prompt
from cdlm.samplers.categorical import sample_categorical, top_p_filter
from cdlm.samplers.registry import Range, register_sampler
from cdlm.types import AutoregressiveObjective, SamplerStep


def position_grid(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[0, 1, .., steps]``: the registry's grid signature; autoregressive sampling ignores it (one step per token)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.arange(steps + 1, device=device)


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens of ``probs`` ``[..., V]`` and renormalise (Fan et al., 2018); 0 = off."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k == 0 or top_k >= probs.shape[-1]:
        return probs
    values, index = probs.topk(top_k, dim=-1)  # [..., k]
    kept = torch.zeros_like(probs).scatter(-1, index, values)
    return kept / kept.sum(-1, keepdim=True)


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]``: argmax when ``temperature == 0``, else a filtered float64 draw."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)  # [B]
    probs = (logits.double() / temperature).softmax(-1)  # [B, V]
    return sample_categorical(top_p_filter(top_k_filter(probs, top_k), top_p), generator)  # [B]


@register_sampler(
    "autoregressive",
    space="autoregressive",
    grid=position_grid,
    requires=AutoregressiveObjective,
    knobs={
        "temperature": Range(0, note="0 = greedy"),
        "top_p": Range(0, 1, low_open=True, note="1 = off"),
        "top_k": Range(0, note="0 = off"),
    },
)
@torch.no_grad()
def sample_autoregressive(
    objective: AutoregressiveObjective,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    cache: bool = True,
    fixed: Prompt | None = None,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Fill ``x`` ``[B, L]`` left to right, one network call per position; ``ts`` is unused.

    ``temperature=0`` is greedy decoding; ``top_k`` (0 = off) is applied before ``top_p``. ``cache=False`` runs
    the full prefix at every step. The callback's ``t`` is the fraction of positions still to generate. ``fixed``:
    a prompt; its tokens are kept, the batch's common fixed prefix is read in one (cached) call, and a row's fixed
    position later on is fed as it is instead of drawn. ``stop_id``: once every row has drawn it (a row's EOS;
    not a fixed token), the positions left are not drawn and keep ``stop_id``; the caller pads them
    (``cdlm.prompts.cut_at_eos``), as it pads a row's positions after its first EOS.
    """
    B, L = x.shape
    x = x.clone() if fixed is None else fixed.apply(x)
    kv = objective.new_cache(L) if cache else None
    start = 0 if fixed is None else fixed.leading()
    nfe = 0
    stopped = torch.zeros(B, dtype=torch.bool, device=x.device)  # [B]: the row has drawn stop_id
    for i in range(start, L):
        logits, nfe = objective.next_logits(x[:, :i], kv), nfe + 1  # [B, V]
        draw = next_token(logits, temperature, top_p, top_k, generator)  # [B]
        drawn = torch.ones_like(stopped) if fixed is None else ~fixed.fixed[:, i]  # [B]
        x[:, i] = torch.where(drawn, draw, x[:, i])
        if callback is not None:
            callback(SamplerStep(i, 1.0 - (i + 1) / L, x, None, nfe))
        if stop_id is not None:
            stopped |= drawn & (draw == stop_id)
            if bool(stopped.all()):  # one host sync per token, only when asked to stop
                rest = x[:, i + 1 :]
                x[:, i + 1 :] = stop_id if fixed is None else torch.where(fixed.fixed[:, i + 1 :], rest, stop_id)
                break
    return x

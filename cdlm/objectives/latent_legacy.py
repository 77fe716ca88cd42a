"""Checkpoints of the former ``LatentDiffusion`` objective (one class with a ``stage`` switch), read as the two
objectives that replace it (docs/math.md §5): ``stage=vae`` as ``TextVAEObjective``, ``stage=prior`` as
``LatentFlowPrior``.

Only data is rewritten, before the stored config is validated: the objective's ``_target_`` and keys, and the names
of its tensors (a VAE run's idle prior is dropped; a prior's network moves under ``network.``).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

LEGACY = "cdlm.objectives.latent.LatentDiffusion"
SIZES = ("compression", "latent_dim", "vae_width", "vae_depth", "vae_heads", "t_min", "t_max")
VAE_KEYS = (*SIZES, "beta", "mask_prob", "latent_noise", "align", "align_weight", "align_dim")
PRIOR_KEYS = (*SIZES, "vae", "time_mean", "time_std", "ode_steps", "prior_block")
NETWORK = ("backbone.", "time_embed.", "in_proj.", "out_proj.")  # the prior's modules, formerly on the objective
STATISTICS = ("latent_shift", "latent_scale", "stats_ready")


def migrate(config: Any, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(config, state)`` of a ``LatentDiffusion`` checkpoint in the form of its stage's objective; any other
    checkpoint unchanged. ``config``: the stored config (a dict or ``DictConfig``); ``state``: its state dict."""
    node = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else config
    objective = node.get("objective") if isinstance(node, dict) else None
    if not isinstance(objective, dict) or objective.get("_target_") != LEGACY:
        return config, state
    prior = objective.get("stage", "vae") == "prior"
    keys, target = (PRIOR_KEYS, "latent_prior.LatentFlowPrior") if prior else (VAE_KEYS, "text_vae.TextVAEObjective")
    node = {
        **node,
        "objective": {"_target_": f"cdlm.objectives.{target}"} | {k: objective[k] for k in keys if k in objective},
    }
    return node, {name: value for key, value in state.items() if (name := rename(key, prior)) is not None}


def rename(key: str, prior: bool) -> str | None:
    """The new name of the tensor ``key`` (``objective.``-prefixed names are the objective's), None to drop it."""
    head, _, rest = key.partition(".")
    if head != "objective":
        return key
    if rest.startswith(NETWORK):
        return f"objective.network.{rest}" if prior else None
    if rest in STATISTICS:
        return key if prior else None
    if rest.startswith("align_head."):
        return None if prior else key
    return key

"""Range checks of ``LatentDiffusion``'s settings (``ArgumentError`` naming the argument and what is valid)."""

from __future__ import annotations

from cdlm import checks
from cdlm.models.backbone import check_heads

STAGES = ("vae", "prior")


def check_settings(
    stage: str,
    t_min: float,
    t_max: float,
    mask_prob: float,
    latent_noise: float,
    beta: float,
    prior_block: int | None,
) -> None:
    """A clear error for an out-of-range ``LatentDiffusion`` setting."""
    if not isinstance(stage, str) or stage not in STAGES:
        raise checks.ArgumentError(f"stage must be one of {STAGES}, got {stage!r}")
    checks.finite(t_min=t_min, t_max=t_max, mask_prob=mask_prob, latent_noise=latent_noise, beta=beta)
    if not 0.0 < t_min < t_max < 1.0:
        raise checks.ArgumentError(f"need 0 < t_min < t_max < 1 so that sigma stays finite, got {t_min}, {t_max}")
    if not 0.0 <= mask_prob < 1.0 or latent_noise < 0 or beta < 0:
        raise checks.ArgumentError(
            f"need 0 <= mask_prob < 1, latent_noise >= 0, beta >= 0; got {mask_prob}, {latent_noise}, {beta}"
        )
    if prior_block is not None and not (checks.is_int(prior_block) and prior_block >= 1):
        raise checks.ArgumentError(f"prior_block must be a positive number of latents or null, got {prior_block!r}")


def check_vae(
    vocab_size: int, compression: int, latent_dim: int, vae_width: int, vae_depth: int, vae_heads: int
) -> None:
    """A clear error for an out-of-range ``TextVAE`` size, named as the ``LatentDiffusion`` argument."""
    checks.positive_ints(vocab_size=vocab_size, compression=compression, latent_dim=latent_dim, vae_depth=vae_depth)
    check_heads(vae_width, vae_heads, "vae_width", "vae_heads")


def check_prior(time_mean: float, time_std: float, ode_steps: int, align_weight: float, align_dim: int) -> None:
    """A clear error for an out-of-range setting of the prior's time law, its bound or the alignment loss."""
    checks.finite(time_mean=time_mean)
    checks.positive(time_std=time_std)
    checks.positive_ints(ode_steps=ode_steps, align_dim=align_dim)
    checks.non_negative(align_weight=align_weight)

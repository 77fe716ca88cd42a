"""Range checks of the latent objectives' settings (``ArgumentError`` naming the argument and what is valid);
docs/math.md §5."""

from __future__ import annotations

from cdlm import checks
from cdlm.models.backbone import check_heads


def check_times(t_min: float, t_max: float) -> None:
    """``0 < t_min < t_max < 1``: the rectified flow's ``sigma = t / (1 - t)`` stays finite."""
    checks.finite(t_min=t_min, t_max=t_max)
    if not 0.0 < t_min < t_max < 1.0:
        raise checks.ArgumentError(f"need 0 < t_min < t_max < 1 so that sigma stays finite, got {t_min}, {t_max}")


def check_training(mask_prob: float, latent_noise: float, beta: float) -> None:
    """The text VAE's KL weight and its smoothness augmentations."""
    checks.finite(mask_prob=mask_prob, latent_noise=latent_noise, beta=beta)
    if not 0.0 <= mask_prob < 1.0 or latent_noise < 0 or beta < 0:
        raise checks.ArgumentError(
            f"need 0 <= mask_prob < 1, latent_noise >= 0, beta >= 0; got {mask_prob}, {latent_noise}, {beta}"
        )


def check_vae(
    vocab_size: int, compression: int, latent_dim: int, vae_width: int, vae_depth: int, vae_heads: int
) -> None:
    """A clear error for an out-of-range ``TextVAE`` size, named as the objective's argument."""
    checks.positive_ints(vocab_size=vocab_size, compression=compression, latent_dim=latent_dim, vae_depth=vae_depth)
    check_heads(vae_width, vae_heads, "vae_width", "vae_heads")


def check_align(align_weight: float, align_dim: int) -> None:
    """The alignment loss's weight and the frozen encoder's width."""
    checks.positive_ints(align_dim=align_dim)
    checks.non_negative(align_weight=align_weight)


def check_prior(
    time_mean: float, time_std: float, ode_steps: int, prior_block: int | None, ode_probes: int = 1
) -> None:
    """The prior's logit-normal time law, the Heun steps and Hutchinson probes of its bound and its block size."""
    checks.finite(time_mean=time_mean)
    checks.positive(time_std=time_std)
    checks.positive_ints(ode_steps=ode_steps, ode_probes=ode_probes)
    if prior_block is not None and not (checks.is_int(prior_block) and prior_block >= 1):
        raise checks.ArgumentError(f"prior_block must be a positive number of latents or null, got {prior_block!r}")

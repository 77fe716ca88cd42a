"""Latent diffusion through a text VAE (Cosmos / Cola DLM; LD4LG as ancestor): docs/math.md §5.

Two objectives, trained one after the other, each a run of its own:

- ``cdlm.objectives.text_vae.TextVAEObjective`` (``objective=latent_vae``) trains the ``TextVAE``; its bound is the
  ELBO with the ``N(0, I)`` prior and its samples are ``N(0, I)`` latents decoded.
- ``cdlm.objectives.latent_prior.LatentFlowPrior`` (``objective=latent_prior``) takes a trained VAE run, frozen, and
  trains a rectified flow on its normalised latents (fitted when the VAE is attached); a block-causal network
  (``cdlm.objectives.latent_network.BlockCausalNetwork``, ``prior_block``) makes it Cola DLM's block-causal prior.

The former single ``LatentDiffusion`` objective with a ``stage`` switch is gone: its ``stage=vae`` and
``stage=prior`` configs are these two classes (``experiment=latent_vae`` and ``experiment=latent_prior`` unchanged).
"""

from __future__ import annotations

from cdlm.objectives.latent_prior import LatentFlowPrior
from cdlm.objectives.text_vae import TextVAEObjective

__all__ = ["LatentFlowPrior", "TextVAEObjective"]

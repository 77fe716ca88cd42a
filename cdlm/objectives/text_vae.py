"""The text-VAE objective, stage 1 of latent diffusion (Cosmos / Cola DLM): docs/math.md §5.

It trains ``cdlm.models.vae.TextVAE``: ``CE(decoder(z + n), x) + beta KL(q(z|x) || N(0, I))`` per token, with the
encoder's input tokens masked at rate ``mask_prob`` and latent noise ``n ~ N(0, s^2 I)``, ``s ~ U(0, latent_noise)``
per sequence (the smoothness augmentations), plus the optional alignment to a frozen sentence encoder
(``cdlm.objectives.latent_align``). Its bound is the plain ELBO with the standard-normal prior; its sampling view
draws ``z ~ N(0, I)`` exactly (the analytic denoiser of unit Gaussian data, in the rectified-flow time map of the
prior) and decodes it. The prior of stage 2 is ``cdlm.objectives.latent_prior.LatentFlowPrior``.
"""

from __future__ import annotations

import torch
from torch import nn

from cdlm import draws
from cdlm.data.tokenizers.base import Tokenizer
from cdlm.models.backbone import Backbone
from cdlm.models.vae import TextVAE
from cdlm.objectives.latent_align import alignment_loss
from cdlm.objectives.latent_checks import check_align, check_times, check_training, check_vae
from cdlm.objectives.sigma_range import SigmaRange
from cdlm.objectives.teacher import FrozenTeacher
from cdlm.objectives.ve import VEObjective, row_sigma
from cdlm.types import Batch, LossOutput


def posterior(vae: TextVAE, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance ``[B, N, d_z]`` of ``batch``, its token padding ``[B, L]`` and latent padding
    ``[B, N]`` (no augmentation)."""
    ids = batch["input_ids"]
    padding = batch.get("attention_mask", torch.ones_like(ids)).bool()
    mean, logvar = vae.encode(ids, padding)
    return mean, logvar, padding, vae.latent_padding(padding)


def bound_per_token(
    decoder: torch.Tensor, latent: torch.Tensor, padding: torch.Tensor, accuracy: torch.Tensor
) -> LossOutput:
    """The bound of docs/math.md §5 per token from each sequence's ``decoder`` and ``latent`` terms ``[B]`` (float64,
    spread over its real tokens ``padding`` ``[B, L]``); logs the reconstruction ``accuracy`` (a count) and the two
    terms per token."""
    n_tokens = padding.sum(-1).double().clamp_min(1)  # [B]
    nll = torch.where(padding, ((decoder + latent) / n_tokens)[:, None], 0.0)  # [B, L]
    all_tokens = n_tokens.sum()
    logs = {
        "recon_accuracy": accuracy / all_tokens,
        "decoder_nll": decoder.sum() / all_tokens,
        "latent_nll": latent.sum() / all_tokens,
    }
    return LossOutput((nll.sum() / all_tokens).float(), nll.float(), padding, {k: v.float() for k, v in logs.items()})


class LatentState(VEObjective):
    """The state of the latent objectives: ``L / r`` latents of width ``d_z`` per sequence (``VEObjective.prior``
    draws ``[n, L / r, d_z]`` at ``sigma_max``). Needs ``vae`` (a ``TextVAE``) and ``compression``."""

    vae: TextVAE
    compression: int

    def state_shape(self, n: int, length: int) -> tuple[int, ...]:
        """``[n, length / r, d_z]``; a ``length`` that is not a multiple of ``r`` is refused (``check_length``)."""
        self.vae.check_length(length)
        return (n, length // self.compression, self.vae.latent_dim)


class TextVAEObjective(SigmaRange, LatentState, nn.Module):
    """The text VAE of latent diffusion, its ELBO and its ``N(0, I)`` sampling view; docs/math.md §5.

    Args:
        backbone: injected like every objective's; only its ``rotary.max_len`` is read (the VAE's longest
            sequence), it is not kept.
        vocab_size: the tokenizer's ``V``.
        compression, latent_dim, vae_width, vae_depth, vae_heads: the ``TextVAE``'s ``r``, ``d_z`` and sizes.
        beta: KL weight of the training loss (the reported bound always uses weight 1).
        mask_prob: encoder-input masking rate. latent_noise: the largest std ``s`` of the latent noise.
        t_min, t_max: the sampling view's time range, ``sigma = t / (1 - t)`` (the prior's time map).
        align: the frozen sentence encoder the pooled posterior mean is aligned to (``minilm`` with ``cdlm[align]``,
            or a local ``transformers`` folder); the run builder loads it and passes it as ``aligner``
            (``cdlm.objectives.teacher.frozen_inputs``). With ``align`` set, a linear head ``d_z -> align_dim`` is
            trained and saved; the encoder is never saved.
        align_weight: weight of ``|normalise(head(mean_n mu)) - f|^2`` in the loss.
        tokenizer: the run's tokenizer (injected), which turns ids back into text for the encoder.
        aligner: the loaded encoder (injected; None inside ``cdlm.load``: then ``loss`` refuses to run).
    """

    space = "continuous"
    data_mean = 0.0
    data_scale = 1.0  # N(0, I) latents

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        compression: int = 4,
        latent_dim: int = 64,
        vae_width: int = 256,
        vae_depth: int = 2,
        vae_heads: int = 4,
        beta: float = 0.01,
        mask_prob: float = 0.1,
        latent_noise: float = 0.5,
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
        align: str | None = None,
        align_weight: float = 1.0,
        align_dim: int = 384,
        tokenizer: Tokenizer | None = None,
        aligner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_vae(vocab_size, compression, latent_dim, vae_width, vae_depth, vae_heads)
        check_training(mask_prob, latent_noise, beta)
        check_times(t_min, t_max)
        check_align(align_weight, align_dim)
        self.vocab_size, self.beta, self.mask_prob, self.latent_noise = vocab_size, beta, mask_prob, latent_noise
        self.t_min, self.t_max = t_min, t_max
        self.vae = TextVAE(
            vocab_size, vae_width, vae_depth, vae_heads, compression, latent_dim, backbone.rotary.max_len
        )
        self.align_path, self.align_weight, self.tokenizer = align, align_weight, tokenizer
        self.aligner = FrozenTeacher()
        if align is not None:
            self.align_head = nn.Linear(latent_dim, align_dim)
        if aligner is not None:
            self.attach_aligner(aligner)

    def attach_aligner(self, encoder: nn.Module) -> None:
        """Hold the frozen alignment encoder (outside the module tree); a clear error unless it fits."""
        if self.align_path is None:
            raise ValueError("an alignment encoder was given but objective.align is null")
        if self.tokenizer is None:
            raise ValueError("the alignment loss decodes ids to text: build the objective with the run's tokenizer")
        if encoder.dim != self.align_head.out_features:
            raise ValueError(
                f"the alignment encoder {self.align_path!r} has width {encoder.dim}; set objective.align_dim"
                f"={encoder.dim} (got {self.align_head.out_features})"
            )
        self.aligner.attach(encoder)

    @property
    def compression(self) -> int:
        return self.vae.compression

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = t / (1 - t)`` with ``t`` clamped to ``[t_min, t_max]``; float64, increasing."""
        t = t.to(torch.float64).clamp(self.t_min, self.t_max)
        return t / (1 - t)

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        """``CE + beta KL`` per real token, with input masking and latent noise (and the alignment term)."""
        ids = batch["input_ids"]
        padding = batch.get("attention_mask", torch.ones_like(ids)).bool()  # [B, L]
        latent_padding = self.vae.latent_padding(padding)  # [B, N]
        mean, logvar = self.vae.encode(ids, padding, self.mask_prob)
        z = TextVAE.sample(mean, logvar)  # [B, N, d_z]
        if self.latent_noise > 0:
            s = self.latent_noise * draws.rand(z.shape[0], 1, 1, device=z.device)  # [B, 1, 1]
            z = z + s * draws.randn_like(z)
        logits = self.vae.decode(z, padding)  # [B, L, V]
        ce = TextVAE.token_nll(logits, ids) * padding  # [B, L]
        kl = (TextVAE.kl(mean, logvar) * latent_padding).sum()
        tokens = padding.sum().clamp_min(1)
        loss = (ce.sum() + self.beta * kl) / tokens
        accuracy = ((logits.argmax(-1) == ids) & padding).sum() / tokens
        logs = {"ce": ce.sum() / tokens, "kl": kl / tokens, "accuracy": accuracy}
        if self.align_path is not None:
            logs["align"] = self.alignment(ids, padding, latent_padding, mean)
            loss = loss + self.align_weight * logs["align"]
        return LossOutput(loss, ce, padding, {k: v.detach() for k, v in logs.items()})

    def alignment(
        self, ids: torch.Tensor, padding: torch.Tensor, latent_padding: torch.Tensor, mean: torch.Tensor
    ) -> torch.Tensor:
        """The alignment loss of ``mean`` ``[B, N, d_z]`` against the frozen encoder's features of the texts."""
        if self.aligner.objective is None:
            raise ValueError(
                f"objective.align={self.align_path!r} is set but no encoder is attached "
                "(cdlm.load does not read it; train through the config)"
            )
        texts = [self.tokenizer.decode(row[keep].tolist()) for row, keep in zip(ids, padding)]
        return alignment_loss(self.aligner.on(ids.device), self.align_head, texts, mean, latent_padding)

    # ---- the bound ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def nll(self, batch: Batch) -> LossOutput:
        """The ELBO per token (docs/math.md §5): one posterior draw ``z ~ q(z | x)`` per sequence,
        ``-log p(x | z) + KL(q(z | x) || N(0, I))``, each sequence's total spread over its real tokens."""
        ids = batch["input_ids"]
        with torch.autocast(ids.device.type, enabled=False):
            mean, logvar, padding, latent_padding = posterior(self.vae, batch)
            z = TextVAE.sample(mean, logvar)  # [B, N, d_z]
            decoder = (TextVAE.token_nll(self.vae.decode(z, padding), ids) * padding).double().sum(-1)  # [B]
            latent = (TextVAE.kl(mean, logvar) * latent_padding).double().sum(-1)  # [B]
            accuracy = ((self.vae.decode(mean, padding).argmax(-1) == ids) & padding).sum()
        return bound_per_token(decoder, latent, padding, accuracy)

    # ---- sampling view (cdlm.types.ContinuousObjective) ---------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """The exact posterior mean of unit Gaussian data, ``x / (1 + sigma^2)`` ``[B, N, d_z]``, so that sampling
        draws the VAE's own prior ``N(0, I)``; ``x0_prev`` is ignored."""
        sigma = row_sigma(sigma, x)  # [B] float64
        return (x.double() / (1 + sigma[:, None, None].square())).to(x.dtype)

    def decoder_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's logits ``[B, L, V]`` at the latents ``x`` ``[B, N, d_z]``."""
        return self.vae.decode(x.float())

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]``: the argmax of the decoder at the latents ``x`` ``[B, N, d_z]``."""
        return self.decoder_logits(x).argmax(-1)

    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        """The posterior mean ``[B, L / r, d_z]`` of ``ids`` ``[B, L]``."""
        return self.vae.encode(ids)[0]

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``-log p(ids | z)`` ``[B, L]`` of the decoder at the latents ``x`` ``[B, L / r, d_z]``."""
        return TextVAE.token_nll(self.decoder_logits(x), ids)

"""Latent diffusion through a text VAE: Cosmos / Cola DLM (LD4LG as ancestor), docs/math.md §5.

Training is staged, one objective with a ``stage`` switch:

- ``stage="vae"`` trains ``cdlm.models.vae.TextVAE``: ``CE(decoder(z + n), x) + beta KL(q(z|x) || N(0, I))`` per
  token, with the encoder's input tokens masked at rate ``mask_prob`` and latent noise ``n ~ N(0, s^2 I)``,
  ``s ~ U(0, latent_noise)`` per sequence (the smoothness augmentations). Its bound is the plain ELBO with the
  standard-normal prior; its sampling view draws ``z ~ N(0, I)`` exactly (the analytic denoiser of unit Gaussian
  data) and decodes it.
- ``stage="prior"`` loads a trained VAE (``vae=<run>``), freezes it, and trains a rectified flow on its normalised
  latents ``z_n = (z - shift) / scale`` (per-dimension statistics of posterior draws, measured on the first training
  batch and stored as buffers with the checkpoint):

      z_t = (1 - t) z_n + t eps,   v = eps - z_n,   loss = |v_hat - v|^2,   t = sigmoid(mu_t + s_t N(0, 1)).

  In the VE coordinates of docs/math.md §0 (``a = 1 - t``, ``b = t``): ``x~ = z_t / (1 - t) = z_n + sigma eps``,
  ``sigma = t / (1 - t)``, and ``x0_hat = z_t - t v_hat``; every continuous sampler and the corrector run unchanged,
  and ``decode`` maps the final latents through the frozen decoder to token ids. The bound (section 5) is

      -log P(x) <= E_q[ -log p(x | z) + log q(z | x) - log p_prior(z) ],

  with ``log p_prior(z) = log p_{sigma_min}(z_n) - N sum_d log scale_d`` from the probability-flow ODE of section 6
  (``cdlm.objectives.ode_likelihood.ode_log_density``) over the ``N = L / r`` latents.

With ``prior_block = K`` the prior is block-causal (Cola DLM): ``cdlm.objectives.latent_blocks``.
The alignment to a frozen sentence encoder (stage ``vae``, optional): ``cdlm.objectives.latent_align``.

The prior's transformer is the injected ``backbone``; in stage ``vae`` it is frozen and idle (and in stage ``prior``
the VAE is), so the optimizer and DDP see only the stage's own weights. A prior checkpoint holds the VAE's weights:
it samples and scores without the VAE run it came from.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from cdlm.checkpoint import LOADING
from cdlm.data.tokenizers.base import Tokenizer
from cdlm.models.backbone import Backbone
from cdlm.models.embeddings import TimeEmbedding
from cdlm.models.vae import TextVAE
from cdlm.objectives.latent_align import alignment_loss, frozen_encoder
from cdlm.objectives.latent_blocks import BlockCausalPrior, x0_from_velocity
from cdlm.objectives.latent_checks import check_prior, check_settings, check_vae
from cdlm.objectives.ode_likelihood import ode_log_density
from cdlm.objectives.sigma_range import SigmaRange
from cdlm.objectives.teacher import load_objective, state_differences
from cdlm.types import Batch, LossOutput

Stage = Literal["vae", "prior"]


class LatentDiffusion(SigmaRange, BlockCausalPrior, nn.Module):
    """Text VAE (stage ``vae``) and rectified-flow latent prior (stage ``prior``); docs/math.md §5.

    Args:
        backbone: the prior's transformer (bidirectional); ``vocab_size``: the tokenizer's ``V``.
        stage: ``"vae"`` or ``"prior"``.
        vae: stage ``prior``: the VAE run to build on (a ``save_pretrained`` folder or ``.ckpt`` of a
            ``stage=vae`` run with the same VAE settings and tokenizer); its VAE weights are copied in and frozen.
            Not read inside ``cdlm.load`` (the prior's checkpoint holds them).
        compression, latent_dim, vae_width, vae_depth, vae_heads: the ``TextVAE``'s ``r``, ``d_z`` and sizes.
        beta: KL weight of stage ``vae`` (the reported bound always uses weight 1).
        mask_prob: encoder-input masking rate of stage ``vae``.
        latent_noise: the largest std ``s`` of the latent noise of stage ``vae`` (``s ~ U(0, latent_noise)``).
        time_mean, time_std: logit-normal training time of the prior, ``t = sigmoid(time_mean + time_std n)``.
        t_min, t_max: the prior's time range; ``sigma = t / (1 - t)`` spans ``[sigma(t_min), sigma(t_max)]``.
        ode_steps: Heun steps of the prior's ODE log-density in the bound.
        prior_block: latents per block of a block-causal prior (sets the backbone's ``mask_mode`` to
            ``block_causal``); None: one bidirectional prior over all latents.
        align: stage ``vae``, optional: a frozen sentence encoder (``minilm`` with ``cdlm[align]``, or a local
            ``transformers`` folder) whose unit-norm feature of each training text the pooled posterior mean must
            predict through a linear head ``d_z -> align_dim``: ``align_weight |normalise(head(mean_n mu)) - f|^2``.
            The encoder is never saved; the head is (in stage ``vae`` runs only).
        tokenizer: the run's tokenizer (injected), which turns ids back into text for the alignment encoder.
    """

    space = "continuous"
    data_mean = 0.0
    data_scale = 1.0  # the prior models normalised latents

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        stage: Stage = "vae",
        vae: str | None = None,
        compression: int = 4,
        latent_dim: int = 64,
        vae_width: int = 256,
        vae_depth: int = 2,
        vae_heads: int = 4,
        beta: float = 0.01,
        mask_prob: float = 0.1,
        latent_noise: float = 0.5,
        time_mean: float = 0.0,
        time_std: float = 1.0,
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
        ode_steps: int = 32,
        align: str | None = None,
        align_weight: float = 1.0,
        align_dim: int = 384,
        prior_block: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        check_settings(stage, t_min, t_max, mask_prob, latent_noise, beta, prior_block)
        check_vae(vocab_size, compression, latent_dim, vae_width, vae_depth, vae_heads)
        check_prior(time_mean, time_std, ode_steps, align_weight, align_dim)
        self.stage, self.vae_path, self.vocab_size, self.prior_block = stage, vae, vocab_size, prior_block
        if prior_block is not None:  # Cola DLM's block-causal prior
            backbone.mask_mode, backbone.block_size = "block_causal", prior_block
        self.beta, self.mask_prob, self.latent_noise = beta, mask_prob, latent_noise
        self.time_mean, self.time_std, self.t_min, self.t_max = time_mean, time_std, t_min, t_max
        self.ode_steps = ode_steps
        self.vae = TextVAE(
            vocab_size, vae_width, vae_depth, vae_heads, compression, latent_dim, backbone.rotary.max_len
        )
        self.backbone = backbone
        self.time_embed = TimeEmbedding(backbone.cond_width)  # t in [0, 1], DiT's x1000
        self.in_proj = nn.Linear(latent_dim, backbone.width)
        self.out_proj = nn.Linear(backbone.width, latent_dim)
        nn.init.zeros_(self.out_proj.weight)  # v_hat = 0 at init
        nn.init.zeros_(self.out_proj.bias)
        self.register_buffer("latent_shift", torch.zeros(latent_dim))
        self.register_buffer("latent_scale", torch.ones(latent_dim))
        self.register_buffer("stats_ready", torch.tensor(False))
        self.align_path, self.align_weight, self.tokenizer, self.aligner = align, align_weight, tokenizer, None
        if align is not None and stage == "vae":
            self.align_head = nn.Linear(latent_dim, align_dim)
            if not LOADING.get():
                self.attach_aligner(align, align_dim)
        self.freeze_other_stage()

    def freeze_other_stage(self) -> None:
        """Freeze the parts the stage does not train; stage ``prior`` copies in its VAE run's weights."""
        if self.stage == "vae":
            self.prior_parts().requires_grad_(False)
            return
        self.vae.requires_grad_(False)
        if not LOADING.get():  # cdlm.load replaces every weight, the VAE's included
            if self.vae_path is None:
                raise ValueError(
                    "stage=prior trains on a frozen VAE: set objective.vae to a stage=vae run "
                    "(e.g. runs/latent_vae/final, from python train.py experiment=latent_vae)"
                )
            self.load_vae(self.vae_path)

    def attach_aligner(self, name_or_path: str, align_dim: int) -> None:
        """Load the frozen alignment encoder (``cdlm.objectives.latent_align``); it needs the run's tokenizer."""
        if self.tokenizer is None:
            raise ValueError("the alignment loss decodes ids to text: build the objective with the run's tokenizer")
        self.aligner = frozen_encoder(name_or_path, align_dim)

    def alignment(
        self, ids: torch.Tensor, padding: torch.Tensor, latent_padding: torch.Tensor, mean: torch.Tensor
    ) -> torch.Tensor:
        """The alignment loss of ``mean`` ``[B, N, d_z]`` against the frozen encoder's features of the texts."""
        if self.aligner is None or self.aligner.objective is None:
            raise ValueError(
                f"objective.align={self.align_path!r} is set but no encoder is attached "
                "(cdlm.load does not read it; train through the config)"
            )
        texts = [self.tokenizer.decode(row[keep].tolist()) for row, keep in zip(ids, padding)]
        return alignment_loss(self.aligner.on(ids.device), self.align_head, texts, mean, latent_padding)

    def prior_parts(self) -> nn.ModuleList:
        """The prior's own modules (trained in stage ``prior``, frozen in stage ``vae``)."""
        return nn.ModuleList([self.backbone, self.time_embed, self.in_proj, self.out_proj])

    def train(self, mode: bool = True) -> LatentDiffusion:
        """As ``nn.Module.train``, but the frozen VAE of stage ``prior`` stays in eval mode."""
        super().train(mode)
        if self.stage == "prior":
            self.vae.eval()
        return self

    @property
    def compression(self) -> int:
        return self.vae.compression

    # ---- the VAE of stage prior -----------------------------------------------------------------------------------
    def load_vae(self, path: str) -> None:
        """Copy the VAE weights of the ``stage=vae`` run at ``path``; a clear error if they do not fit."""
        source, model_config = load_objective(path)
        if not isinstance(source, LatentDiffusion):
            raise ValueError(f"objective.vae={path!r} is a {type(source).__name__} run, not a latent (stage=vae) run")
        if source.vocab_size != self.vocab_size:
            raise ValueError(
                f"the VAE at {path!r} has vocab_size {source.vocab_size}, this run {self.vocab_size}: "
                "use the VAE run's data config (tokenizer)"
            )
        theirs = source.vae.state_dict()
        if diffs := state_differences(self.vae.state_dict(), theirs):
            raise ValueError(
                f"the VAE at {path!r} does not match objective settings (compression, latent_dim, vae_width, "
                f"vae_depth, vae_heads): {diffs[:6]}; the VAE run used compression={source.compression}, "
                f"latent_dim={source.vae.latent_dim}"
            )
        self.vae.load_state_dict(theirs)

    # ---- latents ------------------------------------------------------------------------------------------------
    def posterior(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance ``[B, N, d_z]`` of ``batch``, its token padding ``[B, L]`` and latent
        padding ``[B, N]`` (no augmentation)."""
        ids = batch["input_ids"]
        padding = batch.get("attention_mask", torch.ones_like(ids)).bool()
        mean, logvar = self.vae.encode(ids, padding)
        return mean, logvar, padding, self.vae.latent_padding(padding)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift) / self.latent_scale

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.latent_scale + self.latent_shift

    @torch.no_grad()
    def fit_statistics(self, z: torch.Tensor, latent_padding: torch.Tensor) -> None:
        """Per-dimension mean and std of the posterior draws ``z`` ``[B, N, d_z]`` over real latents (summed over
        ranks under DDP) into ``latent_shift`` / ``latent_scale``; marks them ready."""
        w = latent_padding.double()[..., None]  # [B, N, 1]
        sums = torch.stack([w.sum(), *(w * z.double()).sum((0, 1)), *(w * z.double().square()).sum((0, 1))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        d = z.shape[-1]
        count, mean, square = sums[0], sums[1 : 1 + d] / sums[0], sums[1 + d :] / sums[0]
        std = (square - mean.square()).clamp_min(1e-12).sqrt()
        self.latent_shift.copy_(mean.float())
        self.latent_scale.copy_(std.float())
        self.stats_ready.fill_(bool(count > 0))

    # ---- the prior's network ------------------------------------------------------------------------------------
    def velocity(self, z: torch.Tensor, t: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``v_hat`` ``[B, N, d_z]`` float32 for the native state ``z_t`` ``[B, N, d_z]`` at time ``t`` ``[B]``."""
        h = self.backbone(self.in_proj(z), self.time_embed(t.float()), padding)  # [B, N, W]
        return self.out_proj(h).float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = t / (1 - t)`` with ``t`` clamped to ``[t_min, t_max]``; float64, increasing."""
        t = t.to(torch.float64).clamp(self.t_min, self.t_max)
        return t / (1 - t)

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        return self.vae_loss(batch) if self.stage == "vae" else self.prior_loss(batch)

    def vae_loss(self, batch: Batch) -> LossOutput:
        """``CE + beta KL`` per real token, with input masking and latent noise."""
        ids = batch["input_ids"]
        padding = batch.get("attention_mask", torch.ones_like(ids)).bool()  # [B, L]
        latent_padding = self.vae.latent_padding(padding)  # [B, N]
        mean, logvar = self.vae.encode(ids, padding, self.mask_prob)
        z = TextVAE.sample(mean, logvar)  # [B, N, d_z]
        if self.latent_noise > 0:
            s = self.latent_noise * torch.rand(z.shape[0], 1, 1, device=z.device)  # [B, 1, 1]
            z = z + s * torch.randn_like(z)
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

    def prior_loss(self, batch: Batch) -> LossOutput:
        """Rectified-flow MSE on normalised posterior draws of the frozen VAE, logit-normal ``t`` from ``u``."""
        with torch.no_grad():
            mean, logvar, padding, latent_padding = self.posterior(batch)
            z = TextVAE.sample(mean, logvar)  # [B, N, d_z]
            if not bool(self.stats_ready):
                self.fit_statistics(z, latent_padding)
            x0 = self.normalise(z)
        u = batch["u"] if "u" in batch else torch.rand(x0.shape[0], device=x0.device)  # [B]
        if self.prior_block is not None:  # a time per block, stratified over the blocks of a sequence
            n_blocks = -(-x0.shape[1] // self.prior_block)
            u = (u[:, None] + torch.arange(n_blocks, device=u.device) / n_blocks) % 1.0  # [B, n_blocks]
            u = u.repeat_interleave(self.prior_block, 1)[:, : x0.shape[1]]  # [B, N]
        normal = torch.special.ndtri(u.double().clamp(1e-6, 1 - 1e-6))
        t = torch.sigmoid(self.time_mean + self.time_std * normal).clamp(self.t_min, self.t_max).float()  # [B(, N)]
        eps = torch.randn_like(x0)
        t_b = t[:, None, None] if t.dim() == 1 else t[..., None]  # [B, 1 | N, 1]
        z_t = (1 - t_b) * x0 + t_b * eps
        if self.prior_block is None:
            v_hat = self.velocity(z_t, t, latent_padding)  # [B, N, d_z]
        else:
            v_hat = self.block_velocity(z_t, t, x0, latent_padding)
        mse = (v_hat - (eps - x0)).square().mean(-1) * latent_padding  # [B, N]
        loss = mse.sum() / latent_padding.sum().clamp_min(1)
        per_sequence = mse.sum(-1) / padding.sum(-1).clamp_min(1)  # spread over the sequence's tokens
        return LossOutput(loss, per_sequence[:, None] * padding, padding, {"t": t.mean()})

    # ---- the bound ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def nll(self, batch: Batch) -> LossOutput:
        """The bound of docs/math.md §5 per token (each sequence's total spread over its real tokens).

        One posterior draw ``z ~ q(z | x)`` per sequence: ``-log p(x | z) + log q(z | x) - log p(z)`` with the
        standard normal ``p`` in stage ``vae`` (the ELBO, ``log q - log p`` in closed form as the KL) and the flow
        prior's ODE density in stage ``prior``. ``logs``: the reconstruction accuracy of the posterior mean, the
        decoder term and the latent term per token.
        """
        ids = batch["input_ids"]
        with torch.autocast(ids.device.type, enabled=False):
            mean, logvar, padding, latent_padding = self.posterior(batch)
            z = TextVAE.sample(mean, logvar)  # [B, N, d_z]
            decoder = (TextVAE.token_nll(self.vae.decode(z, padding), ids) * padding).double().sum(-1)  # [B]
            if self.stage == "vae" or not bool(self.stats_ready):
                latent = (TextVAE.kl(mean, logvar) * latent_padding).double().sum(-1)  # [B]
            else:
                log_q = (TextVAE.log_posterior(z, mean, logvar) * latent_padding).double().sum(-1)
                z_n = self.normalise(z)
                prior = self if self.prior_block is None else self.given_clean(z_n, latent_padding)
                log_p = ode_log_density(prior, z_n.double(), self.ode_steps, padding=latent_padding)
                log_p = log_p - latent_padding.double().sum(-1) * self.latent_scale.double().log().sum()
                latent = log_q - log_p
            accuracy = ((self.vae.decode(mean, padding).argmax(-1) == ids) & padding).sum()
        n_tokens = padding.sum(-1).double().clamp_min(1)  # [B]
        total = decoder + latent
        nll = torch.where(padding, (total / n_tokens)[:, None], 0.0)  # [B, L]
        all_tokens = n_tokens.sum()
        logs = {
            "recon_accuracy": accuracy / all_tokens,
            "decoder_nll": decoder.sum() / all_tokens,
            "latent_nll": latent.sum() / all_tokens,
        }
        return LossOutput(
            (nll.sum() / all_tokens).float(), nll.float(), padding, {k: v.float() for k, v in logs.items()}
        )

    # ---- sampling view (cdlm.types.ContinuousObjective) ---------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat`` ``[B, N, d_z]`` for the VE state ``x`` at ``sigma`` ``[B]``; ``x0_prev`` is ignored.

        Stage ``prior``: ``z_t = x / (1 + sigma)``, ``t = sigma / (1 + sigma)``, ``x0_hat = z_t - t v_hat``
        (``x0_from_velocity``; a block-causal prior samples through ``sample_blocks`` instead). Stage ``vae``: the
        exact posterior mean of unit Gaussian data, ``x / (1 + sigma^2)``, so sampling draws the VAE's own prior
        ``N(0, I)``.
        """
        if self.stage == "vae":
            sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
            return (x.double() / (1 + sigma[:, None, None].square())).to(x.dtype)
        if self.prior_block is not None:
            raise ValueError("a block-causal prior denoises block by block: sample it through sample_blocks")
        return x0_from_velocity(x, sigma, self.velocity)

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A draw at ``sigma_max`` ``[n, length / r, d_z]``: ``N(0, (sigma_max^2 + 1) I)``."""
        self.vae.check_length(length)
        std = math.sqrt(self.sigma_max**2 + self.data_scale**2)
        shape = (n, length // self.compression, self.vae.latent_dim)
        return std * torch.randn(shape, device=device, generator=generator)

    def decoder_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen decoder's logits ``[B, L, V]`` at the unnormalised latents of ``x`` ``[B, N, d_z]``."""
        return self.vae.decode(self.unnormalise(x))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]``: the argmax of the frozen decoder on the unnormalised latents ``x`` ``[B, N, d_z]``."""
        return self.decoder_logits(x).argmax(-1)

    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        """The normalised posterior mean ``[B, L / r, d_z]`` of ``ids`` ``[B, L]``."""
        mean, _ = self.vae.encode(ids)
        return self.normalise(mean)

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``-log p(ids | z)`` ``[B, L]`` of the decoder at the unnormalised latents of ``x`` ``[B, L / r, d_z]``."""
        return TextVAE.token_nll(self.decoder_logits(x), ids)

"""The latent flow prior, stage 2 of latent diffusion (Cosmos / Cola DLM): docs/math.md §5.

A rectified flow on the normalised latents ``z_n = (z - shift) / scale`` of a frozen text VAE
(``cdlm.objectives.text_vae.TextVAEObjective``):

    z_t = (1 - t) z_n + t eps,   v = eps - z_n,   loss = |v_hat - v|^2,   t = sigmoid(mu_t + s_t N(0, 1)).

``shift`` and ``scale`` are the per-dimension mean and std of the aggregate posterior over a batch of training
text, fitted by ``fit_statistics`` before training (the run builder does it from the training split when it
attaches the VAE) and saved as buffers. In the VE coordinates of docs/math.md §0 (``a = 1 - t``, ``b = t``):
``x~ = z_t / (1 - t) = z_n + sigma eps``, ``sigma = t / (1 - t)``, ``x0_hat = z_t - t v_hat``; every continuous sampler
and the corrector run unchanged, and ``decode`` maps the final latents through the frozen decoder. The bound is

    -log P(x) <= E_q[ -log p(x | z) + log q(z | x) - log p_prior(z) ],

with ``log p_prior(z) = log p_{sigma_min}(z_n) - N sum_d log scale_d`` from the probability-flow ODE of section 6
over the ``N = L / r`` latents; it refuses to run before the statistics exist. With ``prior_block = K`` the network
is block-causal (``cdlm.objectives.latent_network.BlockCausalNetwork``) and samples block by block
(``cdlm.objectives.latent_blocks``). A prior checkpoint holds the VAE's weights: it samples and scores without the VAE
run it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cdlm import draws
from cdlm.models.backbone import Backbone
from cdlm.models.vae import TextVAE
from cdlm.objectives.latent_blocks import given_clean, sample_blocks, x0_from_velocity
from cdlm.objectives.latent_checks import check_prior, check_times, check_vae
from cdlm.objectives.latent_network import BlockCausalNetwork, PriorNetwork
from cdlm.objectives.ode_likelihood import ode_log_densities, probe_standard_error
from cdlm.objectives.sigma_range import SigmaRange
from cdlm.objectives.teacher import state_differences
from cdlm.objectives.text_vae import LatentState, TextVAEObjective, bound_per_token, posterior
from cdlm.objectives.training_time import training_u
from cdlm.prompts import Prompt
from cdlm.types import Batch, LossOutput

NO_STATISTICS = (
    "the latent prior's normalisation statistics are not fitted: call fit_statistics(batch) on training text "
    "first (a run built from its config does it when it loads objective.vae)"
)


class LatentFlowPrior(SigmaRange, LatentState, nn.Module):
    """Rectified-flow prior over the normalised latents of a frozen text VAE; docs/math.md §5.

    Args:
        backbone: the prior's transformer; ``vocab_size``: the tokenizer's ``V``.
        vae: the ``TextVAEObjective`` run to build on (a ``save_pretrained`` folder or ``.ckpt``); the run builder
            loads it (``cdlm.checkpoint.load_frozen``) and passes it as ``vae_model``.
        compression, latent_dim, vae_width, vae_depth, vae_heads: the VAE's sizes (must be the VAE run's; they
            build the VAE's slot, which the VAE run's or the checkpoint's weights fill).
        time_mean, time_std: logit-normal training time, ``t = sigmoid(time_mean + time_std n)``.
        t_min, t_max: the time range; ``sigma = t / (1 - t)`` spans ``[sigma(t_min), sigma(t_max)]``.
        ode_steps: Heun steps of the ODE log-density in the bound.
        ode_probes: Hutchinson probes per sequence in the bound, all on one ODE trajectory; ``>= 2`` also reports the
            bound's standard error ``nll_se`` (docs/math.md §6).
        prior_block: latents per block of a block-causal prior (Cola DLM); None: one bidirectional prior.
        vae_model: the loaded VAE objective (injected): its VAE weights are copied in and frozen. None inside
            ``cdlm.load`` (the checkpoint holds them) or for an untrained prior built in code.
    """

    space = "continuous"
    data_mean = 0.0
    data_scale = 1.0  # the prior models normalised latents

    @staticmethod
    def attention_for(options: Mapping[str, Any]) -> dict[str, Any]:
        """The backbone settings these ``options`` (the objective's config) need: with ``prior_block = K``, a
        ``block_causal`` mask over blocks of ``K`` latents; else nothing (``cdlm.config.apply_attention``)."""
        block = options.get("prior_block")
        return {} if block is None else {"mask_mode": "block_causal", "block_size": block}

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        vae: str | None = None,
        compression: int = 4,
        latent_dim: int = 64,
        vae_width: int = 256,
        vae_depth: int = 2,
        vae_heads: int = 4,
        time_mean: float = 0.0,
        time_std: float = 1.0,
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
        ode_steps: int = 32,
        prior_block: int | None = None,
        vae_model: TextVAEObjective | None = None,
        ode_probes: int = 1,
    ) -> None:
        super().__init__()
        check_vae(vocab_size, compression, latent_dim, vae_width, vae_depth, vae_heads)
        check_times(t_min, t_max)
        check_prior(time_mean, time_std, ode_steps, prior_block, ode_probes)
        self.vae_path, self.vocab_size, self.prior_block = vae, vocab_size, prior_block
        self.time_mean, self.time_std, self.t_min, self.t_max = time_mean, time_std, t_min, t_max
        self.ode_steps, self.ode_probes = ode_steps, ode_probes
        self.vae = TextVAE(
            vocab_size, vae_width, vae_depth, vae_heads, compression, latent_dim, backbone.rotary.max_len
        ).requires_grad_(False)
        if prior_block is None:
            self.network = PriorNetwork(backbone, latent_dim)
        else:
            self.network = BlockCausalNetwork(backbone, latent_dim, prior_block)
        self.register_buffer("latent_shift", torch.zeros(latent_dim))
        self.register_buffer("latent_scale", torch.ones(latent_dim))
        self.register_buffer("stats_ready", torch.tensor(False))
        if vae_model is not None:
            self.attach_vae(vae_model)

    # ---- the frozen VAE and its statistics ----------------------------------------------------------------------
    def attach_vae(self, source: TextVAEObjective) -> None:
        """Copy the VAE weights of ``source``; a clear error if they do not fit. The statistics must be fitted anew."""
        if not isinstance(source, TextVAEObjective):
            raise ValueError(f"objective.vae={self.vae_path!r} is a {type(source).__name__} run, not a text VAE run")
        if source.vocab_size != self.vocab_size:
            raise ValueError(
                f"the VAE at {self.vae_path!r} has vocab_size {source.vocab_size}, this run {self.vocab_size}: "
                "use the VAE run's data config (tokenizer)"
            )
        theirs = source.vae.state_dict()
        if diffs := state_differences(self.vae.state_dict(), theirs):
            raise ValueError(
                f"the VAE at {self.vae_path!r} does not match objective settings (compression, latent_dim, vae_width, "
                f"vae_depth, vae_heads): {diffs[:6]}; the VAE run used compression={source.compression}, "
                f"latent_dim={source.vae.latent_dim}"
            )
        self.vae.load_state_dict(theirs)
        self.stats_ready.fill_(False)

    @torch.no_grad()
    def fit_statistics(self, batch: Batch) -> None:
        """Per-dimension mean and std of the aggregate posterior ``mean_x q(z | x)`` over the real latents of
        ``batch`` (``E[z] = avg mu``, ``E[z^2] = avg(mu^2 + exp(logvar))``, exact, no draws) into ``latent_shift`` /
        ``latent_scale``; marks them ready."""
        was_training = self.vae.training
        self.vae.eval()
        device = self.latent_shift.device
        mean, logvar, _, latent_padding = posterior(self.vae, {k: v.to(device) for k, v in batch.items()})
        self.vae.train(was_training)
        w = latent_padding.double()[..., None]  # [B, N, 1]
        count = w.sum()
        if count == 0:
            raise ValueError("fit_statistics needs at least one real latent in the batch")
        first = (w * mean.double()).sum((0, 1)) / count  # [d_z]
        second = (w * (mean.double().square() + logvar.double().exp())).sum((0, 1)) / count
        self.latent_shift.copy_(first.float())
        self.latent_scale.copy_((second - first.square()).clamp_min(1e-12).sqrt().float())
        self.stats_ready.fill_(True)

    def check_statistics(self) -> None:
        if not bool(self.stats_ready):
            raise ValueError(NO_STATISTICS)

    def train(self, mode: bool = True) -> LatentFlowPrior:
        """As ``nn.Module.train``, but the frozen VAE stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def compression(self) -> int:
        return self.vae.compression

    @property
    def blockwise(self) -> bool:
        """Whether sampling goes block by block through ``sample_blocks`` (a block-causal prior)."""
        return self.prior_block is not None

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift) / self.latent_scale

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.latent_scale + self.latent_shift

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = t / (1 - t)`` with ``t`` clamped to ``[t_min, t_max]``; float64, increasing."""
        t = t.to(torch.float64).clamp(self.t_min, self.t_max)
        return t / (1 - t)

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        """Rectified-flow MSE on normalised posterior draws of the frozen VAE, logit-normal ``t`` from ``u``."""
        self.check_statistics()
        with torch.no_grad():
            mean, logvar, padding, latent_padding = posterior(self.vae, batch)
            x0 = self.normalise(TextVAE.sample(mean, logvar))  # [B, N, d_z]
        u = training_u(batch)  # [B]
        if self.prior_block is not None:  # a time per block, stratified over the blocks of a sequence
            n_blocks = -(-x0.shape[1] // self.prior_block)
            u = (u[:, None] + torch.arange(n_blocks, device=u.device) / n_blocks) % 1.0  # [B, n_blocks]
            u = u.repeat_interleave(self.prior_block, 1)[:, : x0.shape[1]]  # [B, N]
        normal = torch.special.ndtri(u.double().clamp(1e-6, 1 - 1e-6))
        t = torch.sigmoid(self.time_mean + self.time_std * normal).clamp(self.t_min, self.t_max).float()  # [B(, N)]
        eps = draws.randn_like(x0)
        t_b = t[:, None, None] if t.dim() == 1 else t[..., None]  # [B, 1 | N, 1]
        z_t = (1 - t_b) * x0 + t_b * eps
        if self.prior_block is None:
            v_hat = self.network(z_t, t, latent_padding)  # [B, N, d_z]
        else:
            v_hat = self.network.two_stream(z_t, t, x0, latent_padding)
        mse = (v_hat - (eps - x0)).square().mean(-1) * latent_padding  # [B, N]
        loss = mse.sum() / latent_padding.sum().clamp_min(1)
        per_sequence = mse.sum(-1) / padding.sum(-1).clamp_min(1)  # spread over the sequence's tokens
        return LossOutput(loss, per_sequence[:, None] * padding, padding, {"t": t.mean()})

    # ---- the bound ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def nll(self, batch: Batch) -> LossOutput:
        """The bound of docs/math.md §5 per token (each sequence's total spread over its real tokens).

        One posterior draw ``z ~ q(z | x)`` per sequence: ``-log p(x | z) + log q(z | x) - log p(z)`` with the flow
        prior's ODE density. ``logs``: the reconstruction accuracy of the posterior mean, the decoder term and the
        latent term per token, and with ``ode_probes >= 2`` the bound's Hutchinson standard error ``nll_se`` (the
        spread of the ``R`` per-probe bounds over the same draws, as ``ode_likelihood.ode_nll``). A clear error before
        the statistics are fitted.
        """
        self.check_statistics()
        ids = batch["input_ids"]
        with torch.autocast(ids.device.type, enabled=False):
            mean, logvar, padding, latent_padding = posterior(self.vae, batch)
            z = TextVAE.sample(mean, logvar)  # [B, N, d_z]
            decoder = (TextVAE.token_nll(self.vae.decode(z, padding), ids) * padding).double().sum(-1)  # [B]
            log_q = (TextVAE.log_posterior(z, mean, logvar) * latent_padding).double().sum(-1)
            z_n = self.normalise(z)
            view = self if self.prior_block is None else given_clean(self.network, self, z_n, latent_padding)
            log_ps = ode_log_densities(
                view, z_n.double(), self.ode_steps, padding=latent_padding, probes=self.ode_probes
            )
            log_ps = log_ps - latent_padding.double().sum(-1) * self.latent_scale.double().log().sum()  # [R, B]
            accuracy = ((self.vae.decode(mean, padding).argmax(-1) == ids) & padding).sum()
        out = bound_per_token(decoder, log_q - log_ps.mean(0), padding, accuracy)
        if self.ode_probes >= 2:
            out.logs["nll_se"] = probe_standard_error(decoder + log_q - log_ps, padding.sum().clamp_min(1))
        return out

    # ---- sampling view (cdlm.types.ContinuousObjective, BlockwiseObjective) -------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_hat`` ``[B, N, d_z]`` for the VE state ``x`` at ``sigma`` ``[B]`` (``x0_from_velocity``); ``x0_prev``
        is ignored. A block-causal prior samples through ``sample_blocks`` instead."""
        return x0_from_velocity(x, sigma, self.network)

    def sample_blocks(self, run, x: torch.Tensor, prompt: Prompt | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` from the block-causal prior, block after block (``latent_blocks.sample_blocks``).

        ``prompt``: a prefix per row (``prompt_blocks``): its complete blocks are the first clean blocks, the rest are
        drawn given them, and the returned ids hold the prompt's tokens at its positions (docs/sampling.md,
        "Prompts")."""
        if self.prior_block is None:
            raise ValueError("sample_blocks needs a block-causal prior (objective.prior_block)")
        given = None if prompt is None else self.prompt_blocks(prompt)
        ids = self.decode(sample_blocks(self.network, self, run, x, given))
        return ids if prompt is None else prompt.apply(ids)

    def prompt_blocks(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents [B, N, d_z], blocks [B])`` of a prefix prompt: each row's complete blocks of
        ``prior_block * compression`` tokens, encoded by the frozen VAE from those tokens alone (the rest is padding
        to the encoder) as normalised posterior means, and how many there are. A prompt token past the last complete
        block is kept in the output but does not condition the latents; a fixed position after a free one (a suffix,
        an infilling template) is a ``ValueError``."""
        fixed = prompt.fixed
        lead = fixed.long().cumprod(1).sum(1)  # [B] leading fixed positions
        if bool((fixed.sum(1) != lead).any()):
            raise ValueError("a latent prior keeps a prefix prompt only (no suffix or infilling spans)")
        tokens = self.prior_block * self.compression  # tokens per block
        blocks = lead // tokens  # [B]
        padding = torch.arange(fixed.shape[1], device=fixed.device)[None] < (blocks * tokens)[:, None]  # [B, L]
        mean, _ = self.vae.encode(prompt.ids, padding)
        return self.normalise(mean), blocks

    def decoder_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen decoder's logits ``[B, L, V]`` at the unnormalised latents of ``x`` ``[B, N, d_z]``."""
        return self.vae.decode(self.unnormalise(x))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]``: the argmax of the frozen decoder on the unnormalised latents ``x`` ``[B, N, d_z]``."""
        return self.decoder_logits(x).argmax(-1)

    def clean_state(self, ids: torch.Tensor) -> torch.Tensor:
        """The normalised posterior mean ``[B, L / r, d_z]`` of ``ids`` ``[B, L]``."""
        return self.normalise(self.vae.encode(ids)[0])

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``-log p(ids | z)`` ``[B, L]`` of the decoder at the unnormalised latents of ``x`` ``[B, L / r, d_z]``."""
        return TextVAE.token_nll(self.decoder_logits(x), ids)

"""Masked (absorbing-state) discrete diffusion: MDLM (Sahoo et al., 2024), docs/math.md §1.

Tokens are replaced by ``[MASK]`` with probability ``1 - alpha_t``; the network predicts the clean token at
masked positions under the SUBS parameterisation (the mask token gets zero probability and visible tokens
are carried over), and the loss is the continuous-time NELBO (MDLM eq. 10):

    NELBO = E_t sum_l 1[z_t^l = m] * (-alpha'_t / (1 - alpha_t)) * CE(p_theta^l, x^l).
"""

from __future__ import annotations

import torch
from torch import nn

from cdlm import checks, draws
from cdlm.device import host_resident
from cdlm.models.backbone import Backbone
from cdlm.models.embeddings import TimeEmbedding
from cdlm.models.span_cache import SpanCache
from cdlm.objectives.chunked_ce import chunked_cross_entropy
from cdlm.objectives.schedules import build_schedule
from cdlm.objectives.training_time import training_u
from cdlm.types import Batch, LossOutput

NEG_INF = -1e6  # the SUBS "-inf" for the mask logit: large but finite, so bf16/float32 stay NaN-free


class MaskedDiffusion(nn.Module):
    """MDLM objective; owns the token embedding (``V + 1`` rows, the last is ``[MASK]``) and the output head.

    Args:
        backbone: the shared transformer (bidirectional mask).
        vocab_size: ``V``, the tokenizer's vocabulary; ``mask_id = V``.
        schedule: ``loglinear`` or ``cosine``.
        eps: the schedule's ``eps`` in [0, 1) (``alpha_1 = eps`` for log-linear).
        t_min: training draws ``t = t_min + (1 - t_min) u``; in [0, 1).
        time_conditioning: feed ``t`` to the backbone; off by default (MDLM), which lets samplers reuse
            ``p_theta`` when no token changed.
    """

    space = "discrete"

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        schedule: str = "loglinear",
        eps: float = 1e-3,
        t_min: float = 1e-3,
        time_conditioning: bool = False,
    ) -> None:
        super().__init__()
        checks.positive_ints(vocab_size=vocab_size)
        checks.in_interval("t_min", t_min, 0.0, 1.0, high_open=True)
        self.backbone, self.vocab_size, self.mask_id = backbone, vocab_size, vocab_size
        self.schedule = build_schedule(schedule, eps)
        self.t_min, self.time_conditioning = t_min, time_conditioning
        width = backbone.width
        self.embed = nn.Embedding(vocab_size + 1, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.time_embed = TimeEmbedding(backbone.cond_width) if time_conditioning else None
        self.head = nn.Linear(width, vocab_size)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    def hidden(self, z: torch.Tensor, t: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone features ``[B, L, D]`` for noisy ids ``z`` ``[B, L]`` at times ``t`` ``[B]``."""
        c = self.time_embed(t) if self.time_embed is not None else None
        return self.backbone(self.embed(z), c, padding)

    def logits(self, z: torch.Tensor, t: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits over the ``V`` real tokens ``[B, L, V]``.

        The head has no ``[MASK]`` column: SUBS's zero mask probability holds by construction.
        """
        return self.head(self.hidden(z, t, padding))

    def denoise(self, z: torch.Tensor, t: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """SUBS ``log p_theta(x0 | z_t)`` ``[B, L, V]`` in float32: visible positions are one-hot on their token."""
        return self.subs(self.logits(z, t, padding), z)

    def denoise_span(self, z: torch.Tensor, t: torch.Tensor, cache: SpanCache, span: slice) -> torch.Tensor:
        """``denoise``'s rows ``[B, n, V]`` for the positions ``span`` of ``z`` ``[B, L]``, fed alone through the
        backbone over ``cache``'s keys and values of the other positions (Fast-dLLM's block caches,
        ``cdlm.models.span_cache``; approximate: those keys are as of the cache's last full pass).

        An empty ``cache`` needs the whole sequence (``span = slice(0, L)``): that pass equals ``denoise`` and
        fills the cache.
        """
        c = self.time_embed(t) if self.time_embed is not None else None
        h = self.backbone(self.embed(z[:, span]), c, cache=cache.feed(span.start or 0))  # [B, n, D]
        return self.subs(self.head(h), z[:, span])

    def denoise_positions(
        self, z: torch.Tensor, t: torch.Tensor, cache: SpanCache, index: torch.Tensor
    ) -> torch.Tensor:
        """``denoise``'s rows ``[B, m, V]`` at each row's positions ``index`` ``[B, m]`` of ``z`` ``[B, L]``, fed alone
        over ``cache``'s keys and values of the other positions (dKV-Cache; the cache must be filled)."""
        c = self.time_embed(t) if self.time_embed is not None else None
        chosen = z.gather(1, index)  # [B, m]
        h = self.backbone(self.embed(chosen), c, cache=cache.feed_positions(index))  # [B, m, D]
        return self.subs(self.head(h), chosen)

    def subs(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """SUBS: ``log_softmax(logits)`` ``[B, L, V]`` in float32 where ``z`` ``[B, L]`` is masked, the log one-hot
        of the visible token elsewhere. The log one-hot is written by a scatter: no ``[B, L, V]`` one-hot is built.
        """
        logp = logits.float().log_softmax(-1)  # [B, L, V]
        del logits  # the caller's temporary: freed before the masked copy below (peak memory)
        visible = (z != self.mask_id)[..., None]  # [B, L, 1]
        token = z.clamp_max(self.vocab_size - 1)[..., None]  # [B, L, 1]
        carried = torch.where(visible, 0.0, logp.gather(-1, token))  # [B, L, 1]: log 1 on a visible token
        return logp.masked_fill(visible, NEG_INF).scatter_(-1, token, carried)  # log one-hot at visible positions

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The absorbing prior: every position masked, ``[n, length]``."""
        return torch.full((n, length), self.mask_id, dtype=torch.long, device=device)

    def nelbo(
        self, x: torch.Tensor, padding: torch.Tensor, t: torch.Tensor, fixed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NELBO terms ``[B, L]`` (nats) and the masked-position indicator, one mask draw per row;
        positions in ``fixed`` ``[B, L]`` (bool, or None) are never masked and carry no term.

        Static shapes and no host sync: the cross-entropy is taken at every position and multiplied by the mask
        (docs/math.md §1's indicator), in chunks of positions so that the ``[B, L, V]`` logits never exist whole
        (``chunked_cross_entropy``).
        """
        alpha = self.schedule.alpha(t)[:, None]  # [B, 1]
        maskable = padding if fixed is None else padding & ~fixed  # [B, L]
        masked = (draws.rand(*x.shape, device=x.device) < 1 - alpha) & maskable  # [B, L]
        z = torch.where(masked, self.mask_id, x)
        h = self.hidden(z, t, padding)  # [B, L, D]
        ce = self.masked_cross_entropy(h, x, masked)  # [B, L]
        nll = ce * self.schedule.weight(t.float())[:, None] * masked  # [B, L]: zero off the masked positions
        return nll, masked

    def masked_cross_entropy(self, h: torch.Tensor, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """``-log p_theta(x | z)`` ``[B, L]`` (float32) at the masked positions, from the hidden states ``h``
        ``[B, L, D]``; the other entries are 0 or the loss of a stand-in target, which the caller multiplies by 0.

        On an accelerator, in static shape: the head runs at every position (no host sync). In host memory, where
        reading the mask is free, the head runs on the masked rows only: the same per-row losses for about half the
        head's work (``cdlm.device.host_resident``).
        """
        if host_resident(masked):
            rows = masked.flatten().nonzero().squeeze(1)  # [M]
            losses = chunked_cross_entropy(h.flatten(0, 1)[rows], self.head, x.flatten()[rows])  # [M]
            return losses.new_zeros(x.numel()).index_copy(0, rows, losses).view(x.shape)
        target = torch.where(masked, x, 0)  # [B, L]: an id in range where no loss is taken (padding ids may not be)
        return chunked_cross_entropy(h.flatten(0, 1), self.head, target.flatten()).view(x.shape)

    def loss(self, batch: Batch) -> LossOutput:
        """Training loss: NELBO per valid token with ``t = t_min + (1 - t_min) u`` (``u`` low-discrepancy)."""
        x, padding = batch["input_ids"], batch["attention_mask"]
        u = training_u(batch)
        t = self.t_min + (1 - self.t_min) * u
        nll, masked = self.nelbo(x, padding, t)
        loss = nll.sum() / padding.sum().clamp_min(1)
        return LossOutput(loss, nll, padding, {"masked_fraction": masked.sum() / padding.sum().clamp_min(1)})

    def nll(self, batch: Batch) -> LossOutput:
        """The bound for evaluation: one-sample NELBO with ``t ~ U(0, 1]``, the whole continuous-time range."""
        x, padding = batch["input_ids"], batch["attention_mask"]
        u = training_u(batch)
        t = u.clamp_min(1e-6)
        nll, _ = self.nelbo(x, padding, t)
        return LossOutput(nll.sum() / padding.sum().clamp_min(1), nll, padding)

    def conditional_nll(self, batch: Batch, fixed: torch.Tensor) -> LossOutput:
        """A one-sample bound of ``-log p(x_free | x_fixed)``: the NELBO of the tokens not in ``fixed`` ``[B, L]``
        (bool) while the fixed ones stay visible at every noise level (docs/math.md §1, "Conditional bound"), as the
        samplers keep a prompt. Terms per free token; average several calls for a tighter estimate."""
        x, padding = batch["input_ids"], batch["attention_mask"].bool()
        t = training_u(batch).clamp_min(1e-6)
        nll, _ = self.nelbo(x, padding, t, fixed)
        free = padding & ~fixed  # [B, L]
        return LossOutput(nll.sum() / free.sum().clamp_min(1), nll, free)

"""The autoregressive reference: a left-to-right LM on the same backbone (Radford et al., 2019; docs/math.md §0).

The chain rule ``log p(x) = sum_l log p_theta(x^l | x^{<l})`` is exact, so the per-token NLL is directly
comparable with the diffusion bounds. The input is ``[BOS, x^0 .. x^{L-2}]`` and the targets ``x^0 .. x^{L-1}``,
so all ``L`` tokens are scored, the first one from ``BOS`` alone:

    NLL(x) = - sum_{l=0}^{L-1} log softmax(head(h_l))[x^l],   h = Backbone_causal(embed([BOS, x^{<L-1}])).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cdlm import checks
from cdlm.models.backbone import Backbone, MaskMode, adopt_attention, all_real
from cdlm.models.kv_cache import KVCache
from cdlm.types import Batch, LossOutput


class Autoregressive(nn.Module):
    """Next-token objective; owns the token embedding (``V + 1`` rows, the last is ``BOS``) and the output head.

    It declares causal attention (``attention``): position ``l`` may only see ``x^{<l}``. A config run writes
    ``model.mask_mode: causal`` into the model config before the backbone is built (``cdlm.config.apply_attention``,
    so the saved config says what runs) and refuses a model config that sets another mode; a backbone built here
    with ``mask_mode`` unset takes causal, one built with another mode is refused (``adopt_attention``). The
    backbone is not time-conditioned (``c = None``).

    Args:
        backbone: the shared transformer, causal or with ``mask_mode`` unset.
        vocab_size: ``V``, the tokenizer's vocabulary; ``bos_id = V`` (an input row only, never predicted).
    """

    space = "autoregressive"
    attention: ClassVar[MaskMode] = "causal"

    @classmethod
    def attention_for(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The backbone settings a run of this objective needs, whatever its ``options``: the causal mask
        (``cdlm.config.apply_attention``)."""
        return {"mask_mode": cls.attention}

    def __init__(self, backbone: Backbone, vocab_size: int) -> None:
        super().__init__()
        checks.positive_ints(vocab_size=vocab_size)
        adopt_attention(backbone, self.attention, type(self).__name__)
        self.backbone, self.vocab_size, self.bos_id = backbone, vocab_size, vocab_size
        width = backbone.width
        self.embed = nn.Embedding(vocab_size + 1, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.head = nn.Linear(width, vocab_size)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs ``[BOS, x^0 .. x^{L-2}]`` ``[B, L]`` for targets ``x`` ``[B, L]``."""
        bos = torch.full_like(x[:, :1], self.bos_id)
        return torch.cat([bos, x[:, :-1]], dim=1)

    def logits(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, L, V]``, row ``l`` for ``p_theta(x^l | x^{<l})``; ``padding`` ``[B, L]``: real targets."""
        inputs = self.shift(x)  # [B, L]
        if not all_real(padding):  # input l carries target l - 1 (or BOS): valid where that target is
            padding = torch.cat([torch.ones_like(padding[:, :1]), padding[:, :-1]], dim=1)
        return self.head(self.backbone(self.embed(inputs), None, padding))  # [B, L, V]

    def features(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden state ``[B, W]`` after each row's last real token of ``x`` ``[B, L]`` (``padding``
        ``[B, L]``: real tokens, on the right): a feature of the whole text, e.g. for MAUVE (docs/math.md §8)."""
        bos = torch.full_like(x[:, :1], self.bos_id)
        inputs = torch.cat([bos, x], dim=1)  # [B, L + 1]
        real = torch.cat([torch.ones_like(padding[:, :1]), padding], dim=1).bool()  # [B, L + 1]
        h = self.backbone(self.embed(inputs), None, real)  # [B, L + 1, W]
        last = padding.long().sum(1)  # [B]: the position that has read every real token
        return h[torch.arange(x.shape[0], device=x.device), last]

    def nll(self, batch: Batch) -> LossOutput:
        """Exact per-token NLL ``[B, L]`` in nats (zero on padding); ``loss`` is its mean over valid tokens."""
        x, padding = batch["input_ids"], batch["attention_mask"]
        logits = self.logits(x, padding).float()  # [B, L, V]
        ce = F.cross_entropy(logits.transpose(1, 2), x.clamp(0, self.vocab_size - 1), reduction="none")  # [B, L]
        nll = torch.where(padding, ce, 0.0)
        return LossOutput(nll.sum() / padding.sum().clamp_min(1), nll, padding)

    def conditional_nll(self, batch: Batch, fixed: torch.Tensor) -> LossOutput:
        """The exact ``-log p(x_free | x_fixed)`` per free token when the ``fixed`` ``[B, L]`` (bool) positions of
        each row come before its free ones (a prompt); a ``ValueError`` otherwise, where the left-to-right
        factorisation does not condition on the later fixed tokens."""
        padding = batch["attention_mask"].bool()
        free = padding & ~fixed  # [B, L]
        after_free = free.long().cumsum(1) > 0  # [B, L]: at or after the row's first free position
        if bool((after_free & fixed & padding).any()):
            raise ValueError("the autoregressive conditional NLL needs the fixed positions before the free ones")
        out = self.nll(batch)
        nll = out.nll * free
        return LossOutput(nll.sum() / free.sum().clamp_min(1), nll, free)

    def loss(self, batch: Batch) -> LossOutput:
        """Training loss: mean next-token cross-entropy over the valid tokens (no noise, no time)."""
        return self.nll(batch)

    # ---- sampling view ----------------------------------------------------------------------------------------
    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The canvas the sampler fills left to right: zeros ``[n, length]`` (every position is overwritten)."""
        return torch.zeros((n, length), dtype=torch.long, device=device)

    def new_cache(self, capacity: int) -> KVCache:
        """An empty KV cache for this backbone, reserving ``capacity`` positions (``BOS`` included)."""
        return KVCache(self.backbone.depth, capacity)

    def next_logits(self, prefix: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Float32 logits ``[B, V]`` of ``p_theta(x^t | x^{<t})`` for the generated ``prefix`` ``[B, t]`` (``t >= 0``).

        Without a cache the whole input ``[BOS, prefix]`` is run; with one only the positions it does not hold yet
        (``cache.offset`` of the ``t + 1`` inputs are cached), which are then added to it.
        """
        inputs = torch.cat([prefix.new_full((prefix.shape[0], 1), self.bos_id), prefix], dim=1)  # [B, t + 1]
        if cache is not None:
            if cache.offset > prefix.shape[1]:
                raise ValueError(
                    f"the cache holds {cache.offset} positions, more than the {prefix.shape[1] + 1} inputs"
                )
            inputs = inputs[:, cache.offset :]
        h = self.backbone(self.embed(inputs), None, None, cache)  # [B, n, D]
        return self.head(h[:, -1]).float()  # [B, V]

"""The contracts between objectives, samplers and the Lightning module (docs/math.md §0)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from cdlm.models.kv_cache import KVCache
    from cdlm.prompts import Prompt

Space = Literal["continuous", "discrete", "autoregressive"]
Batch = dict[str, torch.Tensor]  # input_ids [B, L], attention_mask [B, L], n_chars [B], optional u [B]


@dataclass
class LossOutput:
    """What ``Objective.loss`` and ``Objective.nll`` return.

    ``loss`` is the scalar to minimise; ``nll`` ``[B, L]`` is the per-token bound in nats (zero where
    ``mask`` is False); ``logs`` holds extra scalars to log.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    mask: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """Any training objective: it owns its adapters, heads and schedule."""

    space: Space

    def loss(self, batch: Batch) -> LossOutput: ...

    def nll(self, batch: Batch) -> LossOutput: ...


@runtime_checkable
class DiscreteObjective(Objective, Protocol):
    """Discrete sampling view (docs/math.md §0): ``denoise(z_t, t) -> log p(x0 | z_t)`` ``[B, L, V]`` on token states
    ``z_t`` ``[B, L]`` at times ``t`` ``[B]``, and the ``prior`` state at ``t = 1``."""

    vocab_size: int

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


class MaskSchedule(Protocol):
    """An absorbing process's schedule: ``alpha(t)``, the probability that a token is still visible at time ``t``
    (decreasing from ~1 at ``t = 0`` to ~0 at ``t = 1``; docs/math.md §1)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class AbsorbingObjective(Protocol):
    """Absorbing-state ("masked") diffusion, MDLM's (docs/math.md §1): what the ancestral and parallel samplers read.

    - ``vocab_size``, ``denoise`` and ``prior``: the ``DiscreteObjective`` sampling view;

    - ``mask_id``: the ``[MASK]`` id (``V``: one past the vocabulary); the ``prior`` is all ``[MASK]``, and
      ``denoise`` carries visible tokens over unchanged (SUBS);
    - ``schedule.alpha(t)``: the visible fraction at ``t`` (``MaskSchedule``), from which the samplers take how many
      positions a step unmasks;
    - ``time_conditioning``: whether ``denoise`` reads ``t`` (if not, an unchanged state need not be re-scored).
    """

    vocab_size: int
    mask_id: int
    schedule: MaskSchedule
    time_conditioning: bool

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


@runtime_checkable
class AutoregressiveObjective(Protocol):
    """Left-to-right sampling view (``space = "autoregressive"``): ``next_logits(prefix, cache)`` -> float32 logits
    ``[B, V]`` of the next token after ``prefix`` ``[B, t]``; ``new_cache(capacity)`` an empty KV cache that
    ``next_logits`` extends with the positions it has not seen; ``prior(n, L)`` the canvas ``[n, L]`` it overwrites."""

    vocab_size: int

    def new_cache(self, capacity: int) -> KVCache: ...

    def next_logits(self, prefix: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor: ...

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


@runtime_checkable
class ContinuousObjective(Objective, Protocol):
    """Continuous sampling view in VE coordinates (docs/math.md §0): ``x~ = z / a = x0 + sigma * eps``.

    - ``sigma(t)``: sampler time ``t`` in [0, 1] (1 = noise) -> noise level, increasing, float64 in and out;
      ``sigma_min = sigma(0)``, ``sigma_max = sigma(1)``; the information-uniform warp lives in this map.
    - ``denoise(x, sigma, x0_prev=None) -> x0_hat``: ``x`` ``[B, L, D]`` in VE coordinates, ``sigma`` ``[B]``,
      ``x0_prev`` the self-conditioning input (previous estimate) or None; returns the clean estimate ``[B, L, D]``.
    - ``prior(n, length, device, generator=None)``: a draw at ``sigma_max`` ``[n, length, D]``.
    - ``decode(x) -> ids`` ``[B, L]``: the final state (or estimate) to token ids.
    - ``clean_state(ids) -> x0`` ``[B, L, D]``: the data point of a token sequence (for the ODE bound).
    - ``decoder_nll(x, ids) -> [B, L]``: ``-log p(ids | x)`` per token at ``sigma_min`` (the bound's decoder term).
    - ``data_scale``: per-dimension std of ``x0`` about ``data_mean`` (the Gaussian at ``sigma_max``).
    """

    sigma_min: float
    sigma_max: float
    data_scale: float
    data_mean: float

    def sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor: ...

    def prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...

    def clean_state(self, ids: torch.Tensor) -> torch.Tensor: ...

    def decoder_nll(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FlowMapObjective(ContinuousObjective, Protocol):
    """A two-time denoiser ``flow_denoise(x, sigma_s, sigma_t)``, as FMLM's ``FlowMap`` has (``objective=flow_map``).

    FMLM (Lee et al. 2026, "Flow map language models"), docs/math.md §2: ``x`` ``[B, L, D]`` is the VE state at
    ``sigma_s`` ``[B]``; the result ``D_{s,t}`` ``[B, L, D]`` at the target level ``sigma_t <= sigma_s`` ``[B]`` makes
    the flow map a DDIM step, ``x_t = D_{s,t} + (sigma_t / sigma_s) (x - D_{s,t})``; ``sigma_t = sigma_s`` gives the
    ordinary denoiser.
    """

    def flow_denoise(self, x: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FinalPass(ContinuousObjective, Protocol):
    """A final decode that is one more self-conditioned pass, as LangFlow's (``objective=langflow``).

    ``decode_final(x, x0_prev) -> ids`` ``[B, L]``: ``x`` ``[B, L, D]`` is a sampler's final state at ``sigma_min``,
    ``x0_prev`` its last clean estimate (the self-conditioning input; None when the sampler does not self-condition).
    The continuous samplers call it instead of ``decode(x0_hat)`` and count it as a network evaluation.
    """

    def decode_final(self, x: torch.Tensor, x0_prev: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class SelfConditionedBound(ContinuousObjective, Protocol):
    """An objective whose ODE bound may read the self-conditioned denoiser (``objective=langflow``, ``bitstream``).

    ``ode_self_condition``: False, the bound integrates the one-pass denoiser ``D(x, sigma)`` (``x0_prev = None``);
    True, the two-pass ``D(x, sigma, D(x, sigma))`` the samplers use, still a deterministic function of
    ``(x, sigma)``, so the ODE stays well defined and its Jacobian trace runs through both passes; the decoder term
    is then self-conditioned on the estimate at ``sigma_min`` as well (docs/math.md §6, "Self-conditioning").
    """

    ode_self_condition: bool


@dataclass(frozen=True)
class StateProjection:
    """A fixed linear map ``P`` ``[D, K]`` (``K < D``) through which a network reads the VE state, and a factor ``M``
    ``[K, K]`` with ``M^T M = P^T P``, so that ``g @ M`` (``g ~ N(0, I_K)``) has the law of ``eps @ P`` for
    ``eps ~ N(0, I_D)``. Both float32 (docs/math.md §0, "Projected state")."""

    matrix: torch.Tensor  # P [D, K]
    noise: torch.Tensor  # M [K, K]


@runtime_checkable
class ProjectedState(ContinuousObjective, Protocol):
    """A network that reads the VE state ``x`` ``[B, L, D]`` only through a fixed linear map ``x @ P`` (``P``
    ``[D, K]``, ``K < D``), so that the continuous samplers may keep ``y = x @ P`` instead of ``x`` (docs/math.md
    §0, "Projected state"): every update is linear in the state, the clean estimate and the noise, so ``y`` follows
    the same recursion with ``x0_hat @ P`` and ``eps @ P ~ N(0, P^T P)``, and the ids (decoded from ``x0_hat``) have
    the same law. FLM's one-hot state (``D = V``) is read through its embedding (``K`` = the width).

    - ``state_projection() -> StateProjection``, or None where the network reads more of the state (FLM's matched
      filter) or ``K >= D`` (then the samplers keep ``x``);
    - ``prior_projected(n, length, device, generator=None)``: a draw ``[n, length, K]`` with the law of
      ``prior(n, length, ...) @ P``, made in ``K`` dimensions;
    - ``denoise_projected(y, sigma, x0_prev=None) -> (x0_hat, x0_hat @ P)``: ``y`` ``[B, L, K]`` at ``sigma`` ``[B]``;
      ``x0_hat`` ``[B, L, D]`` is ``denoise(x, sigma, x0_prev)``'s for any ``x`` with ``x @ P = y``.
    """

    def state_projection(self) -> StateProjection | None: ...

    def prior_projected(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...

    def denoise_projected(
        self, y: torch.Tensor, sigma: torch.Tensor, x0_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class ProjectedFlowMap(ProjectedState, FlowMapObjective, Protocol):
    """A two-time denoiser read through ``P`` as ``ProjectedState``'s: ``flow_denoise_projected(y, sigma_s, sigma_t)
    -> (D_{s,t}, D_{s,t} @ P)``, ``D_{s,t}`` being ``flow_denoise(x, sigma_s, sigma_t)``'s for any ``x @ P = y``."""

    def flow_denoise_projected(
        self, y: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class BlockwiseObjective(Protocol):
    """An objective sampled block by block, each block by a continuous sampler given the blocks before it (Cola
    DLM's block-causal latent prior, docs/math.md §5). ``blockwise`` says whether it is in that mode (a latent
    objective is only with a block-causal prior); ``sample_blocks(run, x, prompt)`` returns ids ``[B, L]`` from the
    draw ``x`` at ``sigma_max``, calling ``run(view, x_block)`` (a ``cdlm.samplers.blocks.BlockRunner``) on each
    block's ``ContinuousObjective`` view; ``prompt`` (a ``cdlm.prompts.Prompt`` or None): a prefix per row, given as
    the first clean blocks and kept in the ids (a ``ValueError`` for fixed positions it cannot keep)."""

    blockwise: bool

    def sample_blocks(
        self, run: Callable[[object, torch.Tensor], torch.Tensor], x: torch.Tensor, prompt: Prompt | None = None
    ) -> torch.Tensor: ...


@dataclass
class SamplerStep:
    """What a sampler hands its ``callback`` after every step.

    ``x`` and ``x0`` may be buffers the sampler updates in place at its next step (the continuous samplers' float64
    states): they are valid until the callback returns, so a callback that keeps them keeps ``.clone()`` copies.
    """

    index: int
    t: float
    x: torch.Tensor  # the state after the step
    x0: torch.Tensor | None  # the model's current clean estimate (ids or a dense state), if any
    nfe: int  # network evaluations so far

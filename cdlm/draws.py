"""Training noise drawn per global row: N processes draw, row for row, what one process draws (docs/runs.md,
"Seeds").

Inside ``row_draws(...)`` (``DiffusionLM.training_step`` opens it for every micro-batch) the objectives' random
draws come from one generator per row of the *global* batch, seeded from ``(seed, step, global row)``, and the
per-batch choices (``coin``, e.g. whether this batch self-conditions) from one generator seeded from ``(seed, step,
micro-batch)``, the same on every rank. A row therefore gets the same noise whether it is trained by one process in a
batch of 16 or by the second of two processes in a batch of 8, and a resumed run draws what the uninterrupted one
drew. Outside the context (sampling, evaluation, tests that call ``loss`` directly) every function here draws from
torch's global generators, as ``torch.randn`` etc. do.

A row's draws are taken in the order the objective asks for them, each a slice ``[1, ...]`` of the requested shape
from that row's generator: the objective must ask for the same shapes in the same order on every rank, which it does
when its draws depend only on the batch's shape and the shared coins.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class RowGenerators:
    """One generator per local row (``rows``, on the rows' device) and one shared per-batch CPU generator."""

    rows: list[torch.Generator]
    shared: torch.Generator


_ACTIVE: ContextVar[RowGenerators | None] = ContextVar("cdlm_row_draws", default=None)
SEED_MOD = 2**62  # generator seeds are hashes of key tuples reduced to [0, 2^62)


def seed_of(*keys: int) -> int:
    """A generator seed from a tuple of ints (Python's tuple hash of ints is deterministic across processes)."""
    return hash(keys) % SEED_MOD


@contextmanager
def row_draws(seed: int, step: int, micro: int, rows: list[int], device: torch.device) -> Iterator[None]:
    """Draw the block's training noise per global row of step ``step``: ``rows`` are the local rows' indices in
    the step's global batch (``DiffusionLM.global_rows``). ``micro``: the micro-batch within the optimizer step
    (gradient accumulation), which keys the shared coins.
    """
    generators = []
    for row in rows:
        g = torch.Generator(device=device)
        g.manual_seed(seed_of(seed, step, row, 104729))
        generators.append(g)
    shared = torch.Generator().manual_seed(seed_of(seed, step, micro, 15485863))
    token = _ACTIVE.set(RowGenerators(generators, shared))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _per_row(draw, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype | None) -> torch.Tensor | None:
    active = _ACTIVE.get()
    if active is None:
        return None
    if not shape or shape[0] != len(active.rows):
        raise RuntimeError(
            f"row_draws: a draw of shape {tuple(shape)} inside a training step of {len(active.rows)} rows; "
            "per-row draws need the batch dimension first"
        )
    return torch.stack([draw(shape[1:], generator=g, device=device, dtype=dtype) for g in active.rows])


def randn(*shape: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.randn(*shape)``, per global row inside ``row_draws`` (``shape[0]`` the batch)."""
    out = _per_row(torch.randn, shape, torch.device(device or "cpu"), dtype)
    return torch.randn(*shape, device=device, dtype=dtype) if out is None else out


def rand(*shape: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.rand(*shape)``, per global row inside ``row_draws`` (``shape[0]`` the batch)."""
    out = _per_row(torch.rand, shape, torch.device(device or "cpu"), dtype)
    return torch.rand(*shape, device=device, dtype=dtype) if out is None else out


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(x)``, per global row inside ``row_draws``."""
    return randn(*x.shape, device=x.device, dtype=x.dtype)


def rand_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.rand_like(x)``, per global row inside ``row_draws``."""
    return rand(*x.shape, device=x.device, dtype=x.dtype)


def coin(p: float) -> bool:
    """True with probability ``p``: a per-batch choice such as self-conditioning (Chen et al. 2023, "Analog
    Bits"; docs/math.md §6), drawn on the CPU (no host-device sync). Inside ``row_draws`` from the shared per-batch
    generator, so every rank makes the choice one process makes; outside, from torch's global CPU generator."""
    active = _ACTIVE.get()
    generator = None if active is None else active.shared
    return bool(torch.rand((), generator=generator) < p)

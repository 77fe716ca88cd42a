"""Prompts: the token positions a sampler must keep (docs/sampling.md, "Prompts").

A ``Prompt`` is a canvas of ``n`` rows of ``length`` tokens with some positions fixed: ``ids`` ``[n, length]`` holds
the fixed tokens (0 elsewhere), ``fixed`` ``[n, length]`` (bool) says where they are. ``prefix_prompt`` builds the
usual case, one prefix per row (ragged: rows may have prefixes of different lengths, or none). How a sampler keeps
the fixed positions depends on its family:

- masked diffusion: the fixed tokens are visible in the starting state, and every masked sampler copies visible
  tokens it did not generate and never remasks them;
- autoregressive: the fixed tokens are fed as they are (the common prefix of the batch in one cached call), and
  positions after them are drawn;
- continuous objectives: the network's clean estimate at a fixed position is replaced by that token's clean state
  at every step (replacement, or inpainting: the state there follows the exact trajectory of a known token), and
  the decoded ids there are the prompt's. A model trained without conditioning sees the prompt only as clearly as
  the current noise level lets it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prompt:
    """Fixed tokens on a canvas: ``ids`` ``[n, length]`` (int64; 0 where not fixed) and ``fixed`` ``[n, length]``
    (bool)."""

    ids: torch.Tensor
    fixed: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.fixed.shape or self.ids.dim() != 2:
            raise ValueError(
                f"ids and fixed must be [n, length] alike, got {tuple(self.ids.shape)}, {tuple(self.fixed.shape)}"
            )

    def rows(self, start: int, stop: int, device: torch.device) -> Prompt:
        """Rows ``start:stop`` on ``device``."""
        return Prompt(self.ids[start:stop].to(device), self.fixed[start:stop].to(device))

    def leading(self) -> int:
        """The number of leading positions fixed in every row (the prefix an autoregressive sampler prefills)."""
        free = (~self.fixed).any(0).nonzero()
        return int(free[0]) if len(free) else self.fixed.shape[1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[n, length]`` with the fixed positions set to the prompt's tokens (a new tensor)."""
        return torch.where(self.fixed, self.ids, x)


def prefix_prompt(prefixes: list[list[int]], n: int, length: int) -> Prompt:
    """One prefix per row: ``prefixes`` holds ``n`` lists of token ids, or one, repeated for every row. Each must be
    shorter than ``length`` (a sampler must have something to generate); a ``ValueError`` says which is not."""
    if len(prefixes) == 1:
        prefixes = prefixes * n
    if len(prefixes) != n:
        raise ValueError(f"give one prompt or n = {n} prompts, got {len(prefixes)}")
    ids = torch.zeros(n, length, dtype=torch.long)
    fixed = torch.zeros(n, length, dtype=torch.bool)
    for row, prefix in enumerate(prefixes):
        if len(prefix) >= length:
            raise ValueError(
                f"prompt {row} has {len(prefix)} tokens, which leaves nothing to generate in length = {length}"
            )
        ids[row, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        fixed[row, : len(prefix)] = True
    return Prompt(ids, fixed)


_GIVEN: ContextVar[Prompt | None] = ContextVar("cdlm_given", default=None)


@contextmanager
def given(prompt: Prompt | None) -> Iterator[None]:
    """Within the block, an objective trained with clean spans (``condition_rate > 0``) reads the prompt's fixed
    positions clean in every network call (``given_positions``); the continuous samplers open it around a
    prompted run. ``None``: nothing is given."""
    token = _GIVEN.set(prompt)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def given_positions(rows: int, length: int) -> Prompt | None:
    """The prompt given to the current network call of ``rows`` x ``length`` tokens, or None (none given, or one
    of another shape, e.g. a call on a part of the batch)."""
    prompt = _GIVEN.get()
    if prompt is None or tuple(prompt.fixed.shape) != (rows, length):
        return None
    return prompt


def cut_at_eos(ids: torch.Tensor, eos_id: int, pad_id: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """``ids`` ``[n, length]`` with every position after a row's first generated EOS set to ``pad_id`` except
    the prompt's ``fixed`` positions (the EOS stays; an EOS of the prompt does not stop the row)."""
    eos = ids == eos_id  # [n, L]
    if fixed is not None:
        eos &= ~fixed
    after = (eos.long().cumsum(1) - eos.long()) > 0  # [n, L]: a generated EOS lies strictly before
    if fixed is not None:
        after &= ~fixed  # the prompt's own tokens stay where they are
    return ids.masked_fill(after, pad_id)


def stops(ids: torch.Tensor, eos_id: int, fixed: torch.Tensor | None = None) -> list[int | None]:
    """Each row's position of its first generated EOS (None: the row ran to its length)."""
    eos = ids == eos_id
    if fixed is not None:
        eos &= ~fixed
    first = eos.long().argmax(1)  # [n]
    return [int(p) if eos[r, p] else None for r, p in enumerate(first.tolist())]

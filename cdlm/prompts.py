"""Prompts: the token positions a sampler must keep (docs/sampling.md, "Prompts").

A ``Prompt`` is a canvas of ``n`` rows of ``length`` tokens with some positions fixed: ``ids`` ``[n, length]`` holds
the fixed tokens (0 elsewhere), ``fixed`` ``[n, length]`` (bool) says where they are. ``prefix_prompt`` builds the
usual case, one prefix per row (ragged: rows may have prefixes of different lengths, or none); ``canvas_prompt``
lays out kept pieces and free spans (an infilling template, ``parse_template``, or a prompt with a suffix,
``suffix_pieces``). How a sampler keeps the fixed positions depends on its family:

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

import re
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


Piece = list[int] | int  # fixed token ids, or a span of that many free positions

SPAN = re.compile(r"\[MASK:(\d+)\]")  # an infilling template's span: [MASK:k] leaves k positions to generate


def parse_template(template: str) -> list[str | int]:
    """The pieces of an infilling template in order: texts (kept) and ``[MASK:k]`` spans (``k`` >= 1 positions to
    generate). ``"KING [MASK:8] of France"`` -> ``["KING ", 8, " of France"]``. A ``ValueError`` for a template
    without a span or with an empty one."""
    pieces: list[str | int] = []
    start = 0
    for match in SPAN.finditer(template):
        if match.start() > start:
            pieces.append(template[start : match.start()])
        span = int(match.group(1))
        if span < 1:
            raise ValueError(f"template {template!r}: [MASK:{span}] is empty; a span needs k >= 1 positions")
        pieces.append(span)
        start = match.end()
    if start < len(template):
        pieces.append(template[start:])
    if not any(isinstance(piece, int) for piece in pieces):
        raise ValueError(f"template {template!r} has no [MASK:k] span to fill (e.g. 'KING [MASK:8] of France')")
    return pieces


def canvas_prompt(rows: list[list[Piece]], n: int, length: int) -> Prompt:
    """Pieces laid out from position 0 in each row: a list of token ids is fixed there, an int ``k`` leaves ``k``
    positions free; the positions after the last piece are free too. ``rows`` holds ``n`` rows of pieces, or one,
    repeated for every row. A ``ValueError`` names a row that does not fit in ``length`` or leaves nothing free."""
    if len(rows) == 1:
        rows = rows * n
    if len(rows) != n:
        raise ValueError(f"give one prompt or n = {n} prompts, got {len(rows)}")
    ids = torch.zeros(n, length, dtype=torch.long)
    fixed = torch.zeros(n, length, dtype=torch.bool)
    for row, pieces in enumerate(rows):
        at = 0
        for piece in pieces:
            if isinstance(piece, int):
                if piece < 1:
                    raise ValueError(f"prompt {row}: a span of {piece} positions; a span needs at least 1")
                at += piece
                continue
            tokens = torch.tensor(piece, dtype=torch.long)[: max(length - at, 0)]  # [<= len(piece)]
            ids[row, at : at + len(tokens)] = tokens
            fixed[row, at : at + len(tokens)] = True
            at += len(piece)
        kept = sum(len(piece) for piece in pieces if not isinstance(piece, int))
        if bool(fixed[row].all()):
            raise ValueError(f"prompt {row} has {kept} tokens, which leaves nothing to generate in length = {length}")
        if at > length:
            raise ValueError(
                f"prompt {row} needs {at} positions (its tokens and [MASK:k] spans), more than length = {length}"
            )
    return Prompt(ids, fixed)


def prefix_prompt(prefixes: list[list[int]], n: int, length: int) -> Prompt:
    """One prefix per row: ``prefixes`` holds ``n`` lists of token ids, or one, repeated for every row. Each must be
    shorter than ``length`` (a sampler must have something to generate); a ``ValueError`` says which is not."""
    return canvas_prompt([[list(prefix)] for prefix in prefixes], n, length)


def suffix_pieces(prefix: list[int], suffix: list[int], length: int) -> list[Piece]:
    """A row that starts with ``prefix`` and ends with ``suffix`` at position ``length``, the middle generated."""
    middle = length - len(prefix) - len(suffix)
    if middle < 1:
        raise ValueError(
            f"a prompt of {len(prefix)} and a suffix of {len(suffix)} tokens leave nothing to generate in "
            f"length = {length}"
        )
    return [prefix, middle, suffix]


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


def after_eos(ids: torch.Tensor, eos_id: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, length]`` (bool): the positions after each row's first generated EOS, less the prompt's ``fixed``
    positions (an EOS of the prompt does not stop the row; the prompt's own tokens stay where they are)."""
    eos = ids == eos_id  # [n, L]
    if fixed is not None:
        eos &= ~fixed
    after = (eos.long().cumsum(1) - eos.long()) > 0  # [n, L]: a generated EOS lies strictly before
    return after if fixed is None else after & ~fixed


def cut_at_eos(ids: torch.Tensor, eos_id: int, pad_id: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """``ids`` ``[n, length]`` with every position after a row's first generated EOS set to ``pad_id`` except
    the prompt's ``fixed`` positions (``after_eos``; the EOS stays)."""
    return ids.masked_fill(after_eos(ids, eos_id, fixed), pad_id)


def stops(ids: torch.Tensor, eos_id: int, fixed: torch.Tensor | None = None) -> list[int | None]:
    """Each row's position of its first generated EOS (None: the row ran to its length)."""
    eos = ids == eos_id
    if fixed is not None:
        eos &= ~fixed
    first = eos.long().argmax(1)  # [n]
    return [int(p) if eos[r, p] else None for r, p in enumerate(first.tolist())]

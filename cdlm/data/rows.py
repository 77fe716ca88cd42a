"""Fixed-length rows read from a mapped token stream, by index: packed blocks or one document per row.

Both read a row's tokens from the memory map when it is asked for, so a process holds the rows it is using and
nothing in proportion to the corpus. Each item is ``{"input_ids": [L] int64, "attention_mask": [L] bool,
"n_chars": [] int64}``; the characters of a row are the tokenizer's ``char_lengths`` summed over its real tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch.utils.data import Dataset


class MappedRows(Dataset, ABC):
    """Rows of ``seq_len`` tokens from ``tokens`` ``[N]``, each ``start`` and real ``length`` given by the subclass."""

    def __init__(self, tokens: np.ndarray, seq_len: int, pad_id: int, char_lengths: torch.Tensor) -> None:
        self.tokens, self.seq_len, self.pad_id, self.char_lengths = tokens, seq_len, pad_id, char_lengths
        self.n_rows = 0

    def __len__(self) -> int:
        return self.n_rows

    @abstractmethod
    def span(self, i: int) -> tuple[int, int]:
        """``(start, length)`` of row ``i`` in the stream."""

    @abstractmethod
    def row_lengths(self) -> np.ndarray:
        """Real tokens per row ``[R]``."""

    def cap(self, max_tokens: int) -> None:
        """Keep the first rows up to (and including) the one where the count of real tokens reaches ``max_tokens``."""
        cumulative = np.cumsum(self.row_lengths())
        self.n_rows = min(self.n_rows, int((cumulative < max_tokens).sum()) + 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n_rows:
            raise IndexError(f"row {i} of {self.n_rows}")
        start, length = self.span(i)
        ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)  # [L]
        ids[:length] = torch.from_numpy(self.tokens[start : start + length].astype(np.int64))
        mask = torch.arange(self.seq_len) < length  # [L]
        n_chars = (self.char_lengths[ids] * mask).sum()
        return {"input_ids": ids, "attention_mask": mask, "n_chars": n_chars}


class PackedRows(MappedRows):
    """Wrap-around packing: row ``i`` is ``tokens[i L : (i + 1) L]`` (the stream has EOS after every document); the
    last row is padded."""

    def __init__(self, tokens: np.ndarray, seq_len: int, pad_id: int, char_lengths: torch.Tensor) -> None:
        super().__init__(tokens, seq_len, pad_id, char_lengths)
        self.n_rows = -(-len(tokens) // seq_len)

    def span(self, i: int) -> tuple[int, int]:
        start = i * self.seq_len
        return start, min(self.seq_len, len(self.tokens) - start)

    def row_lengths(self) -> np.ndarray:
        total = -(-len(self.tokens) // self.seq_len)
        lengths = np.full(total, self.seq_len, dtype=np.int64)
        if total:
            lengths[-1] = len(self.tokens) - (total - 1) * self.seq_len
        return lengths[: self.n_rows]


class DocumentRows(MappedRows):
    """One document per row (LM1B style): each document with its EOS, in consecutive ``seq_len`` chunks, each chunk
    padded on the right. ``offsets`` ``[D + 1]`` are the documents' starts in the stream."""

    def __init__(
        self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int, char_lengths: torch.Tensor
    ) -> None:
        super().__init__(tokens, seq_len, pad_id, char_lengths)
        self.offsets = offsets
        lengths = np.diff(np.asarray(offsets, dtype=np.int64))  # [D]
        self.first_row = np.concatenate([[0], np.cumsum(-(-lengths // seq_len))])  # [D + 1]
        self.n_rows = int(self.first_row[-1])

    def span(self, i: int) -> tuple[int, int]:
        doc = int(np.searchsorted(self.first_row, i, side="right")) - 1
        chunk = i - int(self.first_row[doc])
        start = int(self.offsets[doc]) + chunk * self.seq_len
        return start, min(self.seq_len, int(self.offsets[doc + 1]) - start)

    def row_lengths(self) -> np.ndarray:
        lengths = np.diff(np.asarray(self.offsets, dtype=np.int64))
        rows = -(-lengths // self.seq_len)
        full = np.repeat(np.full(len(lengths), self.seq_len), rows)
        last = lengths - (rows - 1) * self.seq_len  # the last chunk of each document
        full[np.cumsum(rows) - 1] = last
        return full[: self.n_rows]

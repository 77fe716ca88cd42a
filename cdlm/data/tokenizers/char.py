"""Character-level tokenizer: one id per distinct character of the training texts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cdlm.data.tokenizers.base import Tokenizer, in_range

UNK_TEXT = "\ufffd"


class CharTokenizer(Tokenizer):
    """Ids ``0..n-1`` are the sorted characters, then ``<eos>``, ``<pad>``, ``<unk>``.

    A character unseen in training encodes to ``<unk>``, which decodes to U+FFFD (one character).
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = sorted(set(chars))
        if not chars or any(len(c) != 1 for c in chars):
            raise ValueError(f"char tokenizer needs a non-empty set of single characters, got {chars[:10]!r}")
        self.name = "char"
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self._eos, self._pad, self._unk = len(chars), len(chars) + 1, len(chars) + 2

    @classmethod
    def train(cls, texts: Sequence[str]) -> CharTokenizer:
        """Vocabulary = the sorted set of characters of ``texts``."""
        return cls(sorted(set().union(*map(set, texts))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 3

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def unk_id(self) -> int:
        return self._unk

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self._unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        table = [*self.chars, "", "", UNK_TEXT]
        return "".join(table[i] for i in in_range(ids, self.vocab_size))

    def char_lengths(self) -> torch.Tensor:
        lengths = torch.ones(self.vocab_size, dtype=torch.long)  # [V]
        lengths[[self._eos, self._pad]] = 0
        return lengths

    def config(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def from_directory(cls, directory: Path, config: dict[str, Any]) -> CharTokenizer:
        return cls(config["chars"])

"""Byte-level tokenizer: the 256 UTF-8 byte values plus ``<eos>`` and ``<pad>``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cdlm.data.tokenizers.base import Tokenizer, utf8_char_count


class ByteTokenizer(Tokenizer):
    """Ids ``0..255`` are bytes, 256 is ``<eos>``, 257 is ``<pad>``; invalid UTF-8 decodes to U+FFFD."""

    kind = "byte"

    def __init__(self) -> None:
        self.name = "byte"

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eos_id(self) -> int:
        return 256

    @property
    def pad_id(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def char_lengths(self) -> torch.Tensor:
        """1 for bytes that start a character, 0 for UTF-8 continuation bytes and specials."""
        lengths = [utf8_char_count(bytes([b])) for b in range(256)] + [0, 0]
        return torch.tensor(lengths, dtype=torch.long)  # [V]

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_directory(cls, directory: Path, config: dict[str, Any]) -> ByteTokenizer:
        return cls()

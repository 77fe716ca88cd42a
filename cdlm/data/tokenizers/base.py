"""The ``Tokenizer`` interface shared by every tokenizer kind, and its on-disk config file."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

CONFIG_FILE = "cdlm_tokenizer.json"


class Tokenizer(ABC):
    """Text <-> ids. ``encode`` adds no specials; ``decode`` drops specials (EOS, pad) and skips unknown ids.

    EOS separates documents and decodes to nothing, so ``char_lengths()[eos_id] == 0`` and the decoded length
    of any ids equals the sum of their ``char_lengths`` (used for bits per character).
    """

    kind: ClassVar[str]
    name: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included."""

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, no specials added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; specials and out-of-range ids are skipped."""

    @abstractmethod
    def char_lengths(self) -> torch.Tensor:
        """``[vocab_size]`` int64: characters each id contributes to decoded text (0 for EOS/pad)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The settings written to ``cdlm_tokenizer.json`` (besides ``kind``)."""

    @classmethod
    @abstractmethod
    def from_directory(cls, directory: Path, config: dict[str, Any]) -> Tokenizer:
        """Restore from a directory written by ``save``."""

    def save_files(self, directory: Path) -> None:
        """Write any extra files the kind needs (default: none)."""
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts (kinds override this when they can batch)."""
        return [self.encode(t) for t in texts]

    def save(self, directory: str | Path) -> None:
        """Write ``cdlm_tokenizer.json`` and the kind's files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_files(directory)
        payload = {"kind": self.kind, "name": self.name, **self.config()}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def in_range(ids: Sequence[int], vocab_size: int) -> list[int]:
    """Drop ids outside ``[0, vocab_size)``."""
    return [int(i) for i in ids if 0 <= int(i) < vocab_size]


def utf8_char_count(data: bytes) -> int:
    """Characters ``data`` starts in UTF-8 text: bytes that are not continuation bytes (0x80-0xBF)."""
    return sum(1 for b in data if not 0x80 <= b <= 0xBF)

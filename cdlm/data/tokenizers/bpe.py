"""Byte-level BPE trained with the ``tokenizers`` library, cached on disk by (training data, vocab size)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from cdlm.data.tokenizers.base import Tokenizer, in_range, utf8_char_count

SPECIALS = ["<eos>", "<pad>"]
TOKENIZER_FILE = "tokenizer.json"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable-unicode table used by the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def train_bpe(texts: Sequence[str], vocab_size: int) -> BackendTokenizer:
    """Train a byte-level BPE with specials ``<eos>`` (id 0) and ``<pad>`` (id 1) on ``texts``."""
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class BPETokenizer(Tokenizer):
    """Wraps a trained byte-level BPE ``tokenizers.Tokenizer``; decoding is an exact inverse of encoding."""

    kind = "bpe"

    def __init__(self, tok: BackendTokenizer):
        self.tok = tok
        ids = [tok.token_to_id(s) for s in SPECIALS]
        if None in ids:
            raise ValueError(f"BPE tokenizer lacks the special tokens {SPECIALS}")
        self._eos, self._pad = ids
        self.name = f"bpe-{self.vocab_size}"
        self._char_lengths: torch.Tensor | None = None

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        minimum = 256 + len(SPECIALS)
        if vocab_size <= minimum:
            raise ValueError(f"bpe vocab_size must be > {minimum} (256 bytes + specials), got {vocab_size}")
        return cls(train_bpe(texts, vocab_size))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(in_range(ids, self.vocab_size), skip_special_tokens=True)

    def char_lengths(self) -> torch.Tensor:
        """UTF-8 characters started by each token's bytes (exact for valid UTF-8 text); 0 for specials."""
        if self._char_lengths is None:
            to_byte = _unicode_to_byte()
            lengths = torch.zeros(self.vocab_size, dtype=torch.long)  # [V]
            for token, i in self.tok.get_vocab(with_added_tokens=True).items():
                if token not in SPECIALS:
                    lengths[i] = utf8_char_count(bytes(to_byte[c] for c in token))
            self._char_lengths = lengths
        return self._char_lengths.clone()

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "file": TOKENIZER_FILE}

    def save_files(self, directory: Path) -> None:
        self.tok.save(str(directory / TOKENIZER_FILE))

    @classmethod
    def from_directory(cls, directory: Path, config: dict[str, Any]) -> BPETokenizer:
        return cls(BackendTokenizer.from_file(str(directory / TOKENIZER_FILE)))

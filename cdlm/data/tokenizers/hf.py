"""Any ``transformers`` tokenizer (``AutoTokenizer``), by hub name or local path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cdlm.data.tokenizers.base import Tokenizer, in_range


class HFTokenizer(Tokenizer):
    """EOS is the tokenizer's ``eos_token`` (else ``sep_token``); pad is its ``pad_token``, else EOS."""

    kind = "hf"

    def __init__(self, tok: Any, name: str):
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise ValueError(f"hf tokenizer {name!r} has neither an eos_token nor a sep_token; set one before use")
        self.tok = tok
        self.name = name
        self._eos = int(eos)
        self._pad = int(tok.pad_token_id) if tok.pad_token_id is not None else self._eos
        self._special = set(tok.all_special_ids) | {self._eos, self._pad}
        self._char_lengths: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> HFTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False), name=str(name_or_path))

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in in_range(ids, self.vocab_size) if i not in self._special]
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def char_lengths(self) -> torch.Tensor:
        """Length of each id decoded on its own (approximate for tokens that merge when decoded together)."""
        if self._char_lengths is None:
            lengths = [0 if i in self._special else len(self.decode([i])) for i in range(self.vocab_size)]
            self._char_lengths = torch.tensor(lengths, dtype=torch.long)  # [V]
        return self._char_lengths.clone()

    def config(self) -> dict[str, Any]:
        return {}

    def save_files(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))

    @classmethod
    def from_directory(cls, directory: Path, config: dict[str, Any]) -> HFTokenizer:
        from transformers import AutoTokenizer

        # a saved folder is data: local files only, and never a tokenizer class of its own (auto_map) to import
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        return cls(tok, name=str(config.get("name", directory)))

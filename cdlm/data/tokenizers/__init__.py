"""Tokenizers behind one interface: ``char``, ``byte``, ``bpe`` (byte-level, trained and cached) and ``hf``."""

from cdlm.data.tokenizers.base import Tokenizer
from cdlm.data.tokenizers.bpe import BPETokenizer
from cdlm.data.tokenizers.build import KINDS, build_tokenizer, default_cache_dir, load_tokenizer
from cdlm.data.tokenizers.byte import ByteTokenizer
from cdlm.data.tokenizers.char import CharTokenizer
from cdlm.data.tokenizers.hf import HFTokenizer

__all__ = [
    "KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "default_cache_dir",
    "load_tokenizer",
]

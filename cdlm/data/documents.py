"""A text source as ``Documents``: its splits, a fingerprint that changes with its content, documents in batches.

The fingerprint decides whether a prepared token cache (``cdlm.data.token_cache``) is still valid, so it must be
cheap: the embedded corpus uses its manifest's checksum, files their paths, sizes and modification times, a Hugging
Face dataset its own fingerprint. Reading happens only when a cache is built (docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

from cdlm.data.corpus import corpus_checksum
from cdlm.data.sources import VALID_SOURCES, SourceError, Splits, load_source


class Documents(ABC):
    """The documents of a source, split by split (``train``, ``validation`` and, where the source has one,
    ``test``; a validation split is held out of ``train`` when the source has none)."""

    spec: str

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash that changes whenever the documents may have changed (without reading them all)."""

    @abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The split names."""

    @abstractmethod
    def batches(self, split: str, size: int = 1024) -> Iterator[list[str]]:
        """The documents of ``split`` in order, ``size`` at a time."""

    def texts(self, split: str) -> list[str]:
        """All documents of ``split`` as a list (for small sources, and training a tokenizer)."""
        return [doc for batch in self.batches(split) for doc in batch]


class LoadedDocuments(Documents):
    """Documents read into memory on first use by ``load`` (the embedded corpus, ``.txt`` / ``.jsonl`` files)."""

    def __init__(self, spec: str, fingerprint: str, load: Callable[[], Splits]) -> None:
        self.spec, self._fingerprint, self._load, self._splits = spec, fingerprint, load, None

    def fingerprint(self) -> str:
        return self._fingerprint

    def loaded(self) -> Splits:
        if self._splits is None:
            self._splits = self._load()
        return self._splits

    def splits(self) -> tuple[str, ...]:
        return tuple(self.loaded())

    def batches(self, split: str, size: int = 1024) -> Iterator[list[str]]:
        docs = self.split_docs(split)
        for start in range(0, len(docs), size):
            yield docs[start : start + size]

    def split_docs(self, split: str) -> list[str]:
        if split not in self.loaded():
            raise SourceError(f"source {self.spec!r} has no {split!r} split (it has {sorted(self.loaded())})")
        return self.loaded()[split]


def digest(*parts: object) -> str:
    """A short sha256 of ``parts`` (JSON-encoded)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(path: Path) -> str:
    """Paths, sizes and modification times of the ``.txt`` / ``.jsonl`` files a file or folder source reads."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    return digest([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()])


def open_source(source: str, text_field: str = "text", val_fraction: float = 0.05) -> Documents:
    """The ``Documents`` of ``source``: ``shakespeare``, a ``.txt`` / ``.jsonl`` file or folder, or ``hf:...``."""
    load = lambda: load_source(source, text_field, val_fraction)  # noqa: E731
    if source == "shakespeare":
        return LoadedDocuments(source, digest("shakespeare", corpus_checksum()), load)
    if source.startswith("hf:"):
        return LoadedDocuments(source, hf_fingerprint(source[3:], text_field, val_fraction), load)
    if not source.strip():
        raise SourceError(f"source {source!r} names nothing; valid sources are {VALID_SOURCES}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source {source!r} not found; valid sources are {VALID_SOURCES}")
    return LoadedDocuments(source, digest(files_fingerprint(path), text_field, val_fraction), load)


def hf_fingerprint(name: str, text_field: str, val_fraction: float) -> str:
    """A saved dataset's own fingerprints (its ``state.json`` files); a hub name, the name itself."""
    path = Path(name)
    states = sorted(path.rglob("state.json")) if path.exists() else []
    return digest(name, [p.read_text() for p in states], text_field, val_fraction)

"""A text source as ``Documents``: its splits, a fingerprint that changes with its content, documents in batches.

The fingerprint decides whether a prepared token cache (``cdlm.data.token_cache``) is still valid, so it must be
cheap: the embedded corpus uses its manifest's checksum, files their paths, sizes and modification times, a Hugging
Face dataset its own fingerprint; each with the options that split it. Reading happens only when a cache is built,
and a Hugging Face dataset is never read whole: ``ArrowDocuments`` slices its memory-mapped table (docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cdlm.data.corpus import corpus_checksum
from cdlm.data.hf_sources import hf_open, hf_texts, hold_out_rows
from cdlm.data.sources import (
    VALID_SOURCES,
    DataFiles,
    SourceError,
    SourceOptions,
    Splits,
    check_named,
    import_datasets,
    read_source,
    source_files,
    with_validation,
)


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
    """Documents read into memory on first use by ``load`` (the embedded corpus, ``.txt`` / ``.jsonl`` / ``.parquet``
    files and folders)."""

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


class ArrowDocuments(Documents):
    """The documents of Hugging Face ``datasets.Dataset`` objects, one per split, read ``size`` rows at a time by
    slicing their memory-mapped Arrow tables: a corpus larger than memory is never loaded into a list.

    ``open_splits`` returns the source's own splits (by cdlm split name, each reduced to the text column), opened on
    first use; a missing validation split is the test split, else held out of train by ``hold_out_rows`` (the last
    ``validation_docs`` or ``val_fraction`` rows, without a copy). Rows whose text is null or only whitespace are
    skipped when read, so held-out counts are in rows (docs/data.md).
    """

    def __init__(self, spec: str, open_splits: Callable[[], dict[str, Any]], options: SourceOptions) -> None:
        self.spec, self.options, self._open = spec, options, open_splits
        self._own: dict[str, Any] | None = None
        self._splits: dict[str, Any] | None = None

    def own_splits(self) -> dict[str, Any]:
        """The source's own datasets per split, before any is held out (opened once)."""
        if self._own is None:
            self._own = self._open()
        return self._own

    def datasets(self) -> dict[str, Any]:
        """The dataset of every split, validation included."""
        if self._splits is None:
            self._splits = with_validation(self.own_splits(), lambda train: hold_out_rows(train, self.options))
        return self._splits

    def fingerprint(self) -> str:
        """The datasets' own fingerprints (``Dataset._fingerprint``: stable for a saved dataset, and for a hub
        dataset while its files do not change) and lengths, with the options that split them."""
        own = {split: (getattr(ds, "_fingerprint", None), len(ds)) for split, ds in self.own_splits().items()}
        return digest(self.spec, own, self.options.settings())

    def splits(self) -> tuple[str, ...]:
        return tuple(self.datasets())

    def batches(self, split: str, size: int = 1024) -> Iterator[list[str]]:
        ds = self.split_dataset(split)
        for start in range(0, len(ds), size):
            yield [doc for doc in hf_texts(ds, self.options.text_field, start, start + size) if doc.strip()]

    def split_dataset(self, split: str) -> Any:
        if split not in self.datasets():
            raise SourceError(f"source {self.spec!r} has no {split!r} split (it has {sorted(self.datasets())})")
        return self.datasets()[split]


def digest(*parts: object) -> str:
    """A short sha256 of ``parts`` (JSON-encoded)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(path: Path) -> str:
    """Paths, sizes and modification times of the ``.txt`` / ``.jsonl`` / ``.parquet`` files a file or folder source
    reads."""
    files = [path] if path.is_file() else source_files(path)
    return digest([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()])


def open_source(
    source: str,
    text_field: str = "text",
    val_fraction: float = 0.05,
    *,
    validation_docs: int | None = None,
    split_chars: Sequence[int] | None = None,
    hf_config: str | None = None,
    hf_splits: Mapping[str, str] | None = None,
    data_files: DataFiles | None = None,
) -> Documents:
    """The ``Documents`` of ``source``: ``shakespeare``, a ``.txt`` / ``.jsonl`` / ``.parquet`` file or a folder of
    them, or ``hf:<name or path>`` (``ArrowDocuments``); the keyword options are ``SourceOptions``'s (docs/data.md).
    Nothing is read here, and a Hugging Face dataset is opened on first use."""
    options = SourceOptions(text_field, val_fraction, validation_docs, split_chars, hf_config, hf_splits, data_files)
    check_named(source)
    options.check_source(source)
    load = lambda: read_source(source, options)  # noqa: E731
    if source == "shakespeare":
        return LoadedDocuments(source, digest("shakespeare", corpus_checksum()), load)
    if source.startswith("hf:"):
        import_datasets(f"source {source!r}")
        return ArrowDocuments(source, lambda: hf_open(source[3:], options), options)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source {source!r} not found; valid sources are {VALID_SOURCES}")
    return LoadedDocuments(source, digest(files_fingerprint(path), *options.settings()), load)

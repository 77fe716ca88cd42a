"""What a text source is and how it is split, below the readers: the source options, the errors a source raises, the
optional ``datasets`` / ``pyarrow`` imports and the validation hold-out (docs/data.md). ``cdlm.data.sources`` (files,
folders, the embedded corpus) and ``cdlm.data.hf_sources`` (``hf:`` datasets) both build on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

Splits = dict[str, list[str]]  # split name -> documents
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
VALID_SOURCES = (
    "'shakespeare', a .txt, .jsonl or .parquet file, a folder of .txt/.jsonl/.parquet files, "
    "or 'hf:<name or local path>'"
)
DataFiles = str | list[str] | dict[str, str | list[str]]  # as ``datasets.load_dataset(data_files=...)`` takes them


class SourceError(ValueError):
    """A text source that cannot be read: the message names the file (and line) and what a valid source is."""


class MissingDependencyError(ValueError, ImportError):
    """An optional package a source needs is not installed; the message gives the ``pip install`` line.

    A ``ValueError`` so that the CLI reports it as a usage error, and an ``ImportError`` for callers that catch those.
    """


def import_datasets(what: str) -> Any:
    """The ``datasets`` module; a ``MissingDependencyError`` saying that ``what`` needs it when it is missing."""
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError(f'{what} needs the `datasets` package: pip install "cdlm[hf]"') from e
    return datasets


def import_parquet(what: str) -> Any:
    """The ``pyarrow.parquet`` module (it comes with ``cdlm[hf]``); a ``MissingDependencyError`` when missing."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError(f'{what} needs the `pyarrow` package: pip install "cdlm[hf]"') from e
    return pq


def plain(value: Any) -> Any:
    """``value`` with every mapping made a ``dict`` and every non-string sequence a ``list`` (config containers)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def positive_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class SourceOptions:
    """How a source is read and split, besides its name (docs/data.md).

    ``validation_docs``: hold out the last N train documents as validation instead of ``val_fraction`` of them;
    ``split_chars``: cut a one-document file source into train, validation (and test) pieces of these many
    characters (text8: 90M/5M/5M); ``hf_config``, ``hf_splits`` (cdlm split -> Hugging Face split, slices such as
    ``train[:1%]`` allowed) and ``data_files`` are passed to ``datasets.load_dataset`` for ``hf:`` sources.
    """

    text_field: str = "text"
    val_fraction: float = 0.05
    validation_docs: int | None = None
    split_chars: list[int] | None = None
    hf_config: str | None = None
    hf_splits: dict[str, str] | None = None
    data_files: DataFiles | None = None

    def __post_init__(self) -> None:
        for name in ("split_chars", "hf_splits", "data_files"):
            object.__setattr__(self, name, plain(getattr(self, name)))
        if self.validation_docs is not None and not positive_int(self.validation_docs):
            raise ValueError(f"validation_docs must be a positive integer, got {self.validation_docs!r}")
        self.check_split_chars()
        self.check_hf_splits()
        if self.data_files is not None and not isinstance(self.data_files, (str, list, dict)):
            raise ValueError(
                f"data_files must be a path, a list of paths or a split -> paths mapping, got {self.data_files!r}"
            )

    def check_split_chars(self) -> None:
        """``split_chars`` is 2 or 3 positive integers (train, validation[, test]), not with ``validation_docs``."""
        sizes = self.split_chars
        if sizes is None:
            return
        if not isinstance(sizes, list) or len(sizes) not in (2, 3) or not all(map(positive_int, sizes)):
            raise ValueError(f"split_chars must be 2 or 3 positive integers (train, validation[, test]), got {sizes!r}")
        if self.validation_docs is not None:
            raise ValueError(
                "set split_chars or validation_docs, not both: split_chars already makes the validation split"
            )

    def check_hf_splits(self) -> None:
        """``hf_splits`` maps some of train/validation/test (train among them) to non-empty split names."""
        mapping = self.hf_splits
        if mapping is None:
            return
        if not isinstance(mapping, dict) or "train" not in mapping or set(mapping) - set(SPLITS):
            raise ValueError(
                "hf_splits must map 'train' (and optionally 'validation', 'test') to Hugging Face splits, "
                f"got {mapping!r}"
            )
        if not all(isinstance(v, str) and v.strip() for v in mapping.values()):
            raise ValueError(
                f"hf_splits values must be split names such as 'train' or 'train[:-1000]', got {mapping!r}"
            )

    def check_source(self, source: str) -> None:
        """Options that cannot apply to ``source``: the ``hf_*`` ones off ``hf:``, ``split_chars`` on ``hf:``."""
        hf_only = [name for name in ("hf_config", "hf_splits", "data_files") if getattr(self, name) is not None]
        if self.split_chars is not None and (source.startswith("hf:") or source == "shakespeare"):
            raise ValueError(f"split_chars cuts a one-document file source (such as text8.txt), not {source!r}")
        if not source.startswith("hf:") and hf_only:
            raise ValueError(f"{', '.join(hf_only)} apply to 'hf:' sources only, not to {source!r}")

    def extra(self) -> dict[str, Any]:
        """The options set to something other than their default, besides ``text_field`` and ``val_fraction``."""
        kept = ("text_field", "val_fraction")
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in kept and getattr(self, f.name) != f.default
        }

    def settings(self) -> tuple:
        """What of these options a fingerprint includes (the same as before these options existed when unset)."""
        extra = self.extra()
        return (self.text_field, self.val_fraction, *([extra] if extra else []))


def check_fraction(val_fraction: float) -> None:
    """A ``ValueError`` unless ``0 < val_fraction < 1``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def held_out_count(n_docs: int, val_fraction: float, validation_docs: int | None = None) -> int:
    """How many of ``n_docs`` train documents are held out: ``validation_docs``, else ``val_fraction`` of them
    (at least one, and never all)."""
    if validation_docs is None:
        return min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    if validation_docs >= n_docs:
        raise SourceError(
            f"validation_docs={validation_docs} would hold out every train document (the source has {n_docs}); "
            "use a smaller validation_docs"
        )
    return validation_docs


def hold_out(docs: list[str], val_fraction: float, validation_docs: int | None = None) -> Splits:
    """Split off validation: the last documents (``validation_docs`` of them, else ``val_fraction``, at least one),
    or with one document and no ``validation_docs`` the last ``val_fraction`` of its text."""
    check_fraction(val_fraction)
    if len(docs) == 1 and validation_docs is None:
        cut = int(len(docs[0]) * (1.0 - val_fraction))
        return {"train": [docs[0][:cut]], "validation": [docs[0][cut:]]}
    n_val = held_out_count(len(docs), val_fraction, validation_docs)
    return {"train": docs[:-n_val], "validation": docs[-n_val:]}

"""Reading text sources into documents: the embedded corpus, ``.txt``/``.jsonl``/``.parquet`` files or folders
(``hf:`` datasets: ``cdlm.data.hf_sources``); the options that say how a source is split live in
``cdlm.data.source_options`` and are re-exported here (docs/data.md)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdlm.data.corpus import load_corpus
from cdlm.data.source_options import (  # noqa: F401  (re-exported: the names callers import from here)
    FILE_SUFFIXES,
    SPLITS,
    VALID_SOURCES,
    DataFiles,
    MissingDependencyError,
    SourceError,
    SourceOptions,
    Splits,
    check_fraction,
    held_out_count,
    hold_out,
    import_datasets,
    import_parquet,
    plain,
    positive_int,
)

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = "\ufeff"
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (``object``, ``array``, ``string``, ``number``, ``boolean``, ``null``)."""
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def looks_binary(data: bytes) -> str:
    """``looks binary: NUL byte at offset N`` when ``data`` holds a NUL byte (no text file does), else ``""``."""
    nul = data.find(b"\x00")
    return "" if nul < 0 else f"looks binary: NUL byte at offset {nul}"


def not_utf8(path: Path, data: bytes, error: UnicodeDecodeError) -> SourceError:
    """The error for ``path``'s bytes ``data`` that fail UTF-8 decoding: the bad byte, its offset and line."""
    line = data.count(b"\n", 0, error.start) + 1
    notes = [looks_binary(data), "starts with a UTF-16 byte-order mark" if data.startswith(UTF16_BOMS) else ""]
    hint = "".join(f"; it {note}" for note in notes if note)
    return SourceError(
        f"{path} is not UTF-8 text: invalid byte 0x{data[error.start]:02x} at byte offset {error.start} "
        f"(line {line}){hint}; a source must be UTF-8 text (re-encode it, e.g. with iconv -t UTF-8)"
    )


def decode_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); a ``SourceError`` naming the file and the byte
    offset for bytes that are not UTF-8, or for a NUL byte (a binary file)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, data, e) from None
    if binary := looks_binary(data):
        raise SourceError(f"{path} {binary}; a source must be UTF-8 text, not a binary file")
    return text.removeprefix(UTF8_BOM)


def jsonl_lines(text: str) -> list[str]:
    """The lines of a ``.jsonl`` text, split on ``\\n`` only (``\\r\\n`` too), so that line numbers are the file's
    whatever other line-break characters (``\\x0b``, ``\\x85``, ``\\u2028`` ...) appear inside JSON strings."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_line(path: Path, n: int, line: str) -> object:
    """The JSON value of line ``n`` of ``path``; a ``SourceError`` with ``path:n`` if it is not valid JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        reason = f"{e.msg} at column {e.colno}"
    except (ValueError, RecursionError) as e:  # e.g. an integer over Python's digit limit, or nesting too deep
        reason = str(e)
    raise SourceError(
        f"{path}:{n} is not valid JSON ({reason}); each line of a .jsonl file must be one JSON object, "
        'e.g. {"text": "..."}'
    )


def row_text(path: Path, n: int, row: object, text_field: str) -> str:
    """The string ``text_field`` of the parsed line ``n`` of ``path``; a ``SourceError`` with ``path:n`` otherwise."""
    if not isinstance(row, dict):
        raise SourceError(
            f"{path}:{n} has no text field {text_field!r}: the line is a JSON {json_type(row)}, not an object; "
            f'each line of a .jsonl file must be an object such as {{"{text_field}": "..."}}'
        )
    if text_field not in row:
        raise SourceError(f"{path}:{n} has no text field {text_field!r} (found {sorted(row)}); set text_field")
    value = row[text_field]
    if not isinstance(value, str):
        raise SourceError(
            f"{path}:{n}: text field {text_field!r} is a JSON {json_type(value)} ({str(value)[:40]!r}), "
            "not a string; set text_field to a field that holds the text"
        )
    return value


def read_jsonl(path: Path, text_field: str) -> list[str]:
    """The ``text_field`` of every JSON line of ``path`` (blank lines skipped); errors name ``path:line``."""
    docs = []
    for n, line in enumerate(jsonl_lines(decode_text(path)), start=1):
        if line.strip():
            docs.append(row_text(path, n, parse_line(path, n, line), text_field))
    return docs


def parquet_column(pq: Any, path: Path, text_field: str) -> Any:
    """The ``text_field`` column (a ``pyarrow.ChunkedArray``) of the parquet file ``path``; a ``SourceError`` naming
    the file for a file that is not parquet, a missing column or one that does not hold strings."""
    import pyarrow as pa

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path} is not a readable .parquet file ({e})") from None
    if text_field not in schema.names:
        raise SourceError(f"{path} has no column {text_field!r} (columns: {schema.names}); set text_field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise SourceError(
            f"{path}: column {text_field!r} holds {kind}, not strings; set text_field to a column that holds the text"
        )
    return pq.read_table(path, columns=[text_field]).column(text_field)


def read_parquet(path: Path, text_field: str) -> list[str]:
    """The ``text_field`` column of a ``.parquet`` file, one document per row (nulls skipped); needs ``pyarrow``."""
    pq = import_parquet(f"source file {path} (.parquet)")
    return [doc for doc in parquet_column(pq, path, text_field).to_pylist() if doc is not None]


def read_file(path: Path, text_field: str) -> list[str]:
    """A ``.txt`` file is one document; a ``.jsonl`` file is one document per line, a ``.parquet`` file per row."""
    if path.suffix == ".txt":
        return [decode_text(path)]
    if path.suffix == ".jsonl":
        return read_jsonl(path, text_field)
    if path.suffix == ".parquet":
        return read_parquet(path, text_field)
    raise SourceError(f"unsupported source file {path}: expected a .txt or .jsonl file, or a .parquet file")


def source_files(path: Path) -> list[Path]:
    """The ``.txt``, ``.jsonl`` and ``.parquet`` files under the folder ``path`` (recursively, sorted by path)."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)


def read_folder(path: Path, text_field: str) -> list[str]:
    """All ``.txt``, ``.jsonl`` and ``.parquet`` files under ``path`` (recursively, sorted by path)."""
    files = source_files(path)
    if not files:
        raise ValueError(f"source folder {path} contains no .txt or .jsonl files (nor .parquet files)")
    return [doc for f in files for doc in read_file(f, text_field)]


def with_validation(data: dict[str, Any], held_out: Any) -> dict[str, Any]:
    """``data`` with a validation split: its own, else its test split, else ``held_out(train)`` (a split dict)."""
    if data.get("validation") is not None and len(data["validation"]):
        merged = data
    elif data.get("test") is not None and len(data["test"]):
        merged = {**data, "validation": data["test"]}
    else:
        merged = {**data, **held_out(data["train"])}
    return {split: merged[split] for split in SPLITS if split in merged}


def split_by_chars(source: str, docs: list[str], sizes: Sequence[int]) -> Splits:
    """The one document of ``source`` cut into consecutive pieces of ``sizes`` characters: train, validation and,
    with three sizes, test (D3PM's and MDLM's text8 split: 90M/5M/5M); characters after their sum are not used."""
    if len(docs) != 1:
        raise SourceError(f"split_chars cuts a one-document source (such as text8), but {source!r} has {len(docs)}")
    text = docs[0]
    if len(text) < sum(sizes):
        raise SourceError(
            f"source {source!r} has {len(text):,} characters, fewer than split_chars {list(sizes)} "
            f"(sum {sum(sizes):,}); use smaller split_chars"
        )
    ends = list(itertools.accumulate(sizes))
    return {split: [text[end - size : end]] for split, size, end in zip(SPLITS, sizes, ends)}


def read_source(source: str, options: SourceOptions) -> Splits:
    """Documents per split of ``source`` read as lists (``load_source``; the options already checked)."""
    if source == "shakespeare":
        return {split: load_corpus(split) for split in SPLITS}
    if source.startswith("hf:"):
        from cdlm.data.hf_sources import read_hf  # the optional dependency, imported when used

        splits = read_hf(source[3:], options.text_field, options)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source {source!r} not found; valid sources are {VALID_SOURCES}")
        text_field = options.text_field
        splits = {"train": read_folder(path, text_field) if path.is_dir() else read_file(path, text_field)}
    splits = {name: [d for d in docs if d.strip()] for name, docs in splits.items()}
    if not splits["train"]:
        raise ValueError(f"source {source!r} contains no text (no documents, or only whitespace)")
    if options.split_chars is not None:
        return split_by_chars(source, splits["train"], options.split_chars)
    return with_validation(splits, lambda train: hold_out(train, options.val_fraction, options.validation_docs))


def check_named(source: str) -> None:
    """A ``SourceError`` for a source that names nothing (blank, or ``hf:`` alone)."""
    if not source.strip() or source.strip() == "hf:":
        raise SourceError(f"source {source!r} names nothing; valid sources are {VALID_SOURCES}")


def load_source(source: str, text_field: str = "text", val_fraction: float = 0.05, **options: Any) -> Splits:
    """Documents per split ("train", "validation", and "test" when the source has one) of ``source``, as lists;
    ``options`` are the other fields of ``SourceOptions`` (docs/data.md)."""
    check_named(source)
    settings = SourceOptions(text_field, val_fraction, **options)
    settings.check_source(source)
    return read_source(source, settings)

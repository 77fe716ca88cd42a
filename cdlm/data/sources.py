"""Reading text sources into documents: the embedded corpus, ``.txt``/``.jsonl`` files or folders, ``hf:`` datasets."""

from __future__ import annotations

import json
from pathlib import Path

from cdlm.data.corpus import load_corpus

Splits = dict[str, list[str]]  # split name -> documents
VALID_SOURCES = "'shakespeare', a .txt or .jsonl file, a folder of .txt/.jsonl files, or 'hf:<name or local path>'"


class SourceError(ValueError):
    """A text source that cannot be read: the message names the file (and line) and what a valid source is."""


class MissingDependencyError(ValueError, ImportError):
    """An optional package a source needs is not installed; the message gives the ``pip install`` line.

    A ``ValueError`` so that the CLI reports it as a usage error, and an ``ImportError`` for callers that catch those.
    """


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


def read_file(path: Path, text_field: str) -> list[str]:
    """A ``.txt`` file is one document; a ``.jsonl`` file is one document per line."""
    if path.suffix == ".txt":
        return [decode_text(path)]
    if path.suffix == ".jsonl":
        return read_jsonl(path, text_field)
    raise SourceError(f"unsupported source file {path}: expected a .txt or .jsonl file")


def read_folder(path: Path, text_field: str) -> list[str]:
    """All ``.txt`` and ``.jsonl`` files under ``path`` (recursively, sorted by path)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
        raise ValueError(f"source folder {path} contains no .txt or .jsonl files")
    return [doc for f in files for doc in read_file(f, text_field)]


def read_hf(name: str, text_field: str) -> Splits:
    """A Hugging Face dataset: ``load_from_disk`` for a local saved dataset, else ``load_dataset(name)``."""
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError(
            f"source 'hf:{name}' needs the `datasets` package: pip install \"cdlm[hf]\""
        ) from e
    data = datasets.load_from_disk(name) if Path(name).exists() else datasets.load_dataset(name)
    if isinstance(data, datasets.Dataset):
        data = {"train": data}
    if "train" not in data:
        raise ValueError(f"hf dataset {name!r} has no 'train' split (found {sorted(data)})")
    splits: Splits = {}
    for split in ("train", "validation", "test"):
        if split in data:
            if text_field not in data[split].column_names:
                raise ValueError(
                    f"hf dataset {name!r} split {split!r} has no column {text_field!r} "
                    f"(columns: {data[split].column_names}); set text_field"
                )
            splits[split] = [str(t) for t in data[split][text_field]]
    return splits


def hold_out(docs: list[str], val_fraction: float) -> Splits:
    """Split off validation: the last documents (at least one), or with one document the last part of its text."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1.0 - val_fraction))
        return {"train": [docs[0][:cut]], "validation": [docs[0][cut:]]}
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    return {"train": docs[:-n_val], "validation": docs[-n_val:]}


def load_source(source: str, text_field: str = "text", val_fraction: float = 0.05) -> Splits:
    """Documents per split ("train", "validation", and "test" when the source has one) of ``source``."""
    if not source.strip() or source.strip() == "hf:":
        raise SourceError(f"source {source!r} names nothing; valid sources are {VALID_SOURCES}")
    if source == "shakespeare":
        return {split: load_corpus(split) for split in ("train", "validation", "test")}
    if source.startswith("hf:"):
        splits = read_hf(source[3:], text_field)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source {source!r} not found; valid sources are {VALID_SOURCES}")
        splits = {"train": read_folder(path, text_field) if path.is_dir() else read_file(path, text_field)}
    splits = {name: [d for d in docs if d.strip()] for name, docs in splits.items()}
    if not splits["train"]:
        raise ValueError(f"source {source!r} contains no text (no documents, or only whitespace)")
    if not splits.get("validation"):
        if splits.get("test"):
            splits["validation"] = splits["test"]
        else:
            splits.update(hold_out(splits["train"], val_fraction))
    return splits

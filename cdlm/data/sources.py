"""Reading text sources into documents: the embedded corpus, ``.txt``/``.jsonl`` files or folders, ``hf:`` datasets."""

from __future__ import annotations

import json
from pathlib import Path

from cdlm.data.corpus import load_corpus

Splits = dict[str, list[str]]  # split name -> documents
VALID_SOURCES = "'shakespeare', a .txt or .jsonl file, a folder of .txt/.jsonl files, or 'hf:<name or local path>'"


def read_jsonl(path: Path, text_field: str) -> list[str]:
    """The ``text_field`` of every JSON line of ``path``."""
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}:{n} has no text field {text_field!r} (found {keys}); set text_field")
        docs.append(str(row[text_field]))
    return docs


def read_file(path: Path, text_field: str) -> list[str]:
    """A ``.txt`` file is one document; a ``.jsonl`` file is one document per line."""
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        return read_jsonl(path, text_field)
    raise ValueError(f"unsupported source file {path}: expected a .txt or .jsonl file")


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
        raise ImportError(f"source 'hf:{name}' needs the `datasets` package: pip install cdlm[hf]") from e
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

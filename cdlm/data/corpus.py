"""The embedded Shakespeare corpus (built by ``scripts/build_corpus.py``), split by work."""

from __future__ import annotations

import hashlib
import json
import lzma
from functools import lru_cache
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "shakespeare"
SPLITS = ("train", "validation", "test")


def _manifest_bytes() -> bytes:
    path = CORPUS_DIR / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"corpus manifest {path} is missing; rebuild it with `python scripts/build_corpus.py`")
    return path.read_bytes()


def manifest() -> dict:
    """The parsed ``manifest.json`` (source, and per split: titles, n_chars, sha256)."""
    return json.loads(_manifest_bytes())


def corpus_checksum() -> str:
    """A short hash of the manifest, stable while the corpus files are unchanged (a cache key)."""
    return hashlib.sha256(_manifest_bytes()).hexdigest()[:16]


@lru_cache(maxsize=len(SPLITS))
def _load_split(split: str) -> tuple[tuple[str, str], ...]:
    entry = manifest()["splits"][split]
    path = CORPUS_DIR / entry["file"]
    raw = lzma.decompress(path.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(
            f"checksum mismatch for corpus file {path}: sha256 {digest} != manifest {entry['sha256']}; "
            "rebuild it with `python scripts/build_corpus.py`"
        )
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line]
    return tuple((row["title"], row["text"]) for row in rows)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; valid splits are {list(SPLITS)}")


def load_titles(split: str) -> list[str]:
    """The titles of the works in ``split``, in file order."""
    _check_split(split)
    return [title for title, _ in _load_split(split)]


def load_corpus(split: str) -> list[str]:
    """The texts of the works in ``split`` ("train", "validation" or "test"), checksum-verified."""
    _check_split(split)
    return [text for _, text in _load_split(split)]

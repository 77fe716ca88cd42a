"""Tokenise a source once into memory-mapped token arrays; every later launch, rank and resume only maps them.

A cache lives in ``<cache_dir or $CDLM_CACHE or ~/.cache/cdlm>/corpora/<key>/``, ``key`` a hash of the source's
fingerprint and the tokenizer's (its saved files), so a changed source or tokenizer gets a new cache. Per split:

- ``<split>.bin``: the token stream, every document followed by EOS, as uint16 (``V <= 65,535``) or uint32;
- ``<split>.docs.npy``: int64 ``[D + 1]`` offsets of the documents in the stream (each includes its EOS);
- ``<split>.chars.npy``: int64 ``[D]`` characters of each document;

and ``manifest.json`` (fingerprints, sizes, versions), written last. A build writes into ``<key>.partial-<pid>/``
and renames it into place when complete, under a lock, so an interrupted build never leaves a cache that looks
complete and concurrent ranks build it once (docs/data.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdlm.data.documents import Documents, digest
from cdlm.data.tokenizers import Tokenizer, default_cache_dir, load_tokenizer

FORMAT = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (``V <= 65,535``), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65_535 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer's saved files (what it is, not where it came from)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(tmp)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


class TokenFile:
    """A split's token stream ``[N]``, sliced like an array and read with ``pread``.

    Rows come through the page cache without being mapped into the process: a memory map would count every page a
    random row touched (and the pages the kernel maps around it) in the process's resident memory, which would then
    grow with the corpus and the number of steps. Safe across ``fork`` (``pread`` has no shared file position).
    """

    def __init__(self, path: Path, dtype: np.dtype, n: int) -> None:
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), n
        self._fd, self._pid = -1, -1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.n)
        if step != 1:
            raise ValueError("a token file is read in contiguous slices")
        if stop <= start:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd(), (stop - start) * size, start * size), dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def fd(self) -> int:
        """This process's descriptor of the file (reopened after a fork)."""
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1, "_pid": -1}


@dataclass(frozen=True)
class TokenMap:
    """One split of a cache: ``tokens`` ``[N]`` (a ``TokenFile``), ``docs`` offsets ``[D + 1]`` and ``chars`` ``[D]``
    (read-only memory maps: 8 bytes per document)."""

    tokens: TokenFile
    docs: np.ndarray
    chars: np.ndarray

    @classmethod
    def open(cls, directory: Path, split: str) -> TokenMap:
        manifest = json.loads((directory / MANIFEST).read_text())
        if split not in manifest["splits"]:
            raise ValueError(
                f"the token cache {directory} has no split {split!r} (it has {sorted(manifest['splits'])})"
            )
        dtype = np.dtype(manifest["dtype"])
        n = manifest["splits"][split]["tokens"]
        tokens = TokenFile(directory / f"{split}.bin", dtype, n)
        docs = np.load(directory / f"{split}.docs.npy", mmap_mode="r")
        return cls(tokens, docs, np.load(directory / f"{split}.chars.npy", mmap_mode="r"))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each document, its EOS included ``[D]``."""
        return np.diff(self.docs)


# ---- building ----------------------------------------------------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def encode(tokenizer: Tokenizer, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``docs`` as one stream with EOS after each ``[N]``, their token counts (EOS included) ``[D]`` and characters."""
    ids = tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    stream = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    for doc, end, n in zip(ids, ends, lengths):
        stream[end - n : end - 1] = doc
        stream[end - 1] = tokenizer.eos_id
    return stream, lengths, np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))


def _encode_in_worker(docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return encode(_WORKER_TOKENIZER, docs, np.dtype(dtype))


def encoded_batches(
    documents: Documents, split: str, tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``encode`` over the batches of ``split``, in order; on ``workers`` processes (spawned, each loading the
    tokenizer from its saved files) with at most two batches per worker in flight, so memory stays bounded."""
    if workers <= 1:
        for docs in documents.batches(split):
            yield encode(tokenizer, docs, dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker, initargs=(tmp,)) as pool:
            pending: deque = deque()
            for docs in documents.batches(split):
                pending.append(pool.apply_async(_encode_in_worker, (docs, dtype.str)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()


def write_split(
    directory: Path, documents: Documents, split: str, tokenizer: Tokenizer, workers: int
) -> dict[str, int]:
    """Tokenise ``split`` into ``directory``; returns its sizes."""
    dtype = token_dtype(tokenizer.vocab_size)
    lengths, chars = [], []
    with open(directory / f"{split}.bin", "wb") as out:
        for stream, doc_lengths, doc_chars in encoded_batches(documents, split, tokenizer, dtype, workers):
            out.write(stream.tobytes())
            lengths.append(doc_lengths)
            chars.append(doc_chars)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    np.save(directory / f"{split}.docs.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(directory / f"{split}.chars.npy", np.concatenate(chars) if chars else np.zeros(0, np.int64))
    return {"tokens": int(lengths.sum()), "documents": len(lengths), "chars": int(sum(c.sum() for c in chars))}


def build(directory: Path, documents: Documents, tokenizer: Tokenizer, workers: int) -> dict:
    """Write every split and, last, the manifest into ``directory``."""
    from cdlm.version import __version__

    started = time.perf_counter()
    splits = {split: write_split(directory, documents, split, tokenizer, workers) for split in documents.splits()}
    manifest = {
        "format": FORMAT,
        "source": documents.spec,
        "source_fingerprint": documents.fingerprint(),
        "tokenizer": {
            "kind": tokenizer.kind,
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": splits,
        "workers": workers,
        "seconds": round(time.perf_counter() - started, 3),
        "versions": {"cdlm": __version__, "numpy": np.__version__, "python": sys.version.split()[0]},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (waiting, and saying so, while another process holds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cdlm: waiting for another process building {what}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def cache_key(documents: Documents, tokenizer: Tokenizer) -> str:
    return digest(FORMAT, documents.fingerprint(), tokenizer_fingerprint(tokenizer))


def prepare_cache(
    documents: Documents, tokenizer: Tokenizer, cache_dir: str | Path | None = None, workers: int | None = None
) -> Path:
    """The cache directory of ``documents`` tokenised by ``tokenizer``, built first if it does not exist.

    ``workers``: tokenising processes (None: one per CPU core for sources of more than 8 batches, else 1).
    """
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "corpora"
    key = cache_key(documents, tokenizer)
    final = root / key
    if (final / MANIFEST).is_file():
        return final
    with locked(root / f"{key}.lock", f"the token cache {final}"):
        if (final / MANIFEST).is_file():  # another process built it while this one waited
            return final
        for stale in root.glob(f"{key}.partial-*"):  # an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without a manifest is not a cache
            shutil.rmtree(final)
        partial = root / f"{key}.partial-{os.getpid()}"
        partial.mkdir(parents=True)
        try:
            build(partial, documents, tokenizer, workers if workers is not None else auto_workers(documents))
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final


def auto_workers(documents: Documents) -> int:
    """One process per core when the source is large (its train split spans more than 8 batches), else 1."""
    batches = documents.batches("train")
    large = sum(1 for _ in zip(range(9), batches)) > 8
    return max(1, os.cpu_count() or 1) if large else 1

"""``build_tokenizer`` (with the on-disk BPE cache) and ``load_tokenizer``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cdlm.data.tokenizers.base import CONFIG_FILE, Tokenizer
from cdlm.data.tokenizers.bpe import BPETokenizer
from cdlm.data.tokenizers.byte import ByteTokenizer
from cdlm.data.tokenizers.char import CharTokenizer
from cdlm.data.tokenizers.hf import HFTokenizer

KINDS: dict[str, type[Tokenizer]] = {
    "char": CharTokenizer,
    "byte": ByteTokenizer,
    "bpe": BPETokenizer,
    "hf": HFTokenizer,
}
CACHE_VERSION = 1


class TokenizerError(ValueError):
    """A saved tokenizer folder that is missing, malformed or of an unknown kind."""


def default_cache_dir() -> Path:
    """The cdlm cache root: ``$CDLM_CACHE`` if set, else ``~/.cache/cdlm``."""
    return Path(os.environ.get("CDLM_CACHE") or "~/.cache/cdlm").expanduser()


def texts_hash(texts: list[str]) -> str:
    """A hash of the training texts (documents and their boundaries)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds are {sorted(KINDS)}")


def _cached(kind: str, train: Callable[[], Tokenizer], data_key: str, vocab_size: int | None, root: Path) -> Tokenizer:
    """The ``kind`` tokenizer of ``data_key`` from the cache, or ``train()`` it and store it (atomically)."""
    fields = {"kind": kind, "vocab_size": vocab_size, "data": data_key, "v": CACHE_VERSION}
    if kind == "char":
        fields.pop("vocab_size")
    digest = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
    path = root / "tokenizers" / (f"bpe-{vocab_size}-{digest}" if kind == "bpe" else f"{kind}-{digest}")
    if (path / CONFIG_FILE).is_file():
        return load_tokenizer(path)
    tok = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=path.parent))
    tok.save(tmp)
    try:
        tmp.rename(path)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def build_tokenizer(
    kind: str,
    texts: list[str] | Callable[[], list[str]] | None = None,
    vocab_size: int | None = None,
    name_or_path: str | None = None,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
) -> Tokenizer:
    """Build a tokenizer of ``kind`` ("char", "byte", "bpe" or "hf").

    ``char`` and ``bpe`` are trained on ``texts`` (a list, or a function returning it: called only when the
    tokenizer is not in the cache) and cached under ``<cache_dir or $CDLM_CACHE or ~/.cache/cdlm>/tokenizers`` keyed
    by (``cache_key`` or a hash of ``texts``, ``vocab_size``); ``bpe`` needs ``vocab_size``; ``hf`` loads
    ``name_or_path`` with ``transformers.AutoTokenizer``.
    """
    _check_kind(kind)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not name_or_path:
            raise ValueError("tokenizer kind 'hf' needs name_or_path (a Hugging Face tokenizer name or local path)")
        return HFTokenizer.from_pretrained(name_or_path)
    if kind == "bpe" and vocab_size is None:
        raise ValueError("tokenizer kind 'bpe' needs vocab_size (e.g. 2048)")
    loaded: list[list[str]] = []

    def training_texts() -> list[str]:
        if not loaded:
            loaded.append(texts() if callable(texts) else texts)
            if not loaded[0] or not any(loaded[0]):
                raise ValueError(f"tokenizer kind {kind!r} is trained on texts; got no (non-empty) training texts")
        return loaded[0]

    if kind == "char":
        train = lambda: CharTokenizer.train(training_texts())  # noqa: E731
    else:
        train = lambda: BPETokenizer.train(training_texts(), int(vocab_size))  # noqa: E731
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _cached(kind, train, cache_key or texts_hash(training_texts()), vocab_size, root)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Restore a tokenizer saved with ``Tokenizer.save(directory)``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {directory}: {CONFIG_FILE} is missing (write one with tok.save)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"{CONFIG_FILE} must hold a JSON object")
        kind = config.pop("kind", None)
        _check_kind(kind)
        return KINDS[kind].from_directory(Path(directory), config)
    except Exception as err:  # json, tokenizers and transformers raise many types for a malformed folder
        raise TokenizerError(f"the tokenizer at {directory} cannot be loaded: {type(err).__name__}: {err}") from err

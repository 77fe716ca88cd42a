"""The token cache: a map equal to a direct tokenisation, rebuilt when the source or tokenizer changes, never left
looking complete by an interrupted build, built once by concurrent processes, and read by rows without copies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdlm.data import token_cache
from cdlm.data.datamodule import TextDataModule
from cdlm.data.documents import open_source
from cdlm.data.rows import DocumentRows, PackedRows
from cdlm.data.token_cache import MANIFEST, TokenMap, prepare_cache
from cdlm.data.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    docs = [f"document {i}: " + "to be or not to be " * (i % 13 + 1) for i in range(60)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def direct(documents, tokenizer, split: str) -> np.ndarray:
    """The stream a split should map to: each document's ids, then EOS."""
    ids = []
    for doc in documents.texts(split):
        ids += [*tokenizer.encode(doc), tokenizer.eos_id]
    return np.array(ids, dtype=np.int64)


def test_map_equals_a_direct_tokenisation(corpus, tmp_path):
    documents = open_source(str(corpus), val_fraction=0.1)
    tokenizer = build_tokenizer("byte")
    path = prepare_cache(documents, tokenizer, tmp_path / "cache")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and manifest["source_fingerprint"] == documents.fingerprint()
    for split in ("train", "validation"):
        mapped = TokenMap.open(path, split)
        assert isinstance(mapped.tokens, token_cache.TokenFile)
        assert np.array_equal(np.asarray(mapped.tokens, dtype=np.int64), direct(documents, tokenizer, split))
        texts = documents.texts(split)
        assert mapped.chars.tolist() == [len(t) for t in texts]
        assert mapped.lengths.tolist() == [len(tokenizer.encode(t)) + 1 for t in texts]
        assert manifest["splits"][split] == {
            "tokens": len(mapped.tokens),
            "documents": len(texts),
            "chars": sum(map(len, texts)),
        }


def test_a_vocabulary_over_65535_uses_uint32():
    assert token_cache.token_dtype(65_535) == np.uint16 and token_cache.token_dtype(65_536) == np.uint32


def test_changed_source_or_tokenizer_gets_a_new_cache_and_an_unchanged_one_is_reused(corpus, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_cache(open_source(str(corpus)), build_tokenizer("byte"), cache)
    assert prepare_cache(open_source(str(corpus)), build_tokenizer("byte"), cache) == first
    other_tokenizer = prepare_cache(open_source(str(corpus)), build_tokenizer("char", texts=["abc to be"]), cache)
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more document"}) + "\n")
    changed = open_source(str(corpus))
    other_source = prepare_cache(changed, build_tokenizer("byte"), cache)
    assert len({first, other_tokenizer, other_source}) == 3
    assert TokenMap.open(other_source, "validation").chars[-1] == len("one more document")


def test_an_interrupted_build_never_looks_complete(corpus, tmp_path, monkeypatch):
    documents, tokenizer, cache = open_source(str(corpus)), build_tokenizer("byte"), tmp_path / "cache"
    calls = []

    def crash_after_train(directory, documents, split, tokenizer, workers):
        calls.append(split)
        if split != "train":
            raise KeyboardInterrupt  # killed mid-build, after one split was written
        return write_split(directory, documents, split, tokenizer, workers)

    write_split = token_cache.write_split
    monkeypatch.setattr(token_cache, "write_split", crash_after_train)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(documents, tokenizer, cache)
    assert calls == ["train", "validation"]
    root = cache / "corpora"
    assert not any((p / MANIFEST).exists() for p in root.iterdir() if p.is_dir())
    key = token_cache.cache_key(documents, tokenizer)
    (root / f"{key}.partial-99999").mkdir()  # what kill -9 leaves behind
    (root / key).mkdir()  # a directory without a manifest is not a cache
    monkeypatch.setattr(token_cache, "write_split", write_split)
    path = prepare_cache(documents, tokenizer, cache)
    assert (path / MANIFEST).is_file() and not list(root.glob("*.partial-*"))


def test_parallel_build_writes_the_same_bytes(corpus, tmp_path):
    documents, tokenizer = open_source(str(corpus)), build_tokenizer("byte")
    one = prepare_cache(documents, tokenizer, tmp_path / "one", workers=1)
    two = prepare_cache(documents, tokenizer, tmp_path / "two", workers=2)
    for name in ("train.bin", "train.docs.npy", "train.chars.npy", "validation.bin"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_concurrent_processes_build_once(corpus, tmp_path):
    script = (
        "import sys; from cdlm.data.documents import open_source; from cdlm.data.token_cache import prepare_cache;"
        "from cdlm.data.tokenizers import build_tokenizer;"
        f"print(prepare_cache(open_source({str(corpus)!r}), build_tokenizer('byte'), {str(tmp_path / 'c')!r}))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    paths = {p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs}
    assert len(paths) == 1 and all(p.returncode == 0 for p in procs)
    assert len([d for d in (tmp_path / "c" / "corpora").iterdir() if d.is_dir()]) == 1


def test_rows_read_from_the_map(corpus, tmp_path):
    documents, tokenizer = open_source(str(corpus)), build_tokenizer("byte")
    mapped = TokenMap.open(prepare_cache(documents, tokenizer, tmp_path), "train")
    stream, lengths = np.asarray(mapped.tokens, dtype=np.int64), tokenizer.char_lengths()
    packed = PackedRows(mapped.tokens, 32, tokenizer.pad_id, lengths)
    assert len(packed) == -(-len(stream) // 32)
    row = packed[len(packed) - 1]
    tail = stream[(len(packed) - 1) * 32 :]
    assert row["input_ids"][: len(tail)].tolist() == tail.tolist() and int(row["attention_mask"].sum()) == len(tail)
    per_doc = DocumentRows(mapped.tokens, mapped.docs, 32, tokenizer.pad_id, lengths)
    assert len(per_doc) == int(sum(-(-n // 32) for n in mapped.lengths))
    assert per_doc.row_lengths().sum() == len(stream)
    first_doc = stream[: mapped.docs[1]]
    assert per_doc[0]["input_ids"][: min(32, len(first_doc))].tolist() == first_doc[:32].tolist()
    per_doc.cap(40)
    assert (
        len(per_doc)
        == int((np.cumsum(DocumentRows(mapped.tokens, mapped.docs, 32, 1, lengths).row_lengths()) < 40).sum()) + 1
    )


def test_datamodule_rows_hold_no_copy_of_the_corpus(corpus, tmp_path):
    dm = TextDataModule(source=str(corpus), tokenizer="byte", seq_len=16, batch_size=4, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert isinstance(dm.dataset("train").tokens, token_cache.TokenFile)
    assert (dm.token_cache() / MANIFEST).is_file() and dm.token_cache().parent == tmp_path / "corpora"


def test_cdlm_prepare_builds_and_reports_the_cache(corpus, tmp_path, capsys):
    from cdlm.cli import main

    main(["prepare", f"data.source={corpus}", "data.tokenizer=byte", f"data.cache_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert f"token cache {tmp_path / 'corpora'}" in out and "uint16" in out
    assert "train: " in out and "validation: " in out and "bytes/token" in out


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_launch_on_a_prepared_source_reads_no_text(corpus, tmp_path, monkeypatch, tokenizer):
    """Tokenizer and token cache both come from the cache: a second data module never reads the documents."""
    from cdlm.data.documents import LoadedDocuments

    settings = dict(
        source=str(corpus), tokenizer=tokenizer, vocab_size=300, seq_len=16, batch_size=4, cache_dir=str(tmp_path)
    )
    first = TextDataModule(**settings)
    first.setup("fit")
    monkeypatch.setattr(LoadedDocuments, "loaded", lambda self: pytest.fail("the source was read again"))
    second = TextDataModule(**settings)
    second.setup("fit")
    assert second.tokenizer.vocab_size == first.tokenizer.vocab_size
    assert second.dataset("train")[3]["input_ids"].tolist() == first.dataset("train")[3]["input_ids"].tolist()

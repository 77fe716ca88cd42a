"""Tests of the data layer: embedded corpus, tokenizers, packing, sources and the datamodule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cdlm.data import corpus
from cdlm.data.corpus import corpus_checksum, load_corpus, load_titles
from cdlm.data.datamodule import TextDataModule
from cdlm.data.packing import chunk_documents, cut_blocks, pack_documents, row_chars
from cdlm.data.sources import MissingDependencyError, SourceError, load_source, read_jsonl
from cdlm.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from cdlm.data.tokenizers import bpe as bpe_module


@pytest.fixture(scope="module")
def sample() -> str:
    """About 20k characters of real text (the start of a validation play)."""
    return load_corpus("validation")[0][:20_000]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDLM_CACHE", str(tmp_path / "cache"))


def make_hf_tokenizer_dir(texts: list[str], path: Path) -> Path:
    """A tiny local ``transformers`` tokenizer (no hub access)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=bpe_module.train_bpe(texts, 300), eos_token="<eos>")
    fast.save_pretrained(str(path))
    return path


# --- corpus -------------------------------------------------------------------------------------------------------


def test_corpus_splits_and_statistics():
    splits = {s: load_corpus(s) for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [38, 2, 2]
    held_out = load_titles("validation") + load_titles("test")
    assert "sonnets" not in held_out and not set(held_out) & set(load_titles("train"))
    text = "".join(t for docs in splits.values() for t in docs)
    assert abs(len(text) - 5_057_198) < 100
    assert len(set(text)) == 84
    assert all(t.endswith("\n") and not t.endswith("\n\n") for docs in splits.values() for t in docs)
    assert len(corpus_checksum()) == 16 and corpus_checksum() == corpus_checksum()


def test_corpus_unknown_split():
    with pytest.raises(ValueError, match="valid splits"):
        load_corpus("dev")


def test_corpus_checksum_mismatch(tmp_path, monkeypatch):
    fake = tmp_path / "shakespeare"
    shutil.copytree(corpus.CORPUS_DIR, fake)
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest["splits"]["test"]["sha256"] = "0" * 64
    (fake / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(corpus, "CORPUS_DIR", fake)
    corpus._load_split.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"checksum mismatch .*test\.jsonl\.xz"):
            load_corpus("test")
    finally:
        corpus._load_split.cache_clear()


# --- tokenizers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "hf"])
def test_tokenizer_round_trip_and_save_load(kind, sample, tmp_path):
    texts = [sample[:10_000], sample[10_000:]]
    name = str(make_hf_tokenizer_dir(texts, tmp_path / "hf")) if kind == "hf" else None
    tok = build_tokenizer(kind, texts=texts, vocab_size=300, name_or_path=name)
    assert isinstance(tok, Tokenizer)
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert max(ids) < tok.vocab_size and tok.eos_id < tok.vocab_size and tok.pad_id < tok.vocab_size
    lengths = tok.char_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype == torch.long
    assert int(lengths[torch.tensor(ids)].sum()) == len(sample)
    assert lengths[tok.eos_id] == 0 and lengths[tok.pad_id] == 0
    # specials and out-of-range ids are dropped, never a crash
    assert tok.decode([*ids[:5], tok.eos_id, -1, tok.vocab_size + 7, tok.pad_id]) == tok.decode(ids[:5])

    tok.save(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert (loaded.eos_id, loaded.pad_id, loaded.name) == (tok.eos_id, tok.pad_id, tok.name)
    assert loaded.encode(sample) == ids
    assert torch.equal(loaded.char_lengths(), lengths)


def test_char_tokenizer_unknown_character():
    tok = build_tokenizer("char", texts=["abc"])
    assert tok.encode("abz") == [0, 1, tok.unk_id]
    assert tok.decode(tok.encode("abz")) == "ab\ufffd"


def test_byte_tokenizer_non_ascii():
    tok = build_tokenizer("byte")
    text = "héllo → wörld"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and int(tok.char_lengths()[torch.tensor(ids)].sum()) == len(text)


def test_bpe_non_ascii_char_lengths(sample):
    tok = build_tokenizer("bpe", texts=[sample + "héllo → wörld"], vocab_size=300)
    text = "wörld → héllo"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and int(tok.char_lengths()[torch.tensor(ids)].sum()) == len(text)


def test_bpe_cache_hit_does_not_retrain(sample, tmp_path, monkeypatch):
    first = build_tokenizer("bpe", texts=[sample], vocab_size=300, cache_dir=tmp_path / "c")

    def fail(*args, **kwargs):
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(bpe_module, "train_bpe", fail)
    second = build_tokenizer("bpe", texts=[sample], vocab_size=300, cache_dir=tmp_path / "c")
    assert second.encode(sample) == first.encode(sample) and second.vocab_size == first.vocab_size
    with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another cache entry
        build_tokenizer("bpe", texts=[sample], vocab_size=301, cache_dir=tmp_path / "c")


def test_unknown_tokenizer_kind(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'wordpiece'.*'bpe'"):
        build_tokenizer("wordpiece", texts=["abc"])
    with pytest.raises(ValueError, match="valid kinds"):
        TextDataModule(tokenizer="wordpiece")
    with pytest.raises(FileNotFoundError, match="cdlm_tokenizer.json"):
        load_tokenizer(tmp_path)


# --- packing ------------------------------------------------------------------------------------------------------


def test_packing_puts_eos_between_documents_and_masks_only_padding():
    stream = pack_documents([[1, 2, 3], [4, 5]], eos_id=9)
    assert stream.tolist() == [1, 2, 3, 9, 4, 5, 9]
    ids, mask = cut_blocks(stream, seq_len=3, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [9, 4, 5], [9, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True] * 3, [True, False, False]]


def test_chunking_one_document_per_row():
    ids, mask = chunk_documents([[1, 2, 3, 4], [5]], seq_len=3, eos_id=9, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 0], [5, 9, 0]]
    assert mask.tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    assert row_chars(ids, mask, torch.tensor([0, 1, 1, 1, 1, 2, 0, 0, 0, 0])).tolist() == [3, 1, 2]


# --- datamodule ---------------------------------------------------------------------------------------------------


def stacked(ds) -> SimpleNamespace:
    """All rows of a dataset as ``ids`` / ``mask`` ``[R, L]`` and ``n_chars`` ``[R]``."""
    rows = [ds[i] for i in range(len(ds))]
    return SimpleNamespace(
        ids=torch.stack([r["input_ids"] for r in rows]),
        mask=torch.stack([r["attention_mask"] for r in rows]),
        n_chars=torch.stack([r["n_chars"] for r in rows]),
    )


def batches_decode_to_their_n_chars(dm: TextDataModule) -> None:
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool
        for ids, mask, n in zip(batch["input_ids"], batch["attention_mask"], batch["n_chars"]):
            assert len(dm.tokenizer.decode(ids[mask].tolist())) == int(n)


@pytest.mark.parametrize("packing", [True, False])
def test_datamodule_text_file(sample, tmp_path, packing):
    path = tmp_path / "play.txt"
    path.write_text(sample)
    dm = TextDataModule(source=str(path), seq_len=64, batch_size=4, packing=packing)
    dm.prepare_tokenizer()
    dm.setup("fit")
    train, val = stacked(dm.dataset("train")), stacked(dm.dataset("validation"))
    assert int(train.n_chars.sum()) + int(val.n_chars.sum()) == len(sample)  # one document: split by text
    tok = dm.tokenizer
    for ds in (train, val):
        assert torch.equal(ds.mask, ds.ids != tok.pad_id)  # only padding is masked
        assert int((ds.ids == tok.eos_id).sum()) == 1  # one document per split, EOS at its end
    batches_decode_to_their_n_chars(dm)


def test_datamodule_padding_mode_masks_padding(tmp_path):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": "ab" * n}) for n in range(1, 41)))
    dm = TextDataModule(source=str(tmp_path / "docs.jsonl"), seq_len=16, batch_size=2, packing=False)
    dm.setup("fit")
    ds, tok = stacked(dm.dataset("train")), dm.tokenizer
    assert ds.ids.shape[1] == 16 and not ds.mask.all()
    assert torch.equal(ds.mask, ds.ids != tok.pad_id)
    assert torch.equal((ds.ids == tok.eos_id).sum(), torch.tensor(38))  # 40 documents, 2 held out
    assert len(dm.dataset("validation")) == 5 + 6  # held out "ab" * 39 + EOS (79 tokens) and "ab" * 40 + EOS (81)
    batches_decode_to_their_n_chars(dm)


def test_datamodule_folder_and_jsonl_sources(sample, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(sample[i * 4000 : (i + 1) * 4000])
    (folder / "sub" / "more.jsonl").write_text(json.dumps({"body": sample[16_000:]}) + "\n\n")
    dm = TextDataModule(source=str(folder), text_field="body", seq_len=32, batch_size=8, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.texts()["train"]) == 4 and dm.texts()["validation"] == [sample[16_000:]]
    batches_decode_to_their_n_chars(dm)
    with pytest.raises(ValueError, match="no text field 'text'"):
        TextDataModule(source=str(folder)).setup("fit")


def test_datamodule_hf_dataset_on_disk(sample, tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = [sample[i : i + 2000] for i in range(0, 20_000, 2000)]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs[:8]}),
            "test": datasets.Dataset.from_dict({"text": docs[8:]}),
        }
    ).save_to_disk(str(tmp_path / "ds"))
    dm = TextDataModule(source=f"hf:{tmp_path / 'ds'}", tokenizer="byte", seq_len=64, batch_size=8)
    dm.setup("fit")
    assert dm.texts()["train"] == docs[:8] and dm.texts()["validation"] == docs[8:]
    batches_decode_to_their_n_chars(dm)

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "flat"))
    dm = TextDataModule(source=f"hf:{tmp_path / 'flat'}", seq_len=64, batch_size=8, val_fraction=0.2)
    assert dm.texts()["train"] == docs[:8] and dm.texts()["validation"] == docs[8:]


def test_datamodule_hf_tokenizer_and_val_cap(sample, tmp_path):
    name = str(make_hf_tokenizer_dir([sample], tmp_path / "hf"))
    (tmp_path / "a.txt").write_text(sample)
    source = str(tmp_path / "a.txt")
    dm = TextDataModule(source=source, tokenizer="hf", tokenizer_name=name, seq_len=32, batch_size=4, max_val_tokens=40)
    dm.setup("fit")
    assert dm.tokenizer.name == name
    assert len(dm.dataset("validation")) == 2  # rows until 40 real tokens
    batches_decode_to_their_n_chars(dm)


def test_set_tokenizer_overrides_building(sample, tmp_path):
    build_tokenizer("byte").save(tmp_path / "tok")
    (tmp_path / "a.txt").write_text(sample)
    dm = TextDataModule(source=str(tmp_path / "a.txt"), tokenizer="char", seq_len=32, batch_size=4)
    dm.set_tokenizer(load_tokenizer(tmp_path / "tok"))
    assert dm.prepare_tokenizer().name == "byte"
    dm.setup("fit")
    assert stacked(dm.dataset("train")).ids.max() < 258


def test_embedded_corpus_datamodule_shapes():
    dm = TextDataModule(tokenizer="byte", seq_len=128, batch_size=4, eval_batch_size=3, max_val_tokens=1000)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128) and batch["n_chars"].shape == (4,)
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (3, 128)
    assert len(dm.dataset("validation")) == 8  # ceil(1000 / 128)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: str(p / "missing.txt"), FileNotFoundError, r"not found; valid sources are 'shakespeare'"),
        (lambda p: (p / "e.txt").write_text("  \n\t\n") and str(p / "e.txt"), ValueError, "contains no text"),
        (lambda p: (p / "s.txt").write_text("to be or not to be") and str(p / "s.txt"), ValueError, "too short"),
        (lambda p: (p / "x.csv").write_text("a,b") and str(p / "x.csv"), ValueError, r"expected a \.txt or \.jsonl"),
        (lambda p: (p / "d").mkdir() or str(p / "d"), ValueError, "no .txt or .jsonl files"),
    ],
)
def test_datamodule_bad_sources(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        TextDataModule(source=make(tmp_path), seq_len=64, batch_size=4).setup("fit")


def test_too_short_message_suggests_what_fits(sample, tmp_path):
    (tmp_path / "a.txt").write_text(sample[:3000])
    with pytest.raises(ValueError, match=r"\d+ training rows of seq_len=256.*use batch_size <= \d+ or seq_len <= \d+"):
        TextDataModule(source=str(tmp_path / "a.txt"), seq_len=256, batch_size=32).setup("fit")


def test_hf_source_without_datasets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match=r'needs the `datasets` package: pip install "cdlm\[hf\]"') as info:
        TextDataModule(source="hf:some/dataset").setup("fit")
    assert isinstance(info.value, (MissingDependencyError, ImportError))  # still an ImportError for old callers


# --- malformed sources: a ValueError naming the file (and line) -----------------------------------------------------

PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("utf16.txt", b"\xff\xfe\x00abc", r"utf16\.txt is not UTF-8 text: invalid byte 0xff at byte offset 0 "),
        ("latin1.txt", "line one\ncaf\xe9\n".encode("latin-1"), r"latin1\.txt .*offset 12 \(line 2\).*must be UTF-8"),
        ("nul.txt", b"\x00\x00\x00", r"nul\.txt looks binary: NUL byte at offset 0; a source must be UTF-8 text"),
        ("late_nul.txt", b"text\x00", r"late_nul\.txt looks binary: NUL byte at offset 4"),
        ("image.txt", PNG_HEADER, r"image\.txt is not UTF-8 .*looks binary: NUL byte at offset 8"),
        ("rows.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"rows\.jsonl is not UTF-8 .*\(line 2\)"),
        ("nul.jsonl", b'{"text": "a\x00"}\n', r"nul\.jsonl looks binary: NUL byte at offset 11"),
    ],
)
def test_non_text_files_name_the_file_and_offset(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SourceError, match=match):
        load_source(str(tmp_path / name))


def test_non_utf8_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.txt").write_bytes(b"ok\xff")
    with pytest.raises(ValueError, match=r"sub/bad\.txt is not UTF-8 text: invalid byte 0xff at byte offset 2"):
        load_source(str(tmp_path))


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "a"}', "{not json"], r"bad\.jsonl:2 is not valid JSON \(Expecting property name .* column 2\)"),
        (['{"text": "a"}', '{"text": "b"} trailing'], r"bad\.jsonl:2 is not valid JSON \(Extra data"),
        (['["a", "b"]'], r"bad\.jsonl:1 has no text field 'text': the line is a JSON array, not an object"),
        (['{"text": "a"}', '"just a string"'], r"bad\.jsonl:2 has no text field 'text': the line is a JSON string"),
        (['{"body": "a"}'], r"bad\.jsonl:1 has no text field 'text' \(found \['body'\]\); set text_field"),
        (['{"text": 12}'], r"bad\.jsonl:1: text field 'text' is a JSON number \('12'\), not a string"),
        (['{"text": null}'], r"bad\.jsonl:1: text field 'text' is a JSON null"),
        (['{"text": ["a"]}'], r"bad\.jsonl:1: text field 'text' is a JSON array"),
        (['{"text": "a"}', "", '{"text": "b"}', "[" * 100_000], r"bad\.jsonl:4 is not valid JSON \(maximum recursion"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, match):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=match):
        load_source(str(tmp_path / "bad.jsonl"))


def test_jsonl_line_numbers_ignore_unicode_line_breaks_inside_strings(tmp_path):
    odd = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"  # all split by str.splitlines, none by a .jsonl reader
    rows = [json.dumps({"text": odd}, ensure_ascii=False), json.dumps({"text": "second"}), "{broken"]
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(rows), encoding="utf-8")
    with pytest.raises(SourceError, match=r"odd\.jsonl:3 is not valid JSON"):
        load_source(str(path))
    path.write_text("\n".join(rows[:2]), encoding="utf-8")
    assert read_jsonl(path, "text") == [odd, "second"]


def test_jsonl_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two\\r\\n"}\r\n{oops}\r\n')
    with pytest.raises(SourceError, match=r"windows\.jsonl:4 is not valid JSON"):
        read_jsonl(path, "text")
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two\\r\\n"}\r\n')
    assert read_jsonl(path, "text") == ["one", "two\r\n"]


@pytest.mark.parametrize("source", ["", "   ", "hf:"])
def test_empty_source_names_nothing(source):
    with pytest.raises(SourceError, match=r"names nothing; valid sources are 'shakespeare'"):
        load_source(source)


def test_stateful_dataloader_resumes_batch_order(sample, tmp_path):
    (tmp_path / "a.txt").write_text(sample)
    dm = TextDataModule(source=str(tmp_path / "a.txt"), seq_len=32, batch_size=4, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    expected = [next(it)["input_ids"] for _ in range(2)]

    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = [next(it)["input_ids"] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    fresh = next(iter(dm.train_dataloader()))["input_ids"]
    assert not torch.equal(fresh, got[0])  # the resumed loader did not restart the epoch

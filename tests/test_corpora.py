"""Sources and corpus configs at the ``open_source`` / ``Documents`` level: every source kind gives the right
documents per split and a fingerprint that follows its content and split settings; the OWT, LM1B, text8 and
FineWeb-Edu configs' code paths on small local stand-ins of the same schema (no download: Hugging Face offline)."""

from __future__ import annotations

import builtins
import inspect
import json
import os
from pathlib import Path

import pytest
import yaml

from cdlm.config import CONFIG_DIR
from cdlm.data.documents import ArrowDocuments, Documents, open_source
from cdlm.data.sources import MissingDependencyError, SourceError, load_source

SOURCE_KEYS = set(inspect.signature(open_source).parameters)  # source, text_field, val_fraction, validation_docs, ...


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """Hugging Face offline, its datasets cache and cdlm's cache in ``tmp_path``."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CDLM_CACHE", str(tmp_path / "cdlm-cache"))
    try:
        import datasets
    except ImportError:
        return
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def contents(documents: Documents, size: int = 3) -> dict[str, list[str]]:
    """Every split's documents, read in batches of ``size``; ``texts`` gives the same lists."""
    read = {split: [doc for batch in documents.batches(split, size) for doc in batch] for split in documents.splits()}
    assert read == {split: documents.texts(split) for split in documents.splits()}
    return read


def touch(path: Path, seconds: int) -> None:
    """Set ``path``'s modification time (a changed file whose mtime would otherwise fall in the same tick)."""
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


DOCS = [f"document {i}: " + "word " * (i + 1) for i in range(10)]


# --- files and folders -----------------------------------------------------------------------------------------------


def test_txt_file_is_one_document_cut_by_val_fraction(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abcdefghij" * 10)
    documents = open_source(str(path), val_fraction=0.1)
    assert contents(documents) == {"train": ["abcdefghij" * 9], "validation": ["abcdefghij"]}
    assert open_source(str(path), val_fraction=0.1).fingerprint() == documents.fingerprint()
    assert open_source(str(path), val_fraction=0.2).fingerprint() != documents.fingerprint()
    path.write_text("abcdefghij" * 11)
    assert open_source(str(path), val_fraction=0.1).fingerprint() != documents.fingerprint()


def test_jsonl_file_validation_docs_and_fraction(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    by_fraction = open_source(str(path), val_fraction=0.2)
    assert contents(by_fraction) == {"train": DOCS[:8], "validation": DOCS[8:]}
    by_count = open_source(str(path), validation_docs=3)
    assert contents(by_count) == {"train": DOCS[:7], "validation": DOCS[7:]}
    assert by_count.fingerprint() != by_fraction.fingerprint()
    assert open_source(str(path), validation_docs=3).fingerprint() == by_count.fingerprint()
    assert open_source(str(path), validation_docs=4).fingerprint() != by_count.fingerprint()
    assert load_source(str(path), validation_docs=3) == contents(by_count)
    write_jsonl(path, DOCS[:9])
    assert open_source(str(path), validation_docs=3).fingerprint() != by_count.fingerprint()


def test_folder_of_txt_jsonl_and_parquet(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCS[0])
    write_jsonl(folder / "b.jsonl", DOCS[1:3], field="body")
    parquet = write_parquet(folder / "sub" / "c.parquet", {"body": [DOCS[3], None, "  \n", DOCS[4]], "n": [1, 2, 3, 4]})
    documents = open_source(str(folder), text_field="body", validation_docs=1)
    assert contents(documents) == {"train": DOCS[:4], "validation": DOCS[4:5]}  # sorted by path; null, blank skipped
    fingerprint = documents.fingerprint()
    assert open_source(str(folder), text_field="body", validation_docs=1).fingerprint() == fingerprint
    assert open_source(str(folder), text_field="body", validation_docs=2).fingerprint() != fingerprint
    write_parquet(parquet, {"body": [DOCS[3], DOCS[5]], "n": [1, 2]})
    touch(parquet, 1)
    changed = open_source(str(folder), text_field="body", validation_docs=1)
    assert changed.fingerprint() != fingerprint and changed.texts("validation") == [DOCS[5]]


def test_single_parquet_file_source(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"text": DOCS})
    assert contents(open_source(str(path), validation_docs=2)) == {"train": DOCS[:8], "validation": DOCS[8:]}


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"body": ["x"]}, r"a\.parquet has no column 'text' \(columns: \['body'\]\); set text_field"),
        ({"text": [1, 2]}, r"a\.parquet: column 'text' holds int64, not strings"),
        (None, r"a\.parquet is not a readable \.parquet file"),
    ],
)
def test_bad_parquet_names_the_file(tmp_path, columns, match):
    path = tmp_path / "a.parquet"
    if columns is None:
        path.write_bytes(b"not parquet at all")
    else:
        write_parquet(path, columns)
    with pytest.raises(SourceError, match=match):
        load_source(str(path))


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", {"text": DOCS})
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(MissingDependencyError, match=r'needs the `pyarrow` package: pip install "cdlm\[hf\]"'):
        load_source(str(path))


def test_split_chars_cuts_one_document(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 12)
    documents = open_source(str(path), split_chars=[100, 10, 10])
    assert contents(documents) == {
        "train": ["abcdefghij" * 10],
        "validation": ["abcdefghij"],
        "test": ["abcdefghij"],
    }
    assert open_source(str(path), split_chars=[90, 10]).splits() == ("train", "validation")
    assert open_source(str(path), split_chars=[90, 10]).fingerprint() != documents.fingerprint()
    with pytest.raises(SourceError, match=r"has 120 characters, fewer than split_chars \[100, 20, 10\]"):
        open_source(str(path), split_chars=[100, 20, 10]).splits()
    with pytest.raises(SourceError, match="cuts a one-document source"):
        open_source(str(write_jsonl(tmp_path / "a.jsonl", DOCS)), split_chars=[5, 5]).splits()


@pytest.mark.parametrize(
    ("source", "options", "error", "match"),
    [
        ("a.txt", {"validation_docs": 0}, ValueError, "validation_docs must be a positive integer"),
        ("a.txt", {"split_chars": [10]}, ValueError, "split_chars must be 2 or 3 positive integers"),
        ("a.txt", {"split_chars": [5, 5], "validation_docs": 1}, ValueError, "not both"),
        ("a.txt", {"hf_config": "x"}, ValueError, r"hf_config apply to 'hf:' sources only"),
        ("a.txt", {"data_files": ["x.json"]}, ValueError, r"data_files apply to 'hf:' sources only"),
        ("hf:json", {"split_chars": [5, 5]}, ValueError, "split_chars cuts a one-document file source"),
        ("hf:json", {"hf_splits": {"validation": "test"}}, ValueError, "hf_splits must map 'train'"),
        ("hf:json", {"hf_splits": {"train": ""}}, ValueError, "hf_splits values must be split names"),
        ("hf:", {}, SourceError, "names nothing"),
    ],
)
def test_bad_source_options(tmp_path, source, options, error, match):
    (tmp_path / "a.txt").write_text("some text")
    source = str(tmp_path / source) if source == "a.txt" else source
    with pytest.raises(error, match=match):
        open_source(source, **options)


def test_validation_docs_must_leave_training_documents(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    with pytest.raises(
        SourceError, match=r"validation_docs=3 would hold out every train document \(the source has 3\)"
    ):
        open_source(str(path), validation_docs=3).splits()


# --- Hugging Face datasets -------------------------------------------------------------------------------------------


def save_dataset(path: Path, splits: dict[str, list[str]], field: str = "text") -> str:
    """``splits`` saved with ``save_to_disk`` (a ``Dataset`` for one ``train`` split, else a ``DatasetDict``)."""
    datasets = pytest.importorskip("datasets")
    built = {k: datasets.Dataset.from_dict({field: v, "id": list(range(len(v)))}) for k, v in splits.items()}
    data = built["train"] if list(built) == ["train"] else datasets.DatasetDict(built)
    data.save_to_disk(str(path))
    return f"hf:{path}"


def test_saved_dataset_with_its_own_validation_split(tmp_path):
    source = save_dataset(tmp_path / "ds", {"train": DOCS[:6], "validation": DOCS[6:8], "test": DOCS[8:]})
    documents = open_source(source)
    assert isinstance(documents, ArrowDocuments)
    assert contents(documents) == {"train": DOCS[:6], "validation": DOCS[6:8], "test": DOCS[8:]}
    assert open_source(source).fingerprint() == documents.fingerprint()
    assert open_source(source, val_fraction=0.5).fingerprint() != documents.fingerprint()
    save_dataset(tmp_path / "ds", {"train": DOCS[:5], "validation": DOCS[6:8], "test": DOCS[8:]})
    assert open_source(source).fingerprint() != documents.fingerprint()


def test_saved_dataset_train_only_holds_out_the_last_rows(tmp_path):
    source = save_dataset(tmp_path / "ds", {"train": DOCS})
    by_fraction = open_source(source, val_fraction=0.2)
    assert contents(by_fraction) == {"train": DOCS[:8], "validation": DOCS[8:]}
    by_count = open_source(source, validation_docs=3)
    assert contents(by_count) == {"train": DOCS[:7], "validation": DOCS[7:]}
    train, validation = by_count.datasets()["train"], by_count.datasets()["validation"]
    assert validation.cache_files == train.cache_files  # selections of the same memory-mapped file: no copy
    assert by_count.fingerprint() != by_fraction.fingerprint()
    assert open_source(source, validation_docs=3).fingerprint() == by_count.fingerprint()
    assert load_source(source, validation_docs=3) == contents(by_count)


def test_saved_dataset_text_field_and_split_mapping(tmp_path):
    source = save_dataset(tmp_path / "ds", {"train": DOCS[:8], "dev": DOCS[8:]}, field="body")
    documents = open_source(source, text_field="body", hf_splits={"train": "train", "validation": "dev"})
    assert contents(documents) == {"train": DOCS[:8], "validation": DOCS[8:]}
    assert open_source(source, text_field="body").fingerprint() != documents.fingerprint()
    with pytest.raises(ValueError, match=r"split 'train' has no column 'text' \(columns: \['body', 'id'\]\)"):
        open_source(source).splits()
    with pytest.raises(SourceError, match=r"has no split\(s\) \['valid'\] \(found \['dev', 'train'\]\)"):
        open_source(source, text_field="body", hf_splits={"train": "train", "validation": "valid"}).splits()


def test_saved_dataset_of_one_document_is_cut_by_text(tmp_path):
    source = save_dataset(tmp_path / "ds", {"train": ["abcdefghij" * 10]})
    assert contents(open_source(source, val_fraction=0.1)) == {
        "train": ["abcdefghij" * 9],
        "validation": ["abcdefghij"],
    }


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_local_data_files_through_load_dataset(tmp_path, kind):
    pytest.importorskip("datasets")
    if kind == "json":
        train, test = write_jsonl(tmp_path / "train.jsonl", DOCS[:8]), write_jsonl(tmp_path / "test.jsonl", DOCS[8:])
    else:
        train = write_parquet(tmp_path / "train.parquet", {"text": DOCS[:8]})
        test = write_parquet(tmp_path / "test.parquet", {"text": DOCS[8:]})
    files = {"train": str(train), "test": str(test)}
    documents = open_source(f"hf:{kind}", data_files=files)
    assert contents(documents) == {"train": DOCS[:8], "validation": DOCS[8:], "test": DOCS[8:]}  # test validates
    assert open_source(f"hf:{kind}", data_files=files).fingerprint() == documents.fingerprint()
    sliced = open_source(f"hf:{kind}", data_files=files, hf_splits={"train": "train[:-2]", "validation": "train[-2:]"})
    assert contents(sliced) == {"train": DOCS[:6], "validation": DOCS[6:8]}
    assert sliced.fingerprint() != documents.fingerprint()
    if kind == "json":
        write_jsonl(train, DOCS[:7])
    else:
        write_parquet(train, {"text": DOCS[:7]})
    touch(train, 1)
    changed = open_source(f"hf:{kind}", data_files=files)
    assert changed.fingerprint() != documents.fingerprint() and changed.texts("train") == DOCS[:7]


def test_hf_dataset_is_opened_on_first_use(tmp_path):
    pytest.importorskip("datasets")
    documents = open_source("hf:json", data_files=str(tmp_path / "missing.jsonl"))  # nothing opened yet
    with pytest.raises(FileNotFoundError):
        documents.splits()


# --- the corpus configs on local stand-ins ---------------------------------------------------------------------------


def corpus_config(name: str) -> dict:
    """``cdlm/configs/data/<name>.yaml``."""
    return yaml.safe_load((CONFIG_DIR / "data" / f"{name}.yaml").read_text())


def open_corpus(name: str, **overrides) -> Documents:
    """``open_source`` with the source options of config ``name``, ``overrides`` (the stand-in, small sizes) on top."""
    config = {**corpus_config(name), **overrides}
    return open_source(**{k: v for k, v in config.items() if k in SOURCE_KEYS})


def test_corpus_configs_follow_their_papers():
    configs = {name: corpus_config(name) for name in ("owt", "lm1b", "text8", "fineweb_edu")}
    for config in configs.values():
        assert config["_target_"] == "cdlm.data.datamodule.TextDataModule"
    for name in ("owt", "fineweb_edu"):
        assert configs[name]["tokenizer"] == "hf" and configs[name]["tokenizer_name"] == "gpt2"
        assert configs[name]["seq_len"] == 1024 and configs[name]["packing"] is True
        assert configs[name]["validation_docs"] == 100_000
    assert configs["owt"]["source"] == "hf:Skylion007/openwebtext"
    assert configs["fineweb_edu"]["source"] == "hf:HuggingFaceFW/fineweb-edu"
    assert configs["fineweb_edu"]["hf_config"] == "sample-10BT"
    lm1b = configs["lm1b"]
    assert lm1b["source"] == "hf:dvruette/lm1b" and lm1b["tokenizer_name"] == "bert-base-uncased"
    assert lm1b["seq_len"] == 128 and lm1b["packing"] is False and "validation_docs" not in lm1b
    text8 = configs["text8"]
    assert text8["tokenizer"] == "char" and text8["seq_len"] == 256 and text8["packing"] is True
    assert text8["split_chars"] == [90_000_000, 5_000_000, 5_000_000]


def test_owt_config_on_a_train_only_stand_in(tmp_path):
    from cdlm.data.token_cache import TokenMap, prepare_cache
    from cdlm.data.tokenizers import build_tokenizer

    source = save_dataset(tmp_path / "owt", {"train": DOCS})
    documents = open_corpus("owt", source=source, validation_docs=4)
    assert contents(documents) == {"train": DOCS[:6], "validation": DOCS[6:]}
    assert open_corpus("owt", source=source, validation_docs=4).fingerprint() == documents.fingerprint()
    cache = prepare_cache(documents, build_tokenizer("byte"), tmp_path / "cache", workers=1)
    for split, docs in contents(documents).items():
        mapped = TokenMap.open(cache, split)
        assert len(mapped.lengths) == len(docs) and int(mapped.chars.sum()) == sum(map(len, docs))


def test_lm1b_config_on_a_train_test_stand_in(tmp_path):
    sentences = [f"sentence number {i} ." for i in range(12)]
    source = save_dataset(tmp_path / "lm1b", {"train": sentences[:9], "test": sentences[9:]})
    documents = open_corpus("lm1b", source=source)
    assert contents(documents) == {"train": sentences[:9], "validation": sentences[9:], "test": sentences[9:]}


def test_text8_config_on_a_one_document_stand_in(tmp_path):
    path = tmp_path / "text8.txt"
    path.write_text(("anarchism originated as a term of abuse " * 5)[:200])
    documents = open_corpus("text8", source=str(path), split_chars=[180, 10, 10])
    text = path.read_text()
    assert contents(documents) == {"train": [text[:180]], "validation": [text[180:190]], "test": [text[190:]]}
    assert open_corpus("text8", source=str(path), split_chars=[170, 20, 10]).fingerprint() != documents.fingerprint()


def test_fineweb_edu_config_on_a_parquet_folder_stand_in(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "fineweb-edu"
    write_parquet(folder / "sample" / "10BT" / "000_00000.parquet", {"text": DOCS[:5], "score": [3.0] * 5})
    write_parquet(folder / "sample" / "10BT" / "001_00000.parquet", {"text": DOCS[5:], "score": [4.0] * 5})
    write_parquet(folder / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", {"text": ["other"], "score": [1.0]})
    (folder / "README.md").write_text(  # the hub dataset's configs, as its dataset card declares them
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*/*\n"
        "- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n---\n"
    )
    documents = open_corpus("fineweb_edu", source=f"hf:{folder}", validation_docs=3)
    assert contents(documents) == {"train": DOCS[:7], "validation": DOCS[7:]}
    assert open_corpus("fineweb_edu", source=f"hf:{folder}", validation_docs=3).fingerprint() == documents.fingerprint()
    other = open_corpus("fineweb_edu", source=f"hf:{folder}", hf_config="default", validation_docs=None)
    assert "".join(other.texts("train") + other.texts("validation")) == "other"  # one document: cut by text
    assert other.fingerprint() != documents.fingerprint()


def test_corpus_configs_build_a_datamodule_through_the_config_system(tmp_path):
    """The YAML keys are ``TextDataModule`` arguments: each config composes, builds and maps its stand-in."""
    from cdlm.config import compose, instantiate

    pytest.importorskip("datasets")
    owt = save_dataset(tmp_path / "owt", {"train": DOCS})
    lm1b = save_dataset(tmp_path / "lm1b", {"train": DOCS[:7], "test": DOCS[7:]})
    text8 = tmp_path / "text8.txt"
    text8.write_text("anarchism originated as a term of abuse " * 20)
    small = ["data.tokenizer=byte", "data.tokenizer_name=null", "data.seq_len=16", "data.batch_size=2"]
    stand_ins = {
        "owt": [f"data.source={owt}", "data.validation_docs=4"],
        "lm1b": [f"data.source={lm1b}"],
        "text8": [f"data.source={text8}", "data.split_chars=[600,100,100]", "data.tokenizer=char"],
        "fineweb_edu": [f"data.source={owt}", "data.hf_config=null", "data.validation_docs=3"],
    }
    for name, overrides in stand_ins.items():
        cfg = compose([f"data={name}", *small, *overrides, f"data.cache_dir={tmp_path / 'cache'}"])
        datamodule = instantiate(cfg.data, "data")
        datamodule.setup("fit")
        assert len(datamodule.dataset("train")) >= 2 and len(datamodule.dataset("validation")) >= 1, name

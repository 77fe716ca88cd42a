"""Streamed sources (``data.streaming=true``): rows equal the token cache's, ranks read disjoint documents, passes
repeat, the position resumes exactly, and what cannot stream is refused (cdlm/data/streaming.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cdlm.config import compose, instantiate
from cdlm.data.streaming import StreamedRows
from tests.runs import TINY, CrashAt, LossRecorder, fit

pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """Hugging Face offline, its datasets cache and cdlm's cache in ``tmp_path``."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CDLM_CACHE", str(tmp_path / "cdlm-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(["ab", "cde", "f", "ghij", "k"]) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def streamed(tmp_path: Path, n_train: int = 60, **data: object) -> list[str]:
    """Overrides of a streamed ``hf:json`` source of ``n_train`` train and 10 validation documents, byte tokenizer."""
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", documents(n_train)),
        "validation": write_jsonl(tmp_path / "val.jsonl", documents(10, seed=1)),
    }
    args = {"source": "hf:json", "data_files": files, "tokenizer": "byte", "streaming": True, **data}
    return [f"data.{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in args.items()]


def datamodule(*overrides: str):
    return instantiate(compose([*TINY, *overrides]).data, "data")


def rows(dataset, n: int) -> list[torch.Tensor]:
    stream = iter(dataset)
    return [next(stream)["input_ids"] for _ in range(n)]


def test_streamed_rows_equal_the_token_cache_rows(tmp_path):
    args = streamed(tmp_path)
    stream = datamodule(*args)
    cached = datamodule(*args[:-1], "data.streaming=false")
    cached_rows = cached.dataset("train")
    n = len(cached_rows) - 1  # the cache's last row is padded; the stream carries it into the next pass
    assert n >= 8
    got = rows(stream.dataset("train"), n)
    assert all(torch.equal(a, cached_rows[i]["input_ids"]) for i, a in enumerate(got))
    assert [int(cached.dataset("validation")[i]["n_chars"]) for i in range(3)] == [
        int(stream.dataset("validation")[i]["n_chars"]) for i in range(3)
    ]


def test_passes_repeat_and_document_rows_pad(tmp_path):
    dm = datamodule(*streamed(tmp_path, n_train=6), "data.packing=false", "data.seq_len=256")
    first = rows(dm.dataset("train"), 12)  # 6 documents, one row each: two passes
    assert all(torch.equal(a, b) for a, b in zip(first[:6], first[6:]))
    tok = dm.tokenizer
    for row, doc in zip(first, documents(6)):
        assert row.tolist()[: len(doc) + 1] == [*tok.encode(doc), tok.eos_id]
        assert set(row.tolist()[len(doc) + 1 :]) <= {tok.pad_id}


def test_two_ranks_read_disjoint_documents_that_make_up_the_stream(tmp_path):
    dm = datamodule(*streamed(tmp_path, n_train=10), "data.packing=false", "data.seq_len=256")
    tok = dm.tokenizer or dm.prepare_tokenizer()
    ranks = [rows(StreamedRows(dm.stream(), tok, 256, False, rank, 2), 5) for rank in (0, 1)]
    docs = [tok.decode(r.tolist()) for rank in ranks for r in rank]
    assert sorted(docs) == sorted(documents(10))
    assert not {tok.decode(r.tolist()) for r in ranks[0]} & {tok.decode(r.tolist()) for r in ranks[1]}


def test_held_out_head_of_the_train_stream(tmp_path):
    files = {"train": write_jsonl(tmp_path / "only.jsonl", documents(20))}
    base = ["data.source=hf:json", f"data.data_files={json.dumps(files)}", "data.tokenizer=byte"]
    with pytest.raises(ValueError, match="set validation_docs"):
        datamodule(*base, "data.streaming=true").dataset("validation")
    dm = datamodule(*base, "data.streaming=true", "data.validation_docs=4", "data.packing=false", "data.seq_len=256")
    tok = dm.prepare_tokenizer()
    val = [tok.decode(dm.dataset("validation")[i]["input_ids"].tolist()) for i in range(4)]
    train = [tok.decode(r.tolist()) for r in rows(dm.dataset("train"), 16)]
    assert val == documents(20)[:4] and train == documents(20)[4:]


def test_resume_on_a_stream_is_exact(tmp_path):
    args = [*streamed(tmp_path), "trainer.max_steps=10", "checkpoint.every_n_train_steps=4", "data.seq_len=64"]
    full = LossRecorder()
    fit(tmp_path / "full", *args, callbacks=(full,))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "killed", *args, callbacks=(CrashAt(7),))
    resumed = LossRecorder()
    fit(tmp_path / "killed", *args, "resume=auto", callbacks=(resumed,))
    assert sorted(resumed.losses) == list(range(5, 11))
    assert resumed.losses == {s: full.losses[s] for s in resumed.losses}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.source=shakespeare", "data.streaming=true"], "is a local source"),
        (["data.streaming=true", "data.source=hf:json", "data.tokenizer=char"], "not trained on the corpus"),
        (["data.streaming=true", "data.source=hf:json", "data.tokenizer=byte", "data.num_workers=2"], "num_workers"),
    ],
)
def test_what_cannot_stream_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        datamodule(*overrides)


def test_prepare_on_a_stream_is_refused(tmp_path, capsys):
    from cdlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", *TINY, *streamed(tmp_path)])
    assert exit_info.value.code == 2
    assert "has no token cache" in capsys.readouterr().err


def test_ddp_ranks_stream_disjoint_rows(tmp_path):
    from tests.test_resume import ROWS_DRIVER, train_ddp

    driver = tmp_path / "rows.py"
    driver.write_text(ROWS_DRIVER)
    args = [*streamed(tmp_path, n_train=40), "data.packing=false", "data.seq_len=256", "trainer.max_steps=4"]
    train_ddp(driver, tmp_path / "ddp", args)
    ranks = [json.loads((tmp_path / "ddp" / f"rows_{r}.json").read_text()) for r in (0, 1)]
    seen = [[h for _, rows in rank for h in rows] for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 16  # 4 steps of 4 rows (one document each) per rank
    assert not set(seen[0]) & set(seen[1])

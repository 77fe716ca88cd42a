"""Zero-shot likelihood (cdlm/zero_shot.py): local corpora scored with the model's tokenizer, length and noise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import cdlm
import cdlm.evaluate
from cdlm.data.corpus import load_corpus
from cdlm.data.sources import SourceError
from cdlm.eval_report import summary
from cdlm.evaluate import evaluate, validation_bound
from cdlm.zero_shot import ZERO_SHOT, Corpus, pick_split, resolve, zero_shot_bound, zero_shot_table

ESSAY = (
    "The sea was calm that night, and the ship moved slowly past the harbour lights.\n"
    "Nobody on deck spoke; the captain watched the water, counting the buoys as they passed.\n\n"
    "Later, in the cabin, the letters were read aloud again, one by one, until the candle failed.\n"
)
NEWS = [
    "Markets rose on Tuesday after the central bank held rates steady.",
    "A new bridge opened downtown, cutting the commute by twenty minutes.",
    "   ",  # whitespace only: dropped, as in training sources
    "Scientists reported a comet visible to the naked eye next week.",
]
SAMPLER = {"name": "ancestral", "steps": 4}


@pytest.fixture(scope="module")
def model(tiny_run):
    """The tiny masked run's saved model (EMA weights), loaded as a user would."""
    run_dir, _ = tiny_run
    return cdlm.load(run_dir / "final")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    """A one-document ``.txt`` corpus and a ``.jsonl`` corpus of several documents."""
    folder = tmp_path_factory.mktemp("zero_shot")
    txt, jsonl = folder / "essay.txt", folder / "news.jsonl"
    txt.write_text(ESSAY, encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in NEWS), encoding="utf-8")
    return txt, jsonl


def expected_tokens(model, docs: list[str]) -> int:
    """Tokens of ``docs`` tokenised directly with the model's tokenizer, EOS after each."""
    return sum(len(model.tokenizer.encode(doc)) + 1 for doc in docs if doc.strip())


def test_bound_is_finite_positive_and_bits_per_char_is_exact(model, corpora):
    for path in corpora:
        row = zero_shot_bound(model, str(path))
        assert math.isfinite(row["nll"]) and row["nll"] > 0
        assert row["ppl"] == pytest.approx(math.exp(row["nll"]), rel=1e-12)
        assert row["bpc"] == pytest.approx(row["nll"] * row["tokens"] / (row["chars"] * math.log(2)), rel=1e-12)
        assert row["corpus"] == row["source"] == str(path) and row["split"] == "all"
        assert row["seq_len"] == model.config["data"]["seq_len"] and row["packing"] is True


def test_every_token_of_the_text_is_scored_once(model, corpora):
    """All of a local file is scored (no held-out split): the direct tokenisation plus one EOS per document."""
    txt, jsonl = corpora
    essay, news = zero_shot_bound(model, str(txt)), zero_shot_bound(model, str(jsonl))
    assert essay["tokens"] == expected_tokens(model, [ESSAY])
    assert news["tokens"] == expected_tokens(model, NEWS)
    # a character tokenizer: every token but EOS is one character of the text
    assert essay["chars"] == len(ESSAY) and news["chars"] == sum(len(d) for d in NEWS if d.strip())
    assert essay["tokens"] > 2 * model.config["data"]["seq_len"]  # several blocks, the last one padded


def test_the_same_corpus_scores_the_same_number_twice(model, corpora):
    txt, _ = corpora
    first, second = zero_shot_bound(model, str(txt)), zero_shot_bound(model, str(txt))  # second: from the cache
    assert first == second


def test_the_run_validation_text_scores_as_the_validation_bound(model, tmp_path):
    """The protocol is the validation split's: its text as a zero-shot corpus gives the validation bound exactly."""
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in load_corpus("validation")), encoding="utf-8")
    cap = model.config["data"]["max_val_tokens"]
    row = zero_shot_bound(model, str(path), max_tokens=cap)
    assert row["nll"] == validation_bound(model)["val_nll"]


def test_max_tokens_scores_the_first_rows(model, corpora):
    txt, _ = corpora
    seq_len = model.config["data"]["seq_len"]
    row = zero_shot_bound(model, str(txt), max_tokens=40)
    assert 40 <= row["tokens"] < 40 + seq_len and row["max_tokens"] == 40


def test_a_saved_hf_dataset_scores_its_test_split(model, tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {"train": ["never scored"], "validation": ["not this one"], "test": ["the test text.", "and more"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in splits.items()}).save_to_disk(
        tmp_path / "saved"
    )
    row = zero_shot_bound(model, Corpus(f"hf:{tmp_path / 'saved'}", text_field="body"))
    assert row["split"] == "test" and row["tokens"] == expected_tokens(model, splits["test"])
    pinned = zero_shot_bound(model, Corpus(f"hf:{tmp_path / 'saved'}", "body", split="validation"))
    assert pinned["split"] == "validation" and pinned["tokens"] == expected_tokens(model, splits["validation"])


def test_a_hub_dataset_loads_only_the_scored_split(model, monkeypatch):
    """``hf:<name>:<config>`` asks the hub for its split names, then loads the scored split alone (faked here)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"{split} text of {name}/{config}", None]})

    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config: ["train", "validation", "test"])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    row = zero_shot_bound(model, "hf:fake-corpus:v1")
    assert calls == [("fake-corpus", "v1", "test")] and row["split"] == "test"
    assert row["tokens"] == expected_tokens(model, ["test text of fake-corpus/v1"])


def test_split_rule_and_names():
    assert pick_split(["train", "validation", "test"], None, "x") == "test"
    assert pick_split(["train", "validation"], None, "x") == "validation"
    assert pick_split(["test"], None, "x") == "test"
    with pytest.raises(SourceError, match="has no split 'test or validation'"):
        pick_split(["train", "other"], None, "x")
    assert set(ZERO_SHOT) == {"wikitext2", "wikitext103", "ptb", "lambada", "ag_news", "pubmed", "arxiv"}
    assert all(c.source.startswith("hf:") and c.split for c in ZERO_SHOT.values())
    assert resolve("wikitext2") is ZERO_SHOT["wikitext2"]  # resolving reads nothing (no network)


def test_a_missing_corpus_is_refused_before_any_work(model, monkeypatch, tmp_path):
    with pytest.raises(SourceError, match="no-such.txt"):
        resolve(str(tmp_path / "no-such.txt"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the validation bound ran before the zero-shot corpora were checked")

    monkeypatch.setattr(cdlm.evaluate, "validation_bound", must_not_run)
    with pytest.raises(SourceError, match="no-such.txt"):
        evaluate(model, None, SAMPLER, n=1, seeds=1, zero_shot=[str(tmp_path / "no-such.txt")])


def test_eval_reports_one_row_per_corpus(model, corpora):
    specs = [str(p) for p in corpora]
    result = evaluate(model, None, SAMPLER, n=1, length=8, seeds=1, val_batches=1, reference=False, zero_shot=specs)
    assert [row["corpus"] for row in result["zero_shot"]] == specs
    assert result["zero_shot"] == zero_shot_table(model, specs)
    assert "zero_shot" in result["protocol"]
    json.dumps(result)  # JSON-ready
    lines = [line for line in summary(result).splitlines() if line.startswith("zero-shot")]
    assert len(lines) == 2 and "essay.txt (all)" in lines[0] and "bits/char" in lines[1]
    assert "zero_shot" not in evaluate(model, None, SAMPLER, n=1, length=8, seeds=1, val_batches=1, reference=False)

"""The unigram reference of the evaluation protocol (docs/math.md §8): exact probabilities and NLL of the add-alpha
model, its draws, its bound on a run's validation tokens in ``cdlm eval``, ``scripts/bound_table.py`` and a sweep's
tables."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdlm.eval_report import summary
from cdlm.evaluate import (
    evaluate,
    generative_scores,
    run_datamodule,
    train_unigram,
    unigram_texts,
    unigram_validation_bound,
)
from cdlm.metrics import UnigramModel, unigram_bound
from cdlm.metrics.unigram import count_tokens

SAMPLER = {"name": "ancestral", "steps": 4}
ROOT = Path(__file__).resolve().parents[1]


def test_add_half_probabilities_and_nll_by_hand():
    model = UnigramModel.fit(torch.tensor([0, 1, 0, 0]), vocab_size=3, alpha=0.5)  # counts [3, 1, 0]
    expected = torch.tensor([3.5, 1.5, 0.5], dtype=torch.float64) / 5.5
    assert torch.allclose(model.probs, expected, rtol=0, atol=1e-15) and model.probs.dtype == torch.float64
    assert model.train_tokens == 4 and model.vocab_size == 3
    nll = model.nll(torch.tensor([[0, 2], [1, 0]]))  # [2, 2]
    by_hand = [[-math.log(3.5 / 5.5), -math.log(0.5 / 5.5)], [-math.log(1.5 / 5.5), -math.log(3.5 / 5.5)]]
    assert nll.dtype == torch.float64 and nll.shape == (2, 2)
    assert torch.allclose(nll, torch.tensor(by_hand, dtype=torch.float64), rtol=0, atol=1e-14)


def test_counting_in_chunks_equals_one_bincount():
    tokens = np.random.default_rng(0).integers(0, 7, size=1001).astype(np.uint16)
    assert torch.equal(count_tokens(tokens, 9, chunk=64), torch.from_numpy(np.bincount(tokens, minlength=9)).double())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        count_tokens(np.array([0, 5]), 5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        UnigramModel.fit(np.array([0]), 2, alpha=0.0)


def test_draws_have_the_fitted_frequencies_and_repeat_with_the_seed():
    model = UnigramModel(torch.tensor([500.0, 300.0, 150.0, 49.5, 0.0]), alpha=0.5)  # probs 0.5, 0.3, .15, .05, 5e-4
    ids = model.sample(40, 500, torch.Generator().manual_seed(0))
    assert ids.shape == (40, 500) and ids.dtype == torch.int64
    assert torch.equal(ids, model.sample(40, 500, torch.Generator().manual_seed(0)))
    observed = torch.bincount(ids.flatten(), minlength=5).double()  # [5]
    expected = model.probs * ids.numel()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (observed, expected)  # 4 degrees of freedom: P(chi2 > 25) < 1e-4


def test_bound_scores_only_the_masked_tokens_with_their_characters():
    model = UnigramModel(torch.tensor([3.0, 1.0, 0.0]), alpha=0.5)
    batch = {
        "input_ids": torch.tensor([[0, 1, 99], [2, 0, 0]]),  # 99: a padding id outside the vocabulary
        "attention_mask": torch.tensor([[True, True, False], [True, True, True]]),
        "n_chars": torch.tensor([3, 4]),
    }
    nll = -sum(math.log(p / 5.5) for p in (3.5, 1.5, 0.5, 3.5, 3.5))
    scores = unigram_bound(model, [batch, batch], max_batches=1)
    assert scores["val_tokens"] == 5
    assert scores["val_nll"] == pytest.approx(nll / 5, rel=1e-12)
    assert scores["val_bpc"] == pytest.approx(nll / (math.log(2) * 7), rel=1e-12)


def validation_tokens(module, max_batches: int | None = None, **data) -> tuple[torch.Tensor, int]:
    """The real tokens ``[T]`` and characters of the validation batches a bound scores."""
    ids, chars = [], 0
    for i, batch in enumerate(run_datamodule(module, **data).val_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        ids.append(batch["input_ids"][batch["attention_mask"].bool()])
        chars += int(batch["n_chars"].sum())
    return torch.cat(ids), chars


def test_run_unigram_is_fitted_on_the_train_stream_and_scored_on_the_bound_tokens(tiny_run):
    _, module = tiny_run
    unigram = train_unigram(module)
    stream = run_datamodule(module).dataset("train").tokens[:].astype(np.int64)
    counts = np.bincount(stream, minlength=module.tokenizer.vocab_size)
    assert unigram.vocab_size == module.tokenizer.vocab_size and unigram.train_tokens == len(stream)
    assert torch.allclose(unigram.probs, torch.from_numpy((counts + 0.5) / (counts.sum() + 0.5 * len(counts))))
    assert train_unigram(module) is unigram  # fitted once per process
    scores = unigram_validation_bound(module, unigram, max_batches=2)
    ids, chars = validation_tokens(module, max_batches=2)
    nll = float(unigram.nll(ids).sum())
    assert scores["val_tokens"] == ids.numel() and scores["alpha"] == 0.5
    assert scores["val_nll"] == pytest.approx(nll / ids.numel(), rel=1e-12)
    assert scores["val_bpc"] == pytest.approx(nll / (math.log(2) * chars), rel=1e-12)


class LengthJudge:
    """A tiny judge: a text of c characters costs 0.5 + 0.1 c nats over c + 1 tokens."""

    name, eos_rule, tokenizer_name = "length-judge", "none", "characters"

    def score(self, texts: list[str]) -> list[tuple[float, int]]:
        return [(0.5 + 0.1 * len(t), len(t) + 1) for t in texts]


def test_evaluate_reports_the_unigram_bound_and_the_unigram_draws_row(tiny_run, monkeypatch):
    _, module = tiny_run
    monkeypatch.setattr("cdlm.evaluate.build_judge", lambda spec, device: LengthJudge())
    result = evaluate(module, "length-judge", SAMPLER, n=2, length=8, seeds=1, val_batches=1)
    assert result["unigram"] == unigram_validation_bound(module, train_unigram(module), max_batches=1)
    assert result["unigram"]["val_tokens"] == validation_tokens(module, max_batches=1)[0].numel()
    expected = generative_scores(LengthJudge(), *unigram_texts(module, train_unigram(module), 2, 8))
    assert result["unigram_draws"] == expected and set(expected) >= {"gen_ppl", "entropy", "distinct_1"}
    assert result["reference"] and "independent unigram draws" in result["protocol"]["unigram_draws"]
    text = summary(result)
    assert "unigram draws, judge length-judge: Gen PPL" in text
    assert "reference (real validation text), judge length-judge: Gen PPL" in text
    gap = result["metrics"]["val_nll"] - result["unigram"]["val_nll"]
    assert f"unigram (train split, add-0.5): {result['unigram']['val_bpc']:.4f} bits/char" in text
    assert f"model - unigram: {gap:+.4f} nats/token" in text
    json.dumps(result)  # JSON-ready
    no_bound = evaluate(module, None, SAMPLER, n=1, length=8, seeds=1, val_batches=0)
    assert no_bound["unigram"] == {} and no_bound["unigram_draws"] == {}


def test_bound_table_has_a_unigram_row_and_the_gap_to_it(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir, module = tiny_run
    spec = importlib.util.spec_from_file_location("bound_table", ROOT / "scripts" / "bound_table.py")
    bound_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound_table)
    out = tmp_path / "table"
    argv = ["bound_table.py", str(run_dir / "final"), "--chars", "300", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bound_table.main()
    capsys.readouterr()
    model, unigram = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert unigram["path"] == f"unigram (train split, char {module.tokenizer.vocab_size})"
    assert unigram["objective"] == "Unigram" and unigram["val_tokens"] == model["val_tokens"]
    assert unigram["val_nll"] == model["unigram_nll"] and unigram["val_bpc"] == model["unigram_bpc"]
    assert model["vs_unigram"] == pytest.approx(model["val_nll"] - unigram["val_nll"], rel=1e-12)
    ids, _ = validation_tokens(module, max_val_tokens=model["val_tokens"])
    assert unigram["val_nll"] == pytest.approx(float(train_unigram(module).nll(ids).mean()), rel=1e-12)
    markdown = out.with_suffix(".md").read_text()
    assert "| vs unigram (nats/token) |" in markdown
    assert f"| {model['val_nll']:.3f} | {model['vs_unigram']:+.3f} |" in markdown
    assert f"| {unigram['path']} | Unigram | char ({module.tokenizer.vocab_size}) | — | — |" in markdown


def test_sweep_tables_carry_the_unigram_rows(tmp_path):
    import yaml

    from cdlm.sweep import run_sweep

    def fake_eval(command: str, args: list[str]) -> None:
        opts = dict(a.split("=", 1) for a in args)
        steps = float(opts["sampler.steps"])
        result = {
            "metrics": {"nfe": steps, "val_bpc": 2.5, "gen_ppl_mean": 100 / steps, "entropy_mean": 4.0},
            "unigram": {"val_bpc": 3.25, "val_nll": 2.2, "val_tokens": 100, "alpha": 0.5},
            "reference": {"gen_ppl": 40.5, "entropy": 4.49},
            "unigram_draws": {"gen_ppl": 900.0, "entropy": 4.75},
        }
        Path(opts["out"]).write_text(json.dumps(result))

    sweep = {
        "command": "eval",
        "base": ["path=runs/x/final"],
        "grid": {"sampler.steps": [4, 8]},
        "columns": ["sampler.steps", "nfe", "val_bpc", "gen_ppl_mean", "entropy_mean"],
        "plot": {"x": "nfe", "y": "gen_ppl_mean"},
        "out": str(tmp_path / "sweep"),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    rows = run_sweep(tmp_path / "sweep.yaml", runner=fake_eval)
    assert rows[0]["unigram_draws.gen_ppl"] == 900.0 and rows[0]["unigram.val_bpc"] == 3.25
    markdown = (tmp_path / "sweep" / "results.md").read_text()
    assert "| reference |  |  | 40.500 | 4.490 |" in markdown
    assert "| unigram draws |  |  | 900 | 4.750 |" in markdown
    assert "| unigram (train split) |  | 3.250 |  |  |" in markdown
    default = dict(sweep, columns=None)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(default))
    run_sweep(tmp_path / "sweep.yaml", runner=fake_eval)
    header = (tmp_path / "sweep" / "results.md").read_text().splitlines()[2]
    assert "unigram" not in header and "reference" not in header


def test_bound_table_keeps_one_row_per_evaluation_setting(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = tiny_run
    spec = importlib.util.spec_from_file_location("bound_table", ROOT / "scripts" / "bound_table.py")
    bound_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound_table)
    out, path = tmp_path / "table", str(run_dir / "final")
    for extra in ([], ["--objective", "t_min=0.2", "--merge"], ["--objective", "t_min=0.2", "--merge"]):
        monkeypatch.setattr(sys, "argv", ["bound_table.py", path, "--chars", "300", "--out", str(out), *extra])
        bound_table.main()
    capsys.readouterr()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    models = [r for r in rows if r["objective"] != "Unigram"]
    assert [r["settings"] for r in models] == [{}, {"t_min": 0.2}]  # the rerun replaced its own row only
    assert f"| {run_dir.name} (t_min=0.2) |" in out.with_suffix(".md").read_text()
    monkeypatch.setattr(sys, "argv", ["bound_table.py", path, "--out", str(out), "--objective", "schedule=1"])
    with pytest.raises(ValueError, match="numeric attribute"):
        bound_table.main()


def test_bound_table_unigram_row_for_a_data_config_without_a_run(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir, module = tiny_run
    spec = importlib.util.spec_from_file_location("bound_table", ROOT / "scripts" / "bound_table.py")
    bound_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound_table)
    data = {k: v for k, v in module.config["data"].items() if k != "_target_" and not isinstance(v, (list, dict))}
    overrides = " ".join(f"data.{k}={'null' if v is None else v}" for k, v in data.items())
    scored, alone = tmp_path / "scored", tmp_path / "alone"
    for out, args in ((scored, [str(run_dir / "final")]), (alone, ["--unigram-data", overrides])):
        monkeypatch.setattr(sys, "argv", ["bound_table.py", *args, "--chars", "300", "--out", str(out)])
        bound_table.main()
    capsys.readouterr()
    by_run = json.loads(scored.with_suffix(".json").read_text())["rows"][-1]
    (by_data,) = json.loads(alone.with_suffix(".json").read_text())["rows"]
    assert by_data["objective"] == "Unigram" and by_data["path"] == by_run["path"]
    assert by_data["val_tokens"] == by_run["val_tokens"] and by_data["val_nll"] == by_run["val_nll"]
    old = {**json.loads(scored.with_suffix(".json").read_text())["rows"][0], "vs_unigram": None}  # scored before
    assert bound_table.table_rows([old, by_data])[0]["vs_unigram"] == pytest.approx(old["val_nll"] - by_data["val_nll"])

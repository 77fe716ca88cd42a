"""Infilling accuracy (cdlm/infill_eval.py, ``cdlm eval infill_span=K``): the samples fill the middle span of
validation windows and keep every other token; the accuracy counts the span only; the unigram row is the exact
expected accuracy of unigram draws; the span bound is the objective's conditional bound of the span."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.evaluate import evaluate, reference_texts, train_unigram
from cdlm.infill_eval import span_accuracy, span_canvas, unigram_accuracy, unigram_nll
from cdlm.metrics.unigram import UnigramModel

SAMPLER = {"name": "ancestral", "steps": 4}


def test_the_canvas_frees_the_middle_span_and_the_accuracy_counts_it_only():
    windows = torch.arange(20).view(2, 10)
    canvas = span_canvas(windows, 4)
    assert canvas.fixed[0].tolist() == [True] * 3 + [False] * 4 + [True] * 3
    filled = windows.clone()
    filled[:, 3] = 99  # one wrong token of four per row in the span
    filled[:, 0] = 99  # outside the span: not counted
    assert span_accuracy(filled, canvas) == 0.75
    with pytest.raises(ValueError, match=r"\[1, 9\]"):
        span_canvas(windows, 10)
    unigram = UnigramModel(torch.tensor([3.0, 1.0, 0.0, 0.0]), alpha=0.5)  # probs 3.5/6, 1.5/6, 0.5/6, 0.5/6
    tokens = span_canvas(torch.tensor([[0, 0, 1, 0, 0]]), 1)  # the span holds token 1
    assert unigram_accuracy(unigram, tokens) == pytest.approx(1.5 / 6)
    assert unigram_nll(unigram, tokens) == pytest.approx(-math.log(1.5 / 6))


def test_eval_fills_the_span_keeps_the_rest_and_reports_accuracy_and_the_span_bound(tiny_run, monkeypatch):
    _, module = tiny_run
    calls = []
    generate = module.generate

    def recorded(*args, **kwargs):
        ids, texts = generate(*args, **kwargs)
        calls.append(ids)
        return ids, texts

    monkeypatch.setattr(module, "generate", recorded)
    result = evaluate(module, None, SAMPLER, n=3, length=24, seeds=2, val_batches=0, infill_span=8)
    windows = reference_texts(module, 3, 24)[1]
    canvas = span_canvas(windows, 8)
    assert len(calls) == 2
    for ids in calls:  # everything outside the span is the window's
        assert torch.equal(ids[canvas.fixed], windows[canvas.fixed])
    accuracies = [row["infill_accuracy"] for row in result["per_seed"]]
    assert accuracies == [span_accuracy(ids, canvas) for ids in calls]
    assert result["metrics"]["infill_accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
    fill = result["infill"]
    assert fill["span"] == 8 and 0 < fill["unigram_accuracy"] < 1
    unigram = train_unigram(module)
    expected = -unigram.log_probs[canvas.ids[~canvas.fixed]].mean()
    assert fill["unigram_span_nll"] == pytest.approx(float(expected))
    assert result["metrics"]["infill_unigram_span_nll"] == fill["unigram_span_nll"]
    assert fill["span_nll"] is not None and 0 < fill["span_nll"] < 2 * torch.log(torch.tensor(4096.0))


def test_cli_refuses_a_span_that_fills_the_length_and_two_protocols_at_once(tiny_run, capsys):
    from tests.runs import refused

    run_dir, _ = tiny_run
    final = f"path={run_dir / 'final'}"
    assert "infill_span=4096 must lie in [1, length - 1]" in refused(["eval", final, "infill_span=4096"], capsys)
    err = refused(["eval", final, "infill_span=8", "prompts=val"], capsys)
    assert "infill_span and prompts=val are two protocols" in err

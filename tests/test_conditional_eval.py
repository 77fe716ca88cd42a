"""The conditional evaluation protocol (cdlm/conditional_eval.py, ``cdlm eval prompts=val``): samples continue
validation prompts that they keep exactly, and the judge scores every continuation given its own prompt, for the
samples, the true continuations and unigram draws alike."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.conditional_eval import conditional_scores, split_windows
from cdlm.evaluate import evaluate, reference_texts

SAMPLER = {"name": "ancestral", "steps": 4}


class RecordingJudge:
    """Scores a continuation by its length (0.25 nats per character, one token per character) and records every
    (prompt, continuation) pair it was given."""

    name, eos_rule, tokenizer_name = "recording-judge", "none", "characters"

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def score(self, texts: list[str]) -> list[tuple[float, int]]:
        raise AssertionError("the conditional protocol scores continuations given their prompts")

    def score_given(self, prompts: list[str], texts: list[str]) -> list[tuple[float, int]]:
        self.pairs.extend(zip(prompts, texts))
        return [(0.25 * len(t), len(t)) for t in texts]

    def features(self, texts: list[str]) -> torch.Tensor:
        """Letter counts: a feature that tells text from other text."""
        return torch.tensor([[t.count(c) for c in "etaoin hsr"] for t in texts], dtype=torch.float32)


def test_split_windows_and_the_scores_of_one_set():
    windows = torch.arange(12).view(2, 6)
    prompts, rest = split_windows(windows, 2)
    assert prompts.tolist() == [[0, 1], [6, 7]] and rest.tolist() == [[2, 3, 4, 5], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        split_windows(windows, 6)

    class Chars:
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(97 + i) for i in ids)

    judge = RecordingJudge()
    scores = conditional_scores(judge, Chars(), prompts, rest)
    assert judge.pairs == [("ab", "cdef"), ("gh", "ijkl")]
    assert scores["gen_ppl"] == pytest.approx(math.exp(0.25)) and scores["judge_tokens"] == 8
    assert scores["entropy"] == pytest.approx(math.log(4)) and scores["distinct_1"] == 1.0


def test_eval_with_validation_prompts_keeps_them_and_judges_continuations_given_them(tiny_run, monkeypatch):
    _, module = tiny_run
    judge = RecordingJudge()
    monkeypatch.setattr("cdlm.evaluate.build_judge", lambda spec, device: judge)
    calls = []
    generate = module.generate

    def recorded(*args, **kwargs):
        ids, texts = generate(*args, **kwargs)
        calls.append((kwargs["prompt"], ids))
        return ids, texts

    monkeypatch.setattr(module, "generate", recorded)
    result = evaluate(
        module, "recording-judge", SAMPLER, n=3, length=20, seeds=2, val_batches=0, prompts="val", prompt_tokens=8
    )
    windows = reference_texts(module, 3, 20)[1]
    prompts = [module.tokenizer.decode(row[:8].tolist()) for row in windows]
    assert len(calls) == 2  # one sampler call per seed, every sample prompted by its window's first 8 tokens
    for prompt, ids in calls:
        assert torch.equal(prompt.ids[:, :8], windows[:, :8]) and torch.equal(ids[:, :8], windows[:, :8])
        assert prompt.fixed[:, :8].all() and not prompt.fixed[:, 8:].any()  # draw hands generate the canvas
    samples = [module.tokenizer.decode(row[8:].tolist()) for row in calls[0][1]]
    truth = [module.tokenizer.decode(row[8:].tolist()) for row in windows]
    assert judge.pairs[:3] == list(zip(prompts, samples))  # seed 0's continuations, each given its prompt
    assert judge.pairs[6:9] == list(zip(prompts, truth))  # the reference row: the true continuations
    assert [p for p, _ in judge.pairs[9:12]] == prompts  # the unigram row continues the same prompts
    assert result["reference"]["gen_ppl"] == pytest.approx(math.exp(0.25))
    assert "first 8 tokens" in result["protocol"]["conditional"] and result["metrics"]["gen_ppl_mean"] > 0


def test_cli_refuses_an_unknown_prompt_source_and_prompts_that_fill_the_length(tiny_run, capsys):
    from tests.runs import refused

    run_dir, _ = tiny_run
    final = f"path={run_dir / 'final'}"
    assert "prompts='wiki' is not a prompt source; valid: val" in refused(["eval", final, "prompts=wiki"], capsys)
    err = refused(["eval", final, "prompts=val", "length=16", "prompt_tokens=16"], capsys)
    assert "prompt_tokens=16 leaves nothing to generate in length=16" in err
    err = refused(["eval", final, "prompts=val", "prompt_tokens=4096"], capsys)  # the run's seq_len is shorter
    assert "prompt_tokens=4096 must lie in [1, length - 1]" in err


def test_mauve_row_compares_continuations_with_the_true_ones(tiny_run, monkeypatch, capsys):
    from tests.runs import refused

    run_dir, module = tiny_run
    monkeypatch.setattr("cdlm.evaluate.build_judge", lambda spec, device: RecordingJudge())
    result = evaluate(
        module,
        "recording-judge",
        SAMPLER,
        n=12,
        length=24,
        seeds=1,
        val_batches=0,
        prompts="val",
        prompt_tokens=4,
        mauve=True,
    )
    assert 0 < result["per_seed"][0]["mauve"] <= 1 and 0 < result["unigram_draws"]["mauve"] <= 1
    assert "mauve_mean" in result["metrics"] and "MAUVE" in result["protocol"]["conditional"]
    err = refused(["eval", f"path={run_dir / 'final'}", "mauve=true"], capsys)
    assert "mauve=true compares continuations: give prompts=val and a judge" in err

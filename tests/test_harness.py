"""The lm-evaluation-harness adapter (cdlm/harness.py, docs/evaluation.md "lm-evaluation-harness"): a local task of
each request type runs end to end through lm-eval, offline, on files the test writes; the adapter's numbers are the
objective's bounds."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from cdlm.harness import CdlmLM  # noqa: E402

DOCS = [
    {"context": "KING HENRY", "choices": [" the", " xqz"], "gold": 0, "answer": " the"},
    {"context": "ROMEO", "choices": [" and", " zzq"], "gold": 0, "answer": " and"},
]


def write_tasks(folder, data) -> None:
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'doc_to_text: "{{context}}"\n'
    )
    (folder / "choice.yaml").write_text(
        "task: cdlm_toy_choice\n" + common + "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n'
    )
    (folder / "gen.yaml").write_text(
        "task: cdlm_toy_gen\n" + common + "output_type: generate_until\n"
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "rolling.yaml").write_text(
        "task: cdlm_toy_rolling\n"
        + common.replace('doc_to_text: "{{context}}"\n', "")
        + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{context}}{{answer}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )


def test_lm_eval_runs_local_tasks_of_every_request_type(tiny_run, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir, _ = tiny_run
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, data)
    names = ["cdlm_toy_choice", "cdlm_toy_gen", "cdlm_toy_rolling"]
    results = simple_evaluate(
        model="cdlm",
        model_args=f"path={run_dir / 'final'},mc_samples=4,steps=4",
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks)),
    )["results"]
    assert 0.0 <= results["cdlm_toy_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["cdlm_toy_gen"]["exact_match,none"] <= 1.0
    assert results["cdlm_toy_rolling"]["word_perplexity,none"] > 1.0


class Request:
    def __init__(self, *args) -> None:
        self.args = args


@torch.no_grad()
def test_loglikelihood_is_minus_the_conditional_bound_and_the_prompt_is_not_charged(tiny_run):
    run_dir, module = tiny_run
    lm = CdlmLM(str(run_dir / "final"), mc_samples=64)
    [(given, _)] = lm.loglikelihood([Request("KING HENRY", " the")])
    [(alone, _)] = lm.loglikelihood([Request("", "KING HENRY the")])
    [rolling] = lm.loglikelihood_rolling([Request("KING HENRY the")])
    assert given < 0 and alone < given  # the continuation alone costs less than the context and it together
    assert rolling == pytest.approx(alone)  # one window, no context: the same bound and draws
    ids = torch.tensor([lm.encode("KING HENRY the")])
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    fixed[:, : len(lm.encode("KING HENRY"))] = True
    n = 64
    batch = {
        "input_ids": ids.expand(n, -1),
        "attention_mask": torch.ones(n, ids.shape[1], dtype=torch.bool),
        "u": (torch.arange(n, dtype=torch.float64) + 0.5) / n,
    }
    torch.manual_seed(lm.seed)
    direct = module.objective.eval().conditional_nll(batch, fixed.expand(n, -1)).nll.double().sum(1).mean()
    assert given == pytest.approx(-float(direct), rel=1e-4)


def test_generation_keeps_to_its_budget_and_stops_at_until(tiny_run):
    run_dir, _ = tiny_run
    lm = CdlmLM(str(run_dir / "final"), steps=4)
    out = lm.generate_until([Request("ROMEO", {"until": ["e"], "max_gen_toks": 10}), Request("", {"max_gen_toks": 5})])
    assert "e" not in out[0] and len(lm.encode(out[0])) <= 10 and len(lm.encode(out[1])) <= 5
    with pytest.raises(ValueError, match="mc_samples must be >= 1"):
        CdlmLM(str(run_dir / "final"), mc_samples=0)

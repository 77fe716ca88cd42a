"""Prompts (cdlm/prompts.py, docs/sampling.md "Prompts"): every sampler of every objective keeps a prompt's tokens
exactly, for ragged prompts in one batch and with remasking; masked and autoregressive samplers with an exact model
draw the law conditioned on the prompt; continuous samplers clamp the fixed positions' estimates."""

from __future__ import annotations

import math

import pytest
import torch

from cdlm.module import DiffusionLM
from cdlm.prompts import Prompt, canvas_prompt, parse_template, prefix_prompt, suffix_pieces
from cdlm.samplers import SAMPLERS
from cdlm.sampling import draw
from tests.exact import LAWS, install_oracle
from tests.test_exact_samplers import CASES, PAIRS, build

PREFIXES = [[], [3], [1, 2], [5, 6, 7]]  # ragged: 0 to 3 fixed tokens of 4
INFILLS = [[1, [4], 1, [6]], [[2], 2, [7]]]  # infilling canvases: _ 4 _ 6 and 2 _ _ 7
FEW_STEPS = {"discrete": 16, "continuous": 8, "autoregressive": 1}


def generate(objective, case: str, n: int, prompt, seed: int = 0, steps: int | None = None) -> torch.Tensor:
    name, many, knobs = CASES[case]
    spec = SAMPLERS[name]
    steps = steps or min(many, FEW_STEPS[spec.space])
    ids, _ = DiffusionLM(objective).generate(n, 4, name, steps, seed=seed, dtype=None, prompt=prompt, **knobs)
    return ids


@pytest.mark.parametrize(("objective_path", "case"), PAIRS, ids=[f"{p.rpartition('.')[2]}-{c}" for p, c in PAIRS])
def test_every_sampler_keeps_a_ragged_prompt(objective_path: str, case: str) -> None:
    objective = build(objective_path)
    install_oracle(objective, LAWS["correlated"]())
    latent = hasattr(objective, "state_shape") and objective.state_shape(8, 4)[1] != 4  # L / r positions
    blockwise = getattr(objective, "blockwise", False)  # a block-causal prior: a prefix as its first clean blocks
    if latent and not blockwise:
        with pytest.raises(ValueError, match="cannot keep a prompt .a latent prior takes a prefix"):
            generate(objective, case, 8, PREFIXES * 2)
        return
    ids = generate(objective, case, 8, PREFIXES * 2)
    assert ids.shape == (8, 4)
    for row, prefix in enumerate(PREFIXES * 2):
        assert ids[row, : len(prefix)].tolist() == prefix, (row, ids[row].tolist())
    infill = canvas_prompt(INFILLS * 4, 8, 4)  # kept tokens between and after free spans
    if blockwise:
        with pytest.raises(ValueError, match="a latent prior keeps a prefix prompt only"):
            generate(objective, case, 8, infill)
        return
    ids = generate(objective, case, 8, infill)
    assert torch.equal(ids[infill.fixed], infill.ids[infill.fixed]), ids.tolist()


def test_a_prompt_anywhere_is_kept():
    objective = build("cdlm.objectives.masked.MaskedDiffusion")
    install_oracle(objective, LAWS["correlated"]())
    fixed = torch.tensor([[False, True, False, True]] * 3)
    ids = torch.tensor([[0, 4, 0, 6]] * 3)
    out, _ = DiffusionLM(objective).generate(3, 4, "parallel", 4, dtype=None, prompt=Prompt(ids, fixed))
    assert torch.equal(out[fixed], ids[fixed])


CONDITIONAL = [
    ("cdlm.objectives.masked.MaskedDiffusion", "ancestral"),
    ("cdlm.objectives.masked.MaskedDiffusion", "parallel"),
    ("cdlm.objectives.autoregressive.Autoregressive", "autoregressive"),
]


@pytest.mark.parametrize(("objective_path", "case"), CONDITIONAL, ids=[c for _, c in CONDITIONAL])
def test_discrete_samplers_draw_the_law_given_the_prompt(objective_path: str, case: str) -> None:
    """With an exact model of the correlated law, the continuations of a prompt follow the law given it."""
    law = LAWS["correlated"]()
    objective = build(objective_path)
    install_oracle(objective, law)
    first = int(law.seqs[0, 0])
    support = law.seqs[:, 0] == first  # the sequences that start with the prompt
    ids = generate(objective, case, 1200, [[first]], steps=CASES[case][1])
    assert (ids[:, 0] == first).all()
    match = (ids[:, None, :] == law.seqs[None]).all(-1)  # [n, K]
    assert match.any(-1).float().mean() > 0.99  # in the support
    observed = match.double().mean(0)[support]
    expected = law.probs[support] / law.probs[support].sum()
    assert torch.allclose(observed, expected, atol=0.05), (observed, expected)


def test_prompt_errors_say_what_is_wrong():
    objective = build("cdlm.objectives.masked.MaskedDiffusion")
    module = DiffusionLM(objective)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        module.generate(2, 4, "ancestral", 4, prompt=[[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="one prompt or n = 3 prompts"):
        module.generate(3, 4, "ancestral", 4, prompt=[[1], [2]])
    with pytest.raises(ValueError, match="needs the run's tokenizer"):
        module.generate(2, 4, "ancestral", 4, prompt="to be")
    with pytest.raises(ValueError, match=r"the prompt is \(2, 4\), the samples \[3, 4\]"):
        module.generate(3, 4, "ancestral", 4, prompt=prefix_prompt([[1]], 2, 4))


def test_templates_parse_into_kept_texts_and_spans_and_lay_out_on_the_canvas():
    assert parse_template("KING [MASK:3] of [MASK:2].") == ["KING ", 3, " of ", 2, "."]
    assert parse_template("[MASK:1]") == [1]
    with pytest.raises(ValueError, match="has no \\[MASK:k\\] span"):
        parse_template("KING of France")
    with pytest.raises(ValueError, match="is empty"):
        parse_template("KING [MASK:0]")
    prompt = canvas_prompt([[[1, 2], 3, [4]], [1, [5]]], 2, 8)
    assert prompt.fixed.tolist() == [[True, True, False, False, False, True, False, False], [False, True, *[False] * 6]]
    assert prompt.ids[0].tolist() == [1, 2, 0, 0, 0, 4, 0, 0] and prompt.ids[1, 1] == 5
    with pytest.raises(ValueError, match="needs 9 positions"):
        canvas_prompt([[[1], 8]], 1, 8)
    with pytest.raises(ValueError, match="has 3 tokens, which leaves nothing to generate in length = 3"):
        canvas_prompt([[[1, 2, 3]]], 1, 3)
    assert suffix_pieces([1], [2, 3], 6) == [[1], 3, [2, 3]]
    with pytest.raises(ValueError, match="leave nothing to generate in length = 3"):
        suffix_pieces([1], [2, 3], 3)


def test_generate_keeps_a_template_and_a_suffix(tiny_run):
    _, module = tiny_run  # character-level: one token per character
    encode = module.tokenizer.encode
    ids, texts = module.generate(3, 24, "ancestral", 8, template="KING [MASK:4] of [MASK:3].")
    assert (ids[:, :5] == torch.tensor(encode("KING "))).all() and (ids[:, 9:13] == torch.tensor(encode(" of "))).all()
    assert (ids[:, 16] == encode(".")[0]).all() and all(t.startswith("KING ") for t in texts)
    ids, texts = module.generate(2, 20, "ancestral", 8, prompt=["ROMEO", "JULIET"], suffix="END")
    assert (ids[:, -3:] == torch.tensor(encode("END"))).all() and all(t.endswith("END") for t in texts)
    assert texts[0].startswith("ROMEO") and texts[1].startswith("JULIET")
    with pytest.raises(ValueError, match="a template, or a prompt and / or a suffix, not both"):
        module.generate(2, 20, "ancestral", 8, prompt="ROMEO", template="[MASK:2]")


def test_prefix_prompt_and_leading():
    prompt = prefix_prompt([[1, 2], [3]], 2, 4)
    assert prompt.fixed.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert prompt.ids[0, :2].tolist() == [1, 2] and prompt.leading() == 1
    assert prefix_prompt([[]], 2, 4).leading() == 0


def test_cli_samples_start_with_the_prompt(tiny_run, tmp_path, capsys):
    import json

    from cdlm.cli import main
    from tests.runs import refused

    run_dir, module = tiny_run
    encode = module.tokenizer.encode
    out = tmp_path / "samples.jsonl"
    main(["sample", f"path={run_dir / 'final'}", "n=2", "length=24", "prompt=KING HENRY", f"out={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["text"].startswith("KING HENRY") and r["prompt"] == "KING HENRY" for r in rows)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ROMEO:"}\n\nJULIET\n')
    out2 = tmp_path / "two.jsonl"
    main(["sample", f"path={run_dir / 'final'}", "n=2", "length=24", f"prompt_file={prompts}", f"out={out2}"])
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["ROMEO:", "ROMEO:", "JULIET", "JULIET"]
    assert all(r["text"].startswith(r["prompt"]) for r in rows)
    capsys.readouterr()
    err = refused(["sample", f"path={run_dir / 'final'}", "length=8", "prompt=" + "x" * 8], capsys)
    assert "prompt: prompt 0 has 8 tokens, which leaves nothing to generate in length = 8" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    err = refused(["sample", f"path={run_dir / 'final'}", f"prompt_file={bad}"], capsys)
    assert 'line 1: a JSON line needs a "prompt" string' in err
    err = refused(["sample", f"path={run_dir / 'final'}", "prompt=a", f"prompt_file={prompts}"], capsys)
    assert "give prompt= or prompt_file=, not both" in err
    out3 = tmp_path / "infill.jsonl"
    main(["sample", f"path={run_dir / 'final'}", "n=2", "length=24", "infill=KING [MASK:6] of France", f"out={out3}"])
    rows = [json.loads(line) for line in out3.read_text().splitlines()]
    kept = encode(" of France")
    assert all(r["infill"] == "KING [MASK:6] of France" and r["ids"][11:21] == kept for r in rows), rows
    err = refused(["sample", f"path={run_dir / 'final'}", "infill=KING of France"], capsys)
    assert "infill: template 'KING of France' has no [MASK:k] span" in err
    err = refused(["sample", f"path={run_dir / 'final'}", "infill=[MASK:2]", "prompt=a"], capsys)
    assert "infill= takes no prompt=" in err
    main(["sample", f"path={run_dir / 'final'}", "n=1", "length=12", "prompt=1599", f"out={tmp_path / 'n.jsonl'}"])
    assert json.loads((tmp_path / "n.jsonl").read_text())["prompt"] == "1599"  # text as typed, not a number
    err = refused(["sample", f"path={run_dir / 'final'}", "length=8", "infill=[MASK:2] of France"], capsys)
    assert "infill: prompt 0 needs 12 positions" in err


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_autoregressive_prefill_equals_the_uncached_prompt_path(temperature):
    """The batch's common prefix read in one cached call, then ragged prompt tokens fed one by one: the same ids as
    the uncached path that reruns the whole prefix at every position."""
    from cdlm.samplers.autoregressive import sample_autoregressive

    objective = build("cdlm.objectives.autoregressive.Autoregressive")
    prompt = prefix_prompt([[1, 2, 3], [4, 5], [6, 7, 1, 2, 3]], 3, 12)
    x = objective.prior(3, 12, torch.device("cpu"))
    ts = torch.zeros(2)
    runs = [
        sample_autoregressive(
            objective,
            x,
            ts,
            generator=torch.Generator().manual_seed(0),
            fixed=prompt,
            cache=cache,
            temperature=temperature,
        )
        for cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][prompt.fixed], prompt.ids[prompt.fixed])
    assert prompt.leading() == 2


CONTINUOUS = ["cdlm.objectives.flow.OneHotFlow", "cdlm.objectives.embedding_flow.EmbeddingFlow"]


@pytest.mark.parametrize("objective_path", CONTINUOUS, ids=["flow", "langflow"])
def test_continuous_samplers_condition_on_the_clamped_prompt(objective_path):
    """Replacement steers the free positions: with an exact model of the correlated law and its first token fixed,
    most samples stay in the law's support given that token (replacement is not exact: the network reads the prompt
    only as clearly as the noise lets it, so about 10% leave), where overwriting the token only at the end leaves
    it half of the time."""
    law = LAWS["correlated"]()
    objective = build(objective_path)
    install_oracle(objective, law)
    first = int(law.seqs[0, 0])
    ids = generate(objective, "euler", 400, [[first]], steps=128)
    inside = (ids[:, None, :] == law.seqs[None]).all(-1).any(-1).float().mean()
    free, _ = DiffusionLM(objective).generate(400, 4, "euler", 128, dtype=None)
    free[:, 0] = first
    overwritten = (free[:, None, :] == law.seqs[None]).all(-1).any(-1).float().mean()
    assert inside > 0.85 and overwritten < 0.6, (inside, overwritten)  # measured: 0.885 / 0.905 against 0.52 / 0.48


def test_eos_stops_a_row():
    from cdlm.prompts import cut_at_eos, stops

    ids = torch.tensor([[5, 9, 3, 9, 4], [9, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    fixed = torch.tensor([[False] * 5, [True, False, False, False, False], [False] * 5])
    cut = cut_at_eos(ids, eos_id=9, pad_id=0, fixed=fixed)
    assert cut.tolist() == [[5, 9, 0, 0, 0], [9, 1, 2, 3, 4], [1, 2, 3, 4, 5]]  # a prompt's EOS does not stop
    assert stops(cut, 9, fixed) == [1, None, None]


def test_generate_stops_at_eos_and_the_text_ends_there(tiny_run, monkeypatch):
    """A sampler's rows cut after their first generated EOS: padding after it, the text decoded up to it."""
    import dataclasses

    _, module = tiny_run
    eos, pad = module.tokenizer.eos_id, module.tokenizer.pad_id
    a, b = module.tokenizer.encode("ab")
    drawn = torch.tensor([[eos, a, eos, b, b], [a, b, a, b, a]])  # row 0: its prompt EOS, then a generated one

    def fake(objective, x, ts, *, generator=None, callback=None):
        return drawn.clone()

    monkeypatch.setitem(SAMPLERS, "ancestral", dataclasses.replace(SAMPLERS["ancestral"], fn=fake))
    ids, texts = module.generate(2, 5, "ancestral", 4, stop_at_eos=True, prompt=[[eos], [a]])
    assert ids.tolist() == [[eos, a, eos, pad, pad], [a, b, a, b, a]]
    assert texts == [module.tokenizer.decode([eos, a]), "ababa"]
    plain, _ = module.generate(2, 5, "ancestral", 4, prompt=[[eos], [a]], stop_at_eos=False)
    assert torch.equal(plain, drawn)
    default, _ = module.generate(2, 5, "ancestral", 4, prompt=[[eos], [a]])  # a run with a tokenizer stops
    assert torch.equal(default, ids)
    samples = draw(module, 2, 5, "ancestral", 4, 0, prompt=[[eos], [a]])  # the JSONL rows say where each stopped
    assert [row["stop"] for row in samples.rows()] == [2, None] and torch.equal(samples.ids, ids)
    samples = draw(module, 2, 5, "ancestral", 4, 0, prompt=[[eos], [a]], stop_at_eos=False)
    assert "stop" not in samples.rows()[0]


def test_eval_metrics_read_a_sample_up_to_its_eos(tiny_run):
    """Entropy and distinct-n count the tokens up to a row's first EOS: the padding after it is not text."""
    from cdlm.evaluate import until_eos
    from cdlm.metrics import UnigramEntropy

    _, module = tiny_run
    eos, pad = module.tokenizer.eos_id, module.tokenizer.pad_id
    a, b = module.tokenizer.encode("ab")
    ids = torch.tensor([[a, b, eos, pad, pad, pad], [a, a, b, b, a, b]])
    assert until_eos(module, ids).tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    entropy = UnigramEntropy()
    entropy.update(ids, until_eos(module, ids))
    assert float(entropy.compute()) == pytest.approx((math.log(3) + math.log(2)) / 2)


def test_sample_length_auto_draws_up_to_the_run_length_and_ends_each_sample_at_its_eos(tiny_run, tmp_path, capsys):
    import json

    from cdlm.cli import main
    from tests.runs import refused

    run_dir, module = tiny_run
    out = tmp_path / "auto.jsonl"
    main(["sample", f"path={run_dir / 'final'}", "length=auto", "n=3", "sampler.steps=4", f"out={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    seq_len = module.config["data"]["seq_len"]
    assert len(rows) == 3 and all(len(row["ids"]) == seq_len and "stop" in row for row in rows)
    for row in rows:  # padding after a row's EOS, none before
        ids, stop = row["ids"], row["stop"]
        assert stop is None or (
            ids[stop] == module.tokenizer.eos_id and set(ids[stop + 1 :]) <= {module.tokenizer.pad_id}
        )
    err = refused(["sample", f"path={run_dir / 'final'}", "length=auto", "stop_at_eos=false"], capsys)
    assert "length=auto ends each sample at its EOS: it needs stop_at_eos=true" in err
    assert "is not a length; give a positive integer or auto" in refused(
        ["sample", f"path={run_dir}", "length=x"], capsys
    )
    short = tmp_path / "short.jsonl"
    main(
        ["sample", f"path={run_dir / 'final'}", "length=auto", "max_length=7", "n=2", "sampler.steps=4", f"out={short}"]
    )
    assert [len(json.loads(line)["ids"]) for line in short.read_text().splitlines()] == [7, 7]
    err = refused(["sample", f"path={run_dir / 'final'}", "length=8", "max_length=7"], capsys)
    assert "max_length= bounds length=auto" in err

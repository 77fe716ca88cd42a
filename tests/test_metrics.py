"""Gen PPL judges and generation metrics (docs/math.md §8), and their DDP (gloo) sync."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch

from cdlm.metrics import DistinctN, GenPPL, HFJudge, LikelihoodMetric, UnigramEntropy, build_judge
from cdlm.metrics.judges import CdlmJudge
from tests.runs import fit

EOT = "<|endoftext|>"
SENTENCES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them.",
    "All the world's a stage, and all the men and women merely players.",
]
TEXTS = ["To be, or not to be.", "the slings and arrows", "a sea of troubles", "All the world", "x", ""]


def save_tiny_gpt2(directory: Path) -> Path:
    """A 2-layer GPT-2 (context 64) with a byte-level BPE trained on a few sentences, saved locally."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1, special_tokens=[EOT], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tok), n_positions=64)
    config.bos_token_id = config.eos_token_id = tok.eos_token_id
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so that token probabilities differ visibly
        model.transformer.wte.weight.normal_(0, 0.5)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def judge(gpt2_dir) -> HFJudge:
    return HFJudge(str(gpt2_dir), batch_size=4)


def manual_nll(judge: HFJudge, text: str) -> tuple[float, int]:
    """The protocol by hand: [EOS-as-BOS] + ids up to the first EOS, one forward, sum of -log p."""
    ids = judge.tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = judge.tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    return manual_ids_nll(judge, ids), len(ids)


def manual_ids_nll(judge: HFJudge, ids: list[int]) -> float:
    """Sum of -log p of ``ids`` after the judge's EOS (GPT-2's BOS), in one forward pass."""
    eos = judge.tokenizer.eos_token_id
    x = torch.tensor([[eos, *ids]])
    with torch.no_grad():
        logp = judge.model(x).logits.double().log_softmax(-1)
    return -float(logp[0, :-1].gather(-1, x[0, 1:, None]).sum())


def test_hf_judge_matches_manual_logits(judge):
    assert judge.max_length == 64 and "first EOS" in judge.eos_rule
    for text, (nll, n) in zip(TEXTS, judge.score(TEXTS)):
        ref_nll, ref_n = manual_nll(judge, text)
        assert n == ref_n
        assert nll == pytest.approx(ref_nll, rel=1e-5, abs=1e-6)
    assert judge.score([""]) == [(0.0, 0)]
    assert judge.score(["x"])[0][1] == 1  # the first token is scored (from the prepended EOS)


def test_hf_judge_scores_a_text_given_its_prompt_by_the_chain_rule(judge):
    """``score_given``: -log p(text | prompt) = -log p(prompt + text) + log p(prompt), prompt and text encoded
    apart; a continuation longer than the judge's window is read in windows after as much context as fits."""
    prompts, texts = ["To be, or not", "", "All the world"], [" to be", "O", "'s a stage, and all the men and women"]
    for prompt, text, (nll, n) in zip(prompts, texts, judge.score_given(prompts, texts)):
        p, t = judge.tokenizer(prompt)["input_ids"], judge.tokenizer(text)["input_ids"]
        assert n == len(t) and nll == pytest.approx(manual_ids_nll(judge, p + t) - manual_ids_nll(judge, p), rel=1e-5)
    long = " ".join(SENTENCES * 4)
    [(nll, n)] = judge.score_given(["Once"], [long])
    assert n == len(judge.encode(long)) > judge.max_length and nll > 0
    with pytest.raises(ValueError, match="one prompt per text"):
        judge.score_given(["a"], ["b", "c"])


def test_text_after_first_eos_is_ignored(judge):
    (base, n_base), (cut, n_cut), (other, n_other) = judge.score(
        ["To be, or not", f"To be, or not{EOT}", f"To be, or not{EOT} all the world's a stage{EOT} more"]
    )
    assert n_cut == n_base + 1 and n_other == n_cut  # the first EOS is kept and scored, the rest dropped
    assert other == pytest.approx(cut, rel=1e-6) and cut > base


def test_batched_equals_one_at_a_time(gpt2_dir, judge):
    batched = HFJudge(str(gpt2_dir), batch_size=len(TEXTS)).score(TEXTS)
    single = [judge.score([t])[0] for t in TEXTS]
    for (a, n), (b, m) in zip(batched, single):
        assert n == m and a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_long_text_is_scored_in_windows(gpt2_dir, judge):
    text = " ".join(SENTENCES * 3)
    ids = judge.encode(text)
    assert len(ids) > 2 * 63  # longer than the 64-token context
    nll, n = judge.score([text])[0]
    assert n == len(ids)
    ref = sum(manual_ids_nll(judge, ids[i : i + 63]) for i in range(0, len(ids), 63))
    assert nll == pytest.approx(ref, rel=1e-5)
    small = HFJudge(str(gpt2_dir), max_length=16, batch_size=3)
    small_nll, small_n = small.score([text])[0]
    chunks = [ids[i : i + 15] for i in range(0, len(ids), 15)]
    assert small_n == n and small_nll == pytest.approx(sum(manual_ids_nll(judge, c) for c in chunks), rel=1e-5)


def test_gen_ppl_is_exp_of_token_mean(judge):
    metric = GenPPL(judge)
    metric.update(TEXTS[:3])
    metric.update(TEXTS[3:])
    scores = [manual_nll(judge, t) for t in TEXTS]
    mean = sum(s for s, _ in scores) / sum(n for _, n in scores)
    assert float(metric.compute()) == pytest.approx(math.exp(mean), rel=1e-6)
    summary = metric.summary()
    assert summary["nll"] == pytest.approx(mean, rel=1e-6) and summary["samples"] == len(TEXTS)
    assert metric.judge is judge and "judge" not in metric._defaults


def test_unigram_entropy_known_values():
    metric = UnigramEntropy()
    metric.update(torch.tensor([[7, 7, 7, 7]]))
    assert float(metric.compute()) == 0.0
    metric.reset()
    metric.update(torch.tensor([[1, 2, 3, 4]]))
    assert float(metric.compute()) == pytest.approx(math.log(4))
    assert metric.summary()["entropy_bits"] == pytest.approx(2.0)
    metric.update([[5, 5, 6, 6], [9]])  # log 2 and 0: mean of (log 4, log 2, 0)
    assert float(metric.compute()) == pytest.approx((math.log(4) + math.log(2)) / 3)
    metric.reset()
    metric.update(torch.tensor([[1, 2, 0, 0], [3, 3, 3, 0]]), mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool())
    assert float(metric.compute()) == pytest.approx(math.log(2) / 2)


def test_distinct_n_known_values():
    metric = DistinctN(n=(1, 2, 3))
    metric.update(torch.tensor([[1, 1, 1, 1], [1, 2, 1, 2]]))
    out = metric.compute()
    assert float(out["distinct_1"]) == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert float(out["distinct_2"]) == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert float(out["distinct_3"]) == pytest.approx((1 / 2 + 2 / 2) / 2)
    metric.reset()
    metric.update([[4, 5], [6, 7, 8]])  # the 2-token sample has no trigram and does not count for n=3
    assert float(metric.compute()["distinct_3"]) == 1.0


def ddp_data() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (8, 12), generator=g)
    mask = torch.rand(8, 12, generator=g) > 0.2
    return {
        "texts": TEXTS + ["and by opposing end them", "merely players"],
        "ids": ids,
        "mask": mask,
        "nll": torch.rand(8, 12, generator=g),
        "n_chars": torch.randint(10, 40, (8,), generator=g),
    }


def run_metrics(gpt2_dir: str, rank: int, world: int) -> dict[str, float]:
    """Every metric on this rank's share (rows ``rank::world``) of ``ddp_data``; computed values as floats."""
    data, rows = ddp_data(), slice(rank, None, world)
    gen = GenPPL(build_judge(gpt2_dir))
    gen.update(data["texts"][rows])
    ent, dist = UnigramEntropy(), DistinctN()
    ent.update(data["ids"][rows], data["mask"][rows])
    dist.update(data["ids"][rows], data["mask"][rows])
    lik = LikelihoodMetric()
    lik.update(data["nll"][rows], data["mask"][rows], data["n_chars"][rows])
    out = {"gen_ppl": float(gen.compute()), "gen_nll": gen.summary()["nll"], "entropy": float(ent.compute())}
    out.update({k: float(v) for k, v in {**dist.compute(), **lik.compute()}.items()})
    return out


def ddp_worker(rank: int, world: int, port: int, gpt2_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run_metrics(gpt2_dir, rank, world)
    finally:
        torch.distributed.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_sync_across_two_gloo_processes(gpt2_dir, tmp_path):
    single = run_metrics(str(gpt2_dir), 0, 1)
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), str(gpt2_dir), str(tmp_path)), nprocs=2)
    for rank in range(2):
        ranked = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ranked.keys() == single.keys()
        for key, value in single.items():
            assert ranked[key] == pytest.approx(value, rel=1e-5), key


@pytest.fixture(scope="module")
def autoregressive_run(tmp_path_factory):
    module, _, _ = fit(
        tmp_path_factory.mktemp("ar"), "objective=autoregressive", "sampler=autoregressive", "trainer.max_steps=4"
    )
    directory = module.save_pretrained(tmp_path_factory.mktemp("ar_final") / "final")
    return module.eval(), directory


def objective_nll(module, ids: list[int]) -> float:
    """Sum of the objective's exact per-token NLL of ``ids``, scored alone (no padding)."""
    if not ids:
        return 0.0
    x = torch.tensor([ids])
    with torch.no_grad():
        out = module.objective.nll({"input_ids": x, "attention_mask": torch.ones_like(x, dtype=torch.bool)})
    return float(out.nll.double().sum())


def test_cdlm_judge_equals_objective_nll(autoregressive_run):
    module, directory = autoregressive_run
    judge = build_judge(str(directory))
    assert isinstance(judge, CdlmJudge) and "first EOS" in judge.eos_rule
    texts = ["To be, or not to be", "ay, there's the rub", "", "O"]  # batched with padding
    for text, (nll, n) in zip(texts, judge.score(texts)):
        ids = module.tokenizer.encode(text)
        assert n == len(ids) and nll == pytest.approx(objective_nll(module, ids), rel=1e-5, abs=1e-6)
    long = "Now is the winter of our discontent made glorious summer. " * 3
    ids = module.tokenizer.encode(long)
    nll, n = CdlmJudge(str(directory), max_length=16).score([long])[0]
    assert n == len(ids) > 16
    assert nll == pytest.approx(sum(objective_nll(module, ids[i : i + 16]) for i in range(0, len(ids), 16)), rel=1e-5)


def test_cdlm_judge_scores_a_text_given_its_prompt_by_the_chain_rule(autoregressive_run):
    module, directory = autoregressive_run
    judge = build_judge(str(directory))
    prompts, texts = ["To be, or not", "KING"], [" to be", " HENRY. Once more unto the breach"]
    for prompt, text, (nll, n) in zip(prompts, texts, judge.score_given(prompts, texts)):
        p, t = module.tokenizer.encode(prompt), module.tokenizer.encode(text)
        expected = objective_nll(module, p + t) - objective_nll(module, p)
        assert n == len(t) and nll == pytest.approx(expected, rel=1e-5)


def test_judge_features_are_batch_independent_and_mauve_tells_text_from_noise(autoregressive_run, judge):
    """``features``: one vector per text, the same alone as in a padded batch, for both judge kinds; MAUVE on the
    cdlm judge's features scores two samples of real text above noise against real text."""
    import random

    from cdlm.conditional_eval import mauve_score

    _, directory = autoregressive_run
    ar = build_judge(str(directory))
    texts = ["To be, or not to be", "O", "", "ay, there's the rub, for in that sleep of death"]
    for scorer in (ar, judge):
        batched = scorer.features(texts)
        assert batched.shape[0] == 4 and batched.dtype == torch.float32
        for i, text in enumerate(texts):
            torch.testing.assert_close(scorer.features([text])[0], batched[i], rtol=1e-4, atol=1e-4)
    rng = random.Random(0)
    corpus = " ".join(SENTENCES * 20)
    real = [corpus[i : i + 48] for i in rng.sample(range(len(corpus) - 48), 60)]
    more = [corpus[i : i + 48] for i in rng.sample(range(len(corpus) - 48), 60)]
    noise = ["".join(rng.choice("qxzjkvw ;!") for _ in range(48)) for _ in range(60)]
    same, apart = mauve_score(ar, more, real), mauve_score(ar, noise, real)
    assert 0 < apart < same <= 1, (apart, same)


def test_cdlm_judge_refuses_a_diffusion_checkpoint(tmp_path):
    module, _, _ = fit(tmp_path / "run", "trainer.max_steps=1")
    directory = module.save_pretrained(tmp_path / "final")
    with pytest.raises(ValueError, match="autoregressive"):
        build_judge(str(directory))


def test_the_bound_standard_errors_of_independent_batches_add_in_quadrature():
    metric = LikelihoodMetric()
    mask = torch.ones(1, 4, dtype=torch.bool)
    metric.update(torch.full((1, 4), 2.0), mask, torch.tensor([10]), torch.tensor(0.3, dtype=torch.float64))
    metric.update(torch.full((1, 2), 4.0), mask[:, :2], torch.tensor([6]), torch.tensor(0.4))
    out = metric.compute()
    sum_se = math.sqrt((4 * 0.3) ** 2 + (2 * 0.4) ** 2)  # the summed bound's standard error, nats
    assert float(out["nll"]) == pytest.approx((8 + 8) / 6)
    assert float(out["nll_se"]) == pytest.approx(sum_se / 6) and float(out["bpc_se"]) == pytest.approx(
        sum_se / (math.log(2) * 16)
    )
    plain = LikelihoodMetric()
    plain.update(torch.full((1, 4), 2.0), mask, torch.tensor([10]))
    assert "nll_se" not in plain.compute()  # no error where no batch had one


def test_an_ode_bound_with_several_probes_reports_its_standard_error(tmp_path):
    from cdlm.eval_report import summary
    from cdlm.evaluate import validation_bound

    module, _, _ = fit(tmp_path, "objective=flow", "sampler=euler", "objective.ode_steps=4", "trainer.max_steps=2")
    module.objective.ode_probes = 3
    metrics = validation_bound(module, max_batches=1)
    assert metrics["val_nll_se"] > 0 and metrics["val_bpc_se"] > 0
    assert "Hutchinson SE" in summary({"metrics": metrics, "reference": {}})
    module.objective.ode_probes = 1
    assert "val_nll_se" not in validation_bound(module, max_batches=1)

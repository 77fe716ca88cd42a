"""Sampling traces: the recorder follows the sampler step by step, and the HTML page shows every step."""

import re
from collections.abc import Callable

import pytest
import torch

from cdlm.cli import main
from cdlm.components import OBJECTIVES
from cdlm.config import compose
from cdlm.data.tokenizers import build_tokenizer
from cdlm.module import DiffusionLM
from cdlm.objectives.autoregressive import Autoregressive
from cdlm.objectives.bitstream import Bitstream
from cdlm.objectives.embedding_flow import EmbeddingFlow
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.flow_map import FlowMap
from cdlm.objectives.latent_prior import LatentFlowPrior
from cdlm.objectives.masked import MaskedDiffusion
from cdlm.objectives.masked_distill import MaskedDistill
from cdlm.objectives.text_vae import TextVAEObjective
from cdlm.samplers import SAMPLERS
from cdlm.trace import (
    PENDING,
    ConfidenceDecode,
    TraceRecorder,
    render_html,
    trace_decoder,
    trace_recorder,
    write_html,
)
from cdlm.training import prepare
from cdlm.types import SamplerStep
from tests.conftest import tiny_backbone
from tests.runs import TINY, refused
from tests.test_exact_samplers import NEEDS_A_MODEL

STEP_DIV = re.compile(r'<div class="step" data-step="(\d+)">')


def test_trace_of_masked_generation(masked_objective, tmp_path):
    tokenizer = build_tokenizer("char", texts=["abcdefghij klm"])
    model = DiffusionLM(masked_objective, tokenizer)
    mask_id = masked_objective.mask_id
    recorder = TraceRecorder(mask_id=mask_id, sampler="ancestral", steps=16)
    ids, _ = model.generate(2, 24, "ancestral", steps=16, seed=0, dtype=None, callback=recorder, stop_at_eos=False)
    rows = recorder.rows
    assert len(rows) in (16, 17)  # the 16 grid steps, plus the final commit when masks remained
    assert torch.equal(rows[-1].ids, ids[0]) and not rows[-1].masked.any()
    assert torch.equal(torch.stack([r.committed for r in rows]).sum(0), torch.ones(24, dtype=torch.long))
    for previous, row in zip(rows, rows[1:]):  # committed = newly unmasked
        assert torch.equal(row.committed, previous.masked & ~row.masked)
    assert recorder.nfe == rows[-1].nfe >= 1

    path = write_html(recorder, tokenizer, tmp_path / "trace.html", mask_id=mask_id, title="tiny <masked> trace")
    page = path.read_text()
    assert path.is_file() and "<html" in page
    assert "http://" not in page and "https://" not in page
    assert [int(k) for k in STEP_DIV.findall(page)] == list(range(len(rows)))
    assert "tiny &lt;masked&gt; trace" in page
    final = page.split(f'data-step="{len(rows) - 1}"')[1]
    assert 'class="tok m"' not in final.split("</div></div>")[0]  # nothing masked at the last step
    assert page.count('class="tok new"') == 24  # every position is committed exactly once


def manual_step(index: int, ids: list[int], nfe: int) -> SamplerStep:
    return SamplerStep(index, 1 - index / 3, torch.tensor([ids]), None, nfe)


def test_html_escapes_tokens_and_shows_newlines(tmp_path):
    tokenizer = build_tokenizer("char", texts=["<a&b\n"])  # ids: "\n" 0, "&" 1, "<" 2, "a" 3, "b" 4; mask 8
    recorder = TraceRecorder(mask_id=8)
    for k, ids in enumerate([[8, 8, 8, 8], [2, 8, 8, 8], [2, 1, 0, 8], [2, 1, 0, 3]]):
        recorder(manual_step(k, ids, k + 1))
    committed = [r.committed.tolist() for r in recorder.rows]
    assert committed[:2] == [[False] * 4, [True, False, False, False]]
    page = write_html(recorder, tokenizer, tmp_path / "t.html").read_text()
    assert len(STEP_DIV.findall(page)) == 4
    assert ">&lt;</span>" in page and ">&amp;</span>" in page
    assert "\u21b5</span><br>" in page  # the newline is visible and breaks the line
    assert "><</span>" not in page


def test_continuous_trace_uses_decode_hook(tmp_path):
    tokenizer = build_tokenizer("char", texts=["abc"])

    def decode_ids(step):
        probs = step.x0.softmax(-1)
        confidence, ids = probs.max(-1)
        return ids, confidence

    recorder = TraceRecorder(decode_ids=decode_ids, sampler="euler")
    for k in range(3):
        x0 = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(k))
        recorder(SamplerStep(k, 1 - k / 3, x0, x0, k + 1))
    rows = recorder.rows
    assert rows[0].committed.all() and rows[0].confidence is not None
    assert torch.equal(rows[1].committed, rows[1].ids != rows[0].ids)
    page = write_html(recorder, tokenizer, tmp_path / "c.html").read_text()
    assert len(STEP_DIV.findall(page)) == 3 and "opacity:" in page and 'class="tok m"' not in page


def test_recorder_follows_the_chosen_sample_across_batches(masked_objective):
    model = DiffusionLM(masked_objective, None)
    recorder = TraceRecorder(mask_id=masked_objective.mask_id, sample_index=3)
    ids, _ = model.generate(4, 8, steps=4, seed=1, batch_size=2, dtype=None, callback=recorder, stop_at_eos=False)
    assert len(recorder.rows) in (4, 5)
    assert torch.equal(recorder.rows[-1].ids, ids[3])


# ---- every objective: the display decode of trace_recorder ------------------------------------------------------
TOKENIZER_TEXT = "abcdefghijk"
LENGTH, STEPS = 8, 3
LATENT_SETTINGS = dict(compression=2, latent_dim=8, vae_width=32, vae_depth=1, vae_heads=2)


def latent_prior(prior_block: int | None = None) -> Callable[[int], torch.nn.Module]:
    """A tiny untrained ``LatentFlowPrior`` (built as ``cdlm.load`` does: no VAE run) whose network moves."""

    def build(vocab: int) -> torch.nn.Module:
        objective = LatentFlowPrior(tiny_backbone(), vocab, prior_block=prior_block, **LATENT_SETTINGS)
        with torch.no_grad():  # a prior that moves (its output layer starts at zero)
            for p in objective.network.parameters():
                p.normal_(0, 0.3)
        return objective

    return build


BUILDERS: dict[str, dict[str, Callable[[int], torch.nn.Module]]] = {
    "cdlm.objectives.masked.MaskedDiffusion": {"masked": lambda v: MaskedDiffusion(tiny_backbone(), v)},
    "cdlm.objectives.masked_distill.MaskedDistill": {"masked_distill": lambda v: MaskedDistill(tiny_backbone(), v)},
    "cdlm.objectives.autoregressive.Autoregressive": {"autoregressive": lambda v: Autoregressive(tiny_backbone(), v)},
    "cdlm.objectives.flow.OneHotFlow": {"flow": lambda v: OneHotFlow(tiny_backbone(), v)},
    "cdlm.objectives.flow_map.FlowMap": {"flow_map": lambda v: FlowMap(tiny_backbone(), v)},
    "cdlm.objectives.embedding_flow.EmbeddingFlow": {"langflow": lambda v: EmbeddingFlow(tiny_backbone(), v)},
    "cdlm.objectives.bitstream.Bitstream": {"bitstream": lambda v: Bitstream(tiny_backbone(), v)},
    "cdlm.objectives.text_vae.TextVAEObjective": {
        "latent_vae": lambda v: TextVAEObjective(tiny_backbone(), v, **LATENT_SETTINGS)
    },
    "cdlm.objectives.latent_prior.LatentFlowPrior": {
        "latent_prior": latent_prior(),
        "latent_prior_blocks": latent_prior(prior_block=3),  # 4 latents: a block of 3, then a short one
    },
}
"""Tiny untrained builds ``vocab -> objective`` of every objective ``cdlm.components.OBJECTIVES`` names."""

CASES = [(path, name) for path in OBJECTIVES for name in BUILDERS.get(path, {path.rsplit(".", 1)[1]: None})]


@pytest.mark.parametrize(("path", "name"), CASES, ids=[name for _, name in CASES])
def test_trace_of_every_objective_and_sampler(path: str, name: str) -> None:
    """Every objective, with every sampler that fits it: one row per sampler step, tokens shown, the last row the
    returned sample; masked positions are committed once and never un-commit."""
    builder = BUILDERS.get(path, {}).get(name)
    assert builder is not None, f"tests/test_trace.py has no tiny builder for {path}: add it to BUILDERS"
    tokenizer = build_tokenizer("char", texts=[TOKENIZER_TEXT])
    torch.manual_seed(0)
    objective = builder(tokenizer.vocab_size).eval()
    model = DiffusionLM(objective, tokenizer)
    # edlm needs a second (autoregressive) run; its callback is checked in tests/test_edlm.py
    samplers = sorted(n for n, spec in SAMPLERS.items() if spec.fits(objective) and n not in NEEDS_A_MODEL)
    assert samplers, f"no sampler fits {name}"
    for sampler in samplers:
        recorder = trace_recorder(objective, LENGTH, sampler, STEPS)
        calls: list[int] = []

        def callback(step: SamplerStep, recorder: TraceRecorder = recorder, calls: list[int] = calls) -> None:
            calls.append(step.index)
            recorder(step)

        ids, _ = model.generate(
            1, LENGTH, sampler, steps=STEPS, seed=0, dtype=None, callback=callback, stop_at_eos=False
        )
        rows = recorder.rows
        where = f"{name} / {sampler}"
        assert len(rows) == len(calls) >= 1, where
        assert all(r.ids.shape == (LENGTH,) and r.ids.dtype == torch.int64 for r in rows), where
        assert torch.equal(rows[-1].ids, ids[0]) and not rows[-1].masked.any(), where  # the returned sample
        for previous, row in zip(rows, rows[1:]):  # nothing shown un-commits (masked / not generated yet)
            assert not (row.masked & ~previous.masked).any(), where
        space = objective.space
        if space in ("discrete", "autoregressive"):
            committed = torch.stack([r.committed for r in rows]).sum(0)
            assert torch.equal(committed, torch.ones(LENGTH, dtype=torch.long)), where  # each position once
        if space == "autoregressive":
            assert [int((~r.masked).sum()) for r in rows] == list(range(1, LENGTH + 1)), where
        if space == "continuous" and not getattr(objective, "blockwise", False):
            assert not any(r.masked.any() for r in rows) and rows[0].committed.all(), where
        if getattr(objective, "blockwise", False):
            assert rows[0].masked.sum() == LENGTH - 3 * objective.compression, where  # only the first block so far
        if isinstance(objective, ConfidenceDecode):
            assert all(r.confidence is not None for r in rows), where
            assert all(0 <= float(r.confidence.min()) <= float(r.confidence.max()) <= 1 for r in rows), where
        else:
            assert all(r.confidence is None for r in rows), where
        page = render_html(recorder, tokenizer, f"{name} trace")
        assert [int(k) for k in STEP_DIV.findall(page)] == list(range(len(rows))), where
        last = page.split(f'data-step="{len(rows) - 1}"')[1].split("</div></div>")[0]
        assert len(re.findall(r'class="tok[ "]', last)) == LENGTH and 'class="tok m"' not in last, (
            where
        )  # every token shown
        if isinstance(objective, ConfidenceDecode):
            assert "opacity:" in page, where


def test_builders_cover_every_objective() -> None:
    assert set(BUILDERS) == set(OBJECTIVES), "add the new objective to BUILDERS (tests/test_trace.py)"


def test_block_prior_trace_follows_the_chosen_sample_across_batches() -> None:
    """A block-causal prior restarts the step index at every block, with NFE still counting: the recorder tells a
    new block from a new batch, and the decoder shows the blocks so far, the rest not generated yet."""
    tokenizer = build_tokenizer("char", texts=[TOKENIZER_TEXT])
    torch.manual_seed(0)
    objective = latent_prior(prior_block=2)(tokenizer.vocab_size).eval()
    model = DiffusionLM(objective, tokenizer)
    recorder = trace_recorder(objective, LENGTH, "heun", STEPS, sample_index=2)
    ids, _ = model.generate(
        3, LENGTH, "heun", steps=STEPS, seed=0, batch_size=2, dtype=None, callback=recorder, stop_at_eos=False
    )
    rows = recorder.rows
    assert len(rows) == 2 * STEPS  # 4 latents: 2 blocks of STEPS steps, of the second batch only
    assert torch.equal(rows[-1].ids, ids[2])
    assert [int(r.masked.sum()) for r in rows] == [4] * STEPS + [0] * STEPS  # 2 latents x r = 2 tokens each
    assert [r.nfe for r in rows] == sorted(r.nfe for r in rows) and rows[-1].nfe == 2 * (2 * STEPS - 1)
    page = render_html(recorder, tokenizer)
    assert "not generated yet" in page and "to generate 4" in page


def test_autoregressive_trace_shows_positions_not_generated_yet() -> None:
    tokenizer = build_tokenizer("char", texts=[TOKENIZER_TEXT])
    objective = Autoregressive(tiny_backbone(), tokenizer.vocab_size).eval()
    recorder = trace_recorder(objective, 5, "autoregressive", 5)
    ids, _ = DiffusionLM(objective, tokenizer).generate(
        1, 5, "autoregressive", 5, seed=0, dtype=None, callback=recorder
    )
    assert [r.ids[: k + 1].tolist() for k, r in enumerate(recorder.rows)] == [
        ids[0, : k + 1].tolist() for k in range(5)
    ]
    assert all((r.ids[k + 1 :] == PENDING).all() for k, r in enumerate(recorder.rows))
    assert [r.committed.nonzero().flatten().tolist() for r in recorder.rows] == [[k] for k in range(5)]
    page = render_html(recorder, tokenizer)
    assert page.count('title="not generated yet') == 4 + 3 + 2 + 1 and "masked, position" not in page


def test_dense_state_without_a_decoder_is_a_clear_error() -> None:
    step = SamplerStep(0, 0.5, torch.zeros(1, 4, 3), None, 1)
    with pytest.raises(ValueError, match="dense, not token ids"):
        TraceRecorder()(step)
    with pytest.raises(ValueError, match="space 'nowhere'"):
        trace_decoder(type("Odd", (), {"space": "nowhere"})())
    with pytest.raises(ValueError, match="needs the sample length"):
        trace_decoder(latent_prior(prior_block=2)(14))


def test_bitstream_trace_decode_leaves_the_invalid_count_alone() -> None:
    objective = Bitstream(tiny_backbone(), 11)  # 4 bits: codes 11..15 are invalid
    x0 = torch.full((1, 3, 4), 0.9)  # code 15 -> the most probable valid id
    ids, confidence = objective.decode_confidence(x0)
    assert int(objective.invalid_decoded) == 0 and torch.equal(ids, objective.decode(x0))
    assert torch.allclose(confidence, torch.full((1, 3), 0.9**3 * 0.1))  # 11 = 0b1011: three ones, one zero


CLI_RUNS = {
    "flow": (["objective=flow", "sampler=euler"], "opacity:"),
    "langflow": (["objective=langflow", "sampler=heun"], 'class="tok new"'),
    "bitstream": (["objective=bitstream", "sampler=churn"], "opacity:"),
    "latent": (["objective=latent", "objective.compression=2", "objective.latent_dim=8", "sampler=euler"], "tok new"),
    "autoregressive": (["objective=autoregressive", "sampler=autoregressive"], "not generated yet"),
}


@pytest.mark.parametrize("name", sorted(CLI_RUNS))
def test_cli_sample_writes_a_trace(name: str, tmp_path, capsys) -> None:
    """``cdlm sample ... trace=`` on an untrained run: the page has one row per step, and no traceback."""
    overrides, fragment = CLI_RUNS[name]
    run = prepare(compose([*TINY, *overrides, f"run_dir={tmp_path / 'run'}"]))
    final = run.module.save_pretrained(tmp_path / "run" / "final")
    trace = tmp_path / "trace.html"
    main(["sample", f"path={final}", "n=2", "length=16", "sampler.steps=4", f"trace={trace}"])
    page = trace.read_text()
    rows = 16 if name == "autoregressive" else 4  # one step per token
    assert len(STEP_DIV.findall(page)) == rows and fragment in page
    assert f"{type(run.module.objective).__name__} sampling trace" in page
    assert "cdlm: 2 samples" in capsys.readouterr().out


def test_cli_trace_needs_one_process(tmp_path, capsys) -> None:
    run = prepare(compose([*TINY, "objective=flow", "sampler=euler", f"run_dir={tmp_path / 'run'}"]))
    final = run.module.save_pretrained(tmp_path / "run" / "final")
    err = refused(["sample", f"path={final}", "devices=2", f"trace={tmp_path / 't.html'}"], capsys)
    assert "use devices=1 with trace=" in err and not (tmp_path / "t.html").exists()


FIXED = re.compile(r'<span class="tok fix" title="prompt \(kept\), id (\d+), position (\d+)">')


@pytest.mark.parametrize("name", ["masked", "autoregressive", "langflow"])
def test_cli_trace_shows_the_prompt_as_kept_at_every_step(name: str, tmp_path, capsys) -> None:
    """``prompt=`` / ``infill=`` with ``trace=``: every step shows the prompt's tokens at their positions, marked as
    kept (never masked, not generated yet, or committed); the free positions are traced as before."""
    overrides = {"masked": [], "autoregressive": CLI_RUNS["autoregressive"][0], "langflow": CLI_RUNS["langflow"][0]}
    run = prepare(compose([*TINY, *overrides[name], f"run_dir={tmp_path / 'run'}"]))
    final = run.module.save_pretrained(tmp_path / "run" / "final")
    trace = tmp_path / "trace.html"
    main(
        ["sample", f"path={final}", "n=2", "length=16", "sampler.steps=4", "infill=KING [MASK:4] of", f"trace={trace}"]
    )
    page = trace.read_text()
    steps = STEP_DIV.findall(page)
    kept = [int(m[2]) for m in FIXED.finditer(page)]
    assert kept == [*range(5), *range(9, 12)] * len(steps), kept  # "KING " and " of", every step
    encode = run.module.tokenizer.encode
    assert [int(m[1]) for m in FIXED.finditer(page)][:8] == encode("KING ") + encode(" of")
    assert "prompt (kept)" in page.split('<div class="step"')[0]  # the legend
    capsys.readouterr()

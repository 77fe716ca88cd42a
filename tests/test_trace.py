"""Sampling traces: the recorder follows the sampler step by step, and the HTML page shows every step."""

import re

import torch

from cdlm.data.tokenizers import build_tokenizer
from cdlm.module import DiffusionLM
from cdlm.trace import TraceRecorder, write_html
from cdlm.types import SamplerStep

STEP_DIV = re.compile(r'<div class="step" data-step="(\d+)">')


def test_trace_of_masked_generation(masked_objective, tmp_path):
    tokenizer = build_tokenizer("char", texts=["abcdefghij klm"])
    model = DiffusionLM(masked_objective, tokenizer)
    mask_id = masked_objective.mask_id
    recorder = TraceRecorder(mask_id=mask_id, sampler="ancestral", steps=16)
    ids, _ = model.generate(2, 24, "ancestral", steps=16, seed=0, dtype=None, callback=recorder)
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
    ids, _ = model.generate(4, 8, steps=4, seed=1, batch_size=2, dtype=None, callback=recorder)
    assert len(recorder.rows) in (4, 5)
    assert torch.equal(recorder.rows[-1].ids, ids[3])

"""Sampling traces: record one sample at every sampler step and render the trace as one self-contained HTML page.

``TraceRecorder`` is a ``callback`` for ``DiffusionLM.generate``; ``write_html`` turns what it recorded into a page
with a step slider (and every step as static content, so it reads without JavaScript too).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cdlm.types import SamplerStep

DecodeIds = Callable[[SamplerStep], tuple[torch.Tensor, torch.Tensor | None]]


def decode_state_ids(step: SamplerStep) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The default ``decode_ids``: a discrete sampler's state ``x`` already holds token ids, with no confidence."""
    if step.x.is_floating_point() or step.x.is_complex():
        raise TypeError(
            "the sampler state x is dense, not token ids; pass TraceRecorder(decode_ids=...) returning "
            "(argmax ids [B, L], confidence [B, L] or None)"
        )
    return step.x, None


@dataclass
class TraceRow:
    """One recorded step of one sample (CPU tensors of length ``L``)."""

    index: int
    t: float
    nfe: int
    ids: torch.Tensor  # int64 token ids
    masked: torch.Tensor  # bool, still masked after the step
    committed: torch.Tensor  # bool, newly committed at this step
    confidence: torch.Tensor | None  # float16 in [0, 1], continuous traces only


class TraceRecorder:
    """Record sample ``sample_index`` at every sampler step; pass the recorder as ``callback=``.

    Args:
        mask_id: the objective's mask id (masked diffusion); ``None`` for samplers with no masked positions,
            where "committed" means "decoded id changed since the previous step".
        sample_index: which sample of the whole ``generate`` call to record (batches of ``batch_size`` are
            followed: a step index that does not increase starts the next batch).
        decode_ids: ``step -> (ids [B, L], confidence [B, L] | None)``; continuous objectives supply their argmax
            decode of ``step.x0`` or ``step.x`` and its probability. The default reads ids from ``step.x``.
        sampler, steps: shown in the page header.
    """

    def __init__(
        self,
        mask_id: int | None = None,
        sample_index: int = 0,
        decode_ids: DecodeIds | None = None,
        sampler: str | None = None,
        steps: int | None = None,
    ) -> None:
        self.mask_id, self.sample_index = mask_id, sample_index
        self.decode_ids = decode_ids or decode_state_ids
        self.sampler, self.steps = sampler, steps
        self.rows: list[TraceRow] = []
        self._offset, self._batch, self._last_index = 0, 0, None

    def __call__(self, step: SamplerStep) -> None:
        if self._last_index is not None and step.index <= self._last_index:
            self._offset += self._batch  # a new batch of the same generate call
        self._last_index, self._batch = step.index, step.x.shape[0]
        row = self.sample_index - self._offset
        if not 0 <= row < self._batch:
            return
        ids, confidence = self.decode_ids(step)
        ids = ids[row].detach().to("cpu", torch.int64)
        masked = ids == self.mask_id if self.mask_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        previous = self.rows[-1] if self.rows else None
        if self.mask_id is not None:
            was_masked = previous.masked if previous is not None else torch.ones_like(masked)
            committed = was_masked & ~masked
        else:
            committed = ids != previous.ids if previous is not None else torch.ones_like(masked)
        conf = None if confidence is None else confidence[row].detach().float().clamp(0, 1).to("cpu", torch.float16)
        self.rows.append(TraceRow(step.index, float(step.t), int(step.nfe), ids, masked, committed, conf))

    @property
    def nfe(self) -> int:
        """Network evaluations at the last recorded step."""
        return self.rows[-1].nfe if self.rows else 0


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}.info{color:#555;margin-bottom:1em}
.controls{display:none;gap:.8em;align-items:center;margin-bottom:1em;position:sticky;top:0;background:#fafafa;
padding:.4em 0}body.js .controls{display:flex}#slider{flex:1}
.step{border-top:1px solid #ddd;padding:.6em 0}body.js .step{display:none}body.js .step.on{display:block}
.meta{font-size:.85em;color:#666;margin-bottom:.3em}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;word-break:break-all}
.tok{padding:1px 0}.m{display:inline-block;width:.9ch;height:1.1em;vertical-align:middle;background:#bbb;
border-radius:2px;margin:0 1px}.new{background:#ffe066;border-radius:2px;box-shadow:0 0 0 1px #e0b000}
.nl,.sp{color:#999}
"""

JS = """
document.body.classList.add("js");
const steps=[...document.querySelectorAll(".step")],slider=document.getElementById("slider"),
label=document.getElementById("label"),play=document.getElementById("play");let timer=null;
function show(k){steps.forEach((d,i)=>d.classList.toggle("on",i===k));
label.textContent="step "+(k+1)+" / "+steps.length;}
slider.addEventListener("input",()=>show(+slider.value));
play.addEventListener("click",()=>{if(timer){clearInterval(timer);timer=null;play.textContent="play";return;}
if(+slider.value>=steps.length-1)slider.value=0;play.textContent="pause";
timer=setInterval(()=>{const k=+slider.value+1;if(k>=steps.length){clearInterval(timer);timer=null;
play.textContent="play";return;}slider.value=k;show(k);},120);});
document.addEventListener("keydown",e=>{const d={ArrowRight:1,ArrowLeft:-1}[e.key];if(!d)return;
slider.value=Math.min(steps.length-1,Math.max(0,+slider.value+d));show(+slider.value);});
show(+slider.value);
"""


def token_html(text: str) -> str:
    """HTML of one decoded token: escaped, newlines as a visible mark plus a line break, empty as a mark."""
    if text == "":
        return '<span class="sp">\u2205</span>'
    return html.escape(text).replace("\n", '<span class="nl">\u21b5</span><br>')


def row_html(row: TraceRow, number: int, decode: Callable[[int], str]) -> str:
    """One ``<div class="step">`` for a recorded step."""
    spans = []
    for i, token in enumerate(row.ids.tolist()):
        if row.masked[i]:
            spans.append(f'<span class="tok m" title="masked, position {i}"></span>')
            continue
        cls = "tok new" if row.committed[i] else "tok"
        style = ""
        if row.confidence is not None:
            c = float(row.confidence[i])
            style = f' style="opacity:{0.2 + 0.8 * c:.2f}"'
            title = f"id {token}, p={c:.2f}"
        else:
            title = f"id {token}"
        spans.append(f'<span class="{cls}" title="{title}"{style}>{decode(token)}</span>')
    meta = (
        f"step {number + 1} (sampler index {row.index}) &middot; t={row.t:.4f} &middot; NFE {row.nfe} &middot; "
        f"committed {int(row.committed.sum())} &middot; masked {int(row.masked.sum())}"
    )
    tokens = "".join(spans)
    return (
        f'<div class="step" data-step="{number}"><div class="meta">{meta}</div><div class="tokens">{tokens}</div></div>'
    )


def write_html(
    recorder: TraceRecorder,
    tokenizer,
    path: str | Path,
    mask_id: int | None = None,
    title: str = "cdlm sampling trace",
) -> Path:
    """Write the recorded trace to ``path`` as one self-contained HTML page (``render_html``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(recorder, tokenizer, title, mask_id), encoding="utf-8")
    return path


def render_html(
    recorder: TraceRecorder, tokenizer, title: str = "cdlm sampling trace", mask_id: int | None = None
) -> str:
    """The recorded trace as one self-contained HTML page.

    ``mask_id`` (default: the recorder's) marks positions shown as grey boxes; ``tokenizer.decode([id])``
    renders every other token (``tokenizer=None`` shows raw ids).
    """
    if not recorder.rows:
        raise ValueError("the trace is empty: pass the recorder as callback= to generate() before writing it")
    mask_id = recorder.mask_id if mask_id is None else mask_id
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = token_html(tokenizer.decode([token]) if tokenizer is not None else f"[{token}]")
        return cache[token]

    rows = recorder.rows
    if mask_id is not None and mask_id != recorder.mask_id:
        rows = [_remask(row, mask_id, rows[i - 1] if i else None) for i, row in enumerate(rows)]
    steps = recorder.steps if recorder.steps is not None else len(rows)
    info = (
        f"sampler <b>{html.escape(recorder.sampler or 'unknown')}</b> &middot; steps <b>{steps}</b> &middot; "
        f"recorded steps <b>{len(rows)}</b> &middot; NFE <b>{recorder.nfe}</b> &middot; "
        f"sample {recorder.sample_index} &middot; length {rows[0].ids.numel()}"
    )
    legend = '<span class="new">x</span> committed at this step'
    if mask_id is not None:
        legend = '<span class="m"></span> masked &nbsp; ' + legend
    if any(r.confidence is not None for r in rows):
        legend += " &nbsp; opacity = confidence"
    controls = (
        f'<div class="controls"><button id="play">play</button><input id="slider" type="range" min="0" '
        f'max="{len(rows) - 1}" value="{len(rows) - 1}"><span id="label"></span></div>'
    )
    body = "\n".join(row_html(row, k, decode) for k, row in enumerate(rows))
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n<div class="info">{info}<br>'
        f"{legend}</div>\n{controls}\n{body}\n<script>{JS}</script>\n</body>\n</html>\n"
    )
    return page


def _remask(row: TraceRow, mask_id: int, previous: TraceRow | None) -> TraceRow:
    """``row`` with masked / committed recomputed for ``mask_id`` (when it differs from the recorder's)."""
    masked = row.ids == mask_id
    was_masked = previous.ids == mask_id if previous is not None else torch.ones_like(masked)
    return TraceRow(row.index, row.t, row.nfe, row.ids, masked, was_masked & ~masked, row.confidence)

"""Sampling traces: record one sample at every sampler step and render the trace as one self-contained HTML page.

``TraceRecorder`` is a ``callback`` for ``DiffusionLM.generate``; ``write_html`` turns what it recorded into a page
with a step slider (and every step as static content, so it reads without JavaScript too). ``trace_recorder`` builds
the recorder for any objective: ``trace_decoder`` picks, from the objective's sampling contract, how a sampler state
is shown as token ids (the state itself, the decode of the current clean estimate, or a partly generated sequence).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from cdlm.prompts import Prompt
from cdlm.types import BlockwiseObjective, ContinuousObjective, SamplerStep

DecodeIds = Callable[[SamplerStep], tuple[torch.Tensor, torch.Tensor | None]]
"""``step -> (ids [B, L], confidence [B, L] in [0, 1] or None)``; ids ``PENDING`` mark positions not generated yet."""

PENDING = -1
"""The display id of a position not generated yet (autoregressive, later latent blocks): shown like a masked one."""


@runtime_checkable
class ConfidenceDecode(Protocol):
    """An objective that decodes a clean estimate together with a per-token confidence (optional, for traces)."""

    def decode_confidence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def decode_state_ids(step: SamplerStep) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A discrete sampler's state ``x`` already holds token ids ``[B, L]``, with no confidence."""
    if step.x.is_floating_point() or step.x.is_complex():
        raise ValueError(
            "the sampler state x is dense, not token ids; pass TraceRecorder(decode_ids=...) returning "
            "(argmax ids [B, L], confidence [B, L] or None), or build it with trace_recorder(objective)"
        )
    return step.x, None


def autoregressive_ids(step: SamplerStep) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The left-to-right canvas ``x`` ``[B, L]`` with the positions after ``step.index`` (not generated yet, the
    prior's fill) as ``PENDING``."""
    ids = step.x.clone()  # the sampler writes its canvas in place
    ids[:, step.index + 1 :] = PENDING
    return ids, None


def dense_estimate(step: SamplerStep, keep: bool = False) -> torch.Tensor:
    """The clean estimate ``x0`` (else the state ``x``) ``[B, ..., D]`` of a continuous step in float32; ``keep``:
    a copy, since the samplers update their buffers in place at the next step."""
    x = step.x0 if step.x0 is not None else step.x
    return x.detach().to(torch.float32, copy=keep)


def estimate_decoder(objective: ContinuousObjective) -> DecodeIds:
    """Ids of the current clean estimate by ``objective.decode`` (with the objective's confidence where it has
    ``decode_confidence``)."""

    def decode(step: SamplerStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        x0 = dense_estimate(step)  # [B, L, D], decoded now: not kept
        if step.x0 is not None and isinstance(objective, ConfidenceDecode):  # a clean estimate, not a noisy state
            return objective.decode_confidence(x0)
        return objective.decode(x0), None

    return decode


class BlockDecoder:
    """Ids of a block-causal latent prior's sample so far (``LatentDiffusion.sample_blocks``).

    The sampler runs once per block of latents and reports that block's steps only, their index starting again at
    each block: the finished blocks (each the last estimate of its run) and the current block's estimate are
    decoded together, and the positions after them are ``PENDING`` up to ``length`` tokens.
    """

    def __init__(self, objective, length: int) -> None:
        self.objective, self.length = objective, length
        self.done: list[torch.Tensor] = []  # the finished blocks' clean latents, [B, K, d_z] each
        self.current: torch.Tensor | None = None  # the current block's last estimate [B, K, d_z]
        self.last_index: int | None = None

    def __call__(self, step: SamplerStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.last_index is not None and step.index <= self.last_index and self.current is not None:
            self.done.append(self.current)  # a new block: the previous one's last estimate is its clean block
        self.last_index, self.current = step.index, dense_estimate(step, keep=True)
        ids = self.objective.decode(torch.cat([*self.done, self.current], 1))  # [B, n r]
        shown = ids.new_full((ids.shape[0], self.length), PENDING)  # [B, L]
        width = min(ids.shape[1], self.length)
        shown[:, :width] = ids[:, :width]
        return shown, None


def trace_decoder(objective, length: int | None = None) -> DecodeIds:
    """How a trace shows ``objective``'s sampler states as ids, chosen from its sampling contract (``cdlm.types``:
    the ``space`` every objective declares).

    Discrete (masked) states are ids; an autoregressive canvas is ids up to the current position; a continuous
    state is shown by ``objective.decode`` of its clean estimate (``ContinuousObjective``), with a confidence where
    the objective has ``decode_confidence`` (``ConfidenceDecode``); a block-causal latent prior by the blocks so far
    (which needs the sample ``length``). Raises ``ValueError`` when the objective has no way to show its states.
    """
    space = getattr(objective, "space", None)
    if space == "discrete":
        return decode_state_ids
    if space == "autoregressive":
        return autoregressive_ids
    if space == "continuous":
        if not callable(getattr(objective, "decode", None)):
            raise ValueError(f"{type(objective).__name__} has no decode(x) -> ids: its samples cannot be traced")
        if isinstance(objective, BlockwiseObjective) and objective.blockwise:  # sampled block by block
            if length is None:
                raise ValueError("a block-causal latent prior's trace needs the sample length: trace_decoder(obj, L)")
            return BlockDecoder(objective, length)
        return estimate_decoder(objective)
    raise ValueError(
        f"{type(objective).__name__} has space {space!r}; a trace shows discrete, autoregressive or continuous "
        "objectives (cdlm.types)"
    )


def trace_recorder(
    objective,
    length: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    sample_index: int = 0,
) -> TraceRecorder:
    """A ``TraceRecorder`` for ``objective``'s samples of ``length`` tokens (its mask id and ``trace_decoder``)."""
    decode = trace_decoder(objective, length)
    return TraceRecorder(getattr(objective, "mask_id", None), sample_index, decode, sampler, steps)


@dataclass
class TraceRow:
    """One recorded step of one sample (CPU tensors of length ``L``)."""

    index: int
    t: float
    nfe: int
    ids: torch.Tensor  # int64 token ids
    masked: torch.Tensor  # bool, still masked (or not generated yet) after the step
    committed: torch.Tensor  # bool, newly committed at this step
    confidence: torch.Tensor | None  # float16 in [0, 1], continuous traces only
    fixed: torch.Tensor | None = None  # bool, the prompt's positions (kept, never generated), if prompted


class TraceRecorder:
    """Record sample ``sample_index`` at every sampler step; pass the recorder as ``callback=``.

    Args:
        mask_id: the objective's mask id (masked diffusion); ``None`` for samplers with no masked positions,
            where "committed" means "decoded id changed since the previous step".
        sample_index: which sample of the whole ``generate`` call to record (batches of ``batch_size`` are
            followed: a step index that does not increase starts the next batch).
        decode_ids: ``step -> (ids [B, L], confidence [B, L] | None)``, called with the recorded sample's step only
            (``B = 1``) and right away (states are updated in place later); ids ``PENDING`` are not generated yet.
            The default reads ids from ``step.x``; ``trace_recorder`` picks ``trace_decoder(objective)``.
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
        self._offset, self._batch, self._last_index, self._last_nfe = 0, 0, None, 0
        self.prompt_ids: torch.Tensor | None = None  # [L] int64: the recorded sample's kept tokens, if prompted
        self.fixed: torch.Tensor | None = None  # [L] bool: where they are

    def keep(self, prompt: Prompt) -> None:
        """Show the recorded sample's prompt (``cdlm.prompts.Prompt`` of the whole ``generate`` call) as kept
        tokens at every step: never masked, never "committed" (docs/sampling.md, "Prompts")."""
        self.prompt_ids = prompt.ids[self.sample_index].detach().to("cpu", torch.int64)
        self.fixed = prompt.fixed[self.sample_index].detach().to("cpu")

    def __call__(self, step: SamplerStep) -> None:
        if self._last_index is not None and step.index <= self._last_index and step.nfe <= self._last_nfe:
            self._offset += self._batch  # a new batch of the same generate call (a new latent block keeps counting)
        self._last_index, self._last_nfe, self._batch = step.index, step.nfe, step.x.shape[0]
        row = self.sample_index - self._offset
        if not 0 <= row < self._batch:
            return
        ids, confidence = self.decode_ids(one_sample(step, row))
        ids = ids[0].detach().to("cpu", torch.int64, copy=True)  # [L]; a copy: samplers update states in place
        if self.fixed is not None:  # the prompt's tokens, also where a left-to-right trace has not reached them yet
            ids = torch.where(self.fixed, self.prompt_ids, ids)
        masked = ids < 0  # PENDING: not generated yet
        if self.mask_id is not None:
            masked |= ids == self.mask_id
        previous = self.rows[-1] if self.rows else None
        if self.mask_id is not None:
            was_masked = previous.masked if previous is not None else torch.ones_like(masked)
            committed = was_masked & ~masked
        else:  # changed since the previous step, or newly generated
            changed = (ids != previous.ids) | previous.masked if previous is not None else torch.ones_like(masked)
            committed = changed & ~masked
        if self.fixed is not None:
            committed &= ~self.fixed
        conf = None if confidence is None else confidence[0].detach().float().clamp(0, 1).to("cpu", torch.float16)
        row = TraceRow(step.index, float(step.t), int(step.nfe), ids, masked, committed, conf, self.fixed)
        self.rows.append(row)

    @property
    def nfe(self) -> int:
        """Network evaluations at the last recorded step."""
        return self.rows[-1].nfe if self.rows else 0


def one_sample(step: SamplerStep, row: int) -> SamplerStep:
    """``step`` restricted to sample ``row`` of its batch (views ``[1, ...]``)."""
    x0 = None if step.x0 is None else step.x0[row : row + 1]
    return SamplerStep(step.index, step.t, step.x[row : row + 1], x0, step.nfe)


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
.nl,.sp{color:#999}.fix{background:#dbe9ff;border-radius:2px}
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
            what = "not generated yet" if token < 0 else "masked"
            spans.append(f'<span class="tok m" title="{what}, position {i}"></span>')
            continue
        if row.fixed is not None and row.fixed[i]:
            spans.append(
                f'<span class="tok fix" title="prompt (kept), id {token}, position {i}">{decode(token)}</span>'
            )
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
        f"committed {int(row.committed.sum())} &middot; "
    )
    pending = int((row.ids < 0).sum())
    meta += f"to generate {pending}" if pending else f"masked {int(row.masked.sum())}"
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
    if any(bool((r.ids < 0).any()) for r in rows):
        legend = '<span class="m"></span> not generated yet &nbsp; ' + legend
    elif mask_id is not None:
        legend = '<span class="m"></span> masked &nbsp; ' + legend
    if any(r.confidence is not None for r in rows):
        legend += " &nbsp; opacity = confidence"
    if any(r.fixed is not None and bool(r.fixed.any()) for r in rows):
        legend = '<span class="fix">x</span> prompt (kept) &nbsp; ' + legend
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
    masked = (row.ids == mask_id) | (row.ids < 0)
    was_masked = (previous.ids == mask_id) | (previous.ids < 0) if previous is not None else torch.ones_like(masked)
    return TraceRow(row.index, row.t, row.nfe, row.ids, masked, was_masked & ~masked, row.confidence, row.fixed)

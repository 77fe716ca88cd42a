"""Memory and time of the output layer alone: a ``k``-bit head (bitstream) against a ``V``-way softmax head.

CoBit's bit patches remove the O(V) output layer (docs/math.md §4): a token id is written with
``k = ceil(log2 V)`` bits, so the head is ``Linear(W, k)`` with a per-bit loss instead of ``Linear(W, V)`` with a
softmax cross-entropy. This script times and measures both heads on the same hidden states ``h`` ``[N, W]``
(``N = B * L`` tokens), forward + backward (``dW``, ``db`` and ``dh``), in one process:

- softmax: ``F.cross_entropy(Linear(W, V)(h), ids)`` against random ids;
- bits: ``Linear(W, k)`` and the EDM-weighted squared error ``lambda(sigma) (sigmoid(logit) - b)^2`` of
  docs/math.md §4 against the bits of the same ids (``--bits-loss bce`` for the per-bit cross-entropy instead).

The two heads are timed in alternating rounds (one softmax step, then bits steps for as long), so both see the same
background load. Per configuration it reports the head's parameters, analytic FLOPs ``6 N W out``, the median (and
minimum) step time, tokens/s, the analytic bytes of the logit-sized tensors saved for backward, the measured bytes
held after the forward and the measured peak of forward + backward above the inputs (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the allocation events of ``torch.profiler`` with ``profile_memory=True``),
and the softmax / bits ratios. The matched-filter residual of docs/math.md §4 is ``O(N k)`` elementwise work and
is left out. Writes one JSON file.

    python bench/output_layer.py [--batch 16] [--length 256] [--width 256 768] [--vocab 4096 50257]
        [--dtype bf16] [--bits-loss mse] [--repeats 3] [--warmup 0] [--threads N] [--device auto]
        [--out bench/results/output_layer_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cdlm.device import device_name
from cdlm.device import synchronize as sync
from cdlm.objectives.bits import bit_width, ids_to_bits

SIGMA_DATA = 0.5  # EDM's sigma_d (docs/math.md §4)
LOG_SIGMA_MEAN, LOG_SIGMA_STD = -1.2, 1.2  # the warm-up noise law, log sigma ~ N(-1.2, 1.2^2)
FLOPS_FORMULA = "6 * N * W * out (forward 2, dW 2, dh 2; biases, softmax and loss elementwise work not counted)"

Step = Callable[[], torch.Tensor]
HeadCase = tuple[Step, nn.Linear, torch.Tensor]  # the loss closure, the head, its input h [N, W]


# ---- device helpers -------------------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16 autocast on the device type for ``dtype == "bf16"``, nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


# ---- the two heads --------------------------------------------------------------------------------------------
def edm_weight(n: int, rows: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma^2 sigma_d^2)`` ``[N]``, one warm-up ``sigma`` per row."""
    log_sigma = LOG_SIGMA_MEAN + LOG_SIGMA_STD * torch.randn(rows, generator=generator)  # [B]
    s2 = log_sigma.mul(2).exp()
    lam = (s2 + SIGMA_DATA**2) / (s2 * SIGMA_DATA**2)  # [B]
    return lam.repeat_interleave(n // rows).to(device)  # [N]


def softmax_step(head: nn.Linear, h: torch.Tensor, ids: torch.Tensor) -> Step:
    """``V``-way cross-entropy of ``head(h)`` against ``ids`` ``[N]`` (autocast runs it in float32)."""
    return lambda: F.cross_entropy(head(h), ids)  # logits [N, V]


def bits_step(head: nn.Linear, h: torch.Tensor, bits: torch.Tensor, lam: torch.Tensor, loss: str) -> Step:
    """Per-bit loss of ``head(h)`` ``[N, k]`` against ``bits`` ``[N, k]``: weighted MSE of the sigmoid, or BCE.

    The logits are upcast to float32 before the sigmoid: in bf16, ``x0_hat`` near 0 or 1 keeps 8 mantissa bits
    and ``(x0_hat - b)^2`` loses the small errors the EDM weight amplifies at low ``sigma``.
    """
    if loss == "bce":
        return lambda: F.binary_cross_entropy_with_logits(head(h).float(), bits)
    return lambda: (lam[:, None] * (head(h).float().sigmoid() - bits).square()).sum() / bits.numel()


def saved_logit_bytes(kind: str, n: int, out: int, bits_loss: str) -> tuple[int, str]:
    """Analytic bytes of the ``[N, out]`` tensors autograd keeps for backward, and what they are.

    Softmax: the float32 log-softmax (``cross_entropy`` runs in float32 under autocast; the bf16 logits are only
    transient). Bits, MSE: the float32 sigmoid output and ``x0_hat - b``; BCE: the float32 logits.
    """
    if kind == "softmax":
        return 4 * n * out, "float32 log_softmax output [N, V]"
    if bits_loss == "bce":
        return 4 * n * out, "float32 logits [N, k] (BCE-with-logits input)"
    return 8 * n * out, "float32 sigmoid output and x0_hat - b [N, k]"


# ---- measurement ----------------------------------------------------------------------------------------------
def clear_grads(head: nn.Linear, h: torch.Tensor) -> None:
    """Drop the gradients so each step allocates its own (as a training step after ``zero_grad``)."""
    head.zero_grad(set_to_none=True)
    h.grad = None


def timed(step: Step, head: nn.Linear, h: torch.Tensor, ctx: Callable[[], AbstractContextManager]) -> float:
    """Seconds of one forward + backward."""
    clear_grads(head, h)
    sync(h.device)
    start = time.perf_counter()
    with ctx():
        loss = step()
    loss.backward()
    sync(h.device)
    return time.perf_counter() - start


def time_interleaved(
    soft: HeadCase, bits: HeadCase, ctx: Callable[[], AbstractContextManager], cfg: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """Step seconds of both heads, alternating so that both see the same background load.

    Each round times the softmax head once, then the bits head until it has run as long (at most
    ``cfg.max_inner`` steps); the first ``cfg.warmup`` rounds are not kept, then at least ``cfg.repeats`` rounds
    and until the softmax head has run ``cfg.min_time`` seconds. The memory step before this warmed both heads up.
    """
    soft_times: list[float] = []
    bits_times: list[float] = []
    for i in range(cfg.warmup + cfg.max_repeats):
        t_soft = timed(*soft, ctx)
        t_bits = [timed(*bits, ctx)]
        while sum(t_bits) < t_soft and len(t_bits) < cfg.max_inner:
            t_bits.append(timed(*bits, ctx))
        if i >= cfg.warmup:
            soft_times.append(t_soft)
            bits_times.extend(t_bits)
            if len(soft_times) >= cfg.repeats and sum(soft_times) >= cfg.min_time:
                break
    return soft_times, bits_times


def profiled_bytes(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn`` under ``torch.profiler`` (``profile_memory``): its result, the net and the peak bytes allocated.

    The CPU allocator reports every allocation and free to the profiler; the running sum of their sizes, in event
    order, is the memory the window allocated on top of what existed before it.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e["ts"], e["args"].get("Ev Idx", 0), e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0  # 0: the CPU
    )
    total = peak = 0
    for *_, size in memory:
        total += size
        peak = max(peak, total)
    return result, total, peak


def measure_memory(
    step: Step, head: nn.Linear, h: torch.Tensor, ctx: Callable[[], AbstractContextManager]
) -> dict[str, Any]:
    """Bytes held after the forward and the peak of forward + backward, above the inputs, weights and targets."""
    clear_grads(head, h)
    device = h.device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with ctx():
            loss = step()
        held = torch.cuda.memory_allocated(device) - base
        loss.backward()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
    else:

        def forward() -> torch.Tensor:
            with ctx():
                return step()

        loss, held, fwd_peak = profiled_bytes(forward)
        _, _, bwd_peak = profiled_bytes(loss.backward)
        peak = max(fwd_peak, held + bwd_peak)
        method = (
            "torch.profiler(profile_memory=True): running sum of the CPU allocator's [memory] events (Bytes) over "
            "a forward window and a backward window; peak = max(forward peak, held after forward + backward peak)"
        )
    del loss
    return {"held_after_forward_bytes": held, "peak_bytes": peak, "method": method}


# ---- one configuration ----------------------------------------------------------------------------------------
def build_head(kind: str, vocab: int, width: int, cfg: argparse.Namespace, device: torch.device) -> HeadCase:
    """The step, the head and its input ``h`` ``[N, W]`` for ``softmax`` or ``bits`` at one ``(V, W)``."""
    n = cfg.batch * cfg.length
    generator = torch.Generator().manual_seed(cfg.seed)
    out = vocab if kind == "softmax" else bit_width(vocab)
    torch.manual_seed(cfg.seed)
    head = nn.Linear(width, out).to(device)
    h = torch.randn(n, width, generator=generator).to(device).requires_grad_()  # [N, W] the backbone's output
    ids = torch.randint(0, vocab, (n,), generator=generator).to(device)  # [N]
    if kind == "softmax":
        return softmax_step(head, h, ids), head, h
    lam = edm_weight(n, cfg.batch, device, generator)  # [N]
    return bits_step(head, h, ids_to_bits(ids, out), lam, cfg.bits_loss), head, h


def summarise(
    kind: str, case: HeadCase, times: list[float], memory: dict[str, Any], cfg: argparse.Namespace
) -> dict[str, Any]:
    """Parameters, FLOPs, time and memory of one head."""
    _, head, h = case
    n, width = h.shape
    out = head.out_features
    saved, saved_what = saved_logit_bytes(kind, n, out, cfg.bits_loss)
    flops = 6 * n * width * out
    median = statistics.median(times)
    return {
        "head": f"Linear({width}, {out})",
        "out_features": out,
        "params": sum(p.numel() for p in head.parameters()),
        "flops": flops,
        "time_ms_median": 1e3 * median,
        "time_ms_min": 1e3 * min(times),
        "timed_steps": len(times),
        "tokens_per_s": n / median,
        "achieved_flops_per_s": flops / median,
        "memory": {
            "saved_logits_bytes_analytic": saved,
            "saved_logits_analytic": saved_what,
            "measured_over_analytic_held": memory["held_after_forward_bytes"] / saved,
            **memory,
        },
    }


def run_config(vocab: int, width: int, cfg: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Both heads at one ``(V, W)``, timed interleaved, and the softmax / bits ratios."""

    def ctx() -> AbstractContextManager:
        return autocast(device, cfg.dtype)

    cases = {kind: build_head(kind, vocab, width, cfg, device) for kind in ("softmax", "bits")}
    memory = {kind: measure_memory(*case, ctx) for kind, case in cases.items()}  # also the first (warm-up) step
    times = time_interleaved(cases["softmax"], cases["bits"], ctx, cfg)
    soft, bits = (summarise(k, cases[k], t, memory[k], cfg) for k, t in zip(cases, times, strict=True))
    sm, bm = soft["memory"], bits["memory"]
    ratios = {
        "params": soft["params"] / bits["params"],
        "flops": soft["flops"] / bits["flops"],
        "time_median": soft["time_ms_median"] / bits["time_ms_median"],
        "time_min": soft["time_ms_min"] / bits["time_ms_min"],
        "peak_memory_measured": sm["peak_bytes"] / bm["peak_bytes"],
        "held_memory_measured": sm["held_after_forward_bytes"] / bm["held_after_forward_bytes"],
        "saved_logits_analytic": sm["saved_logits_bytes_analytic"] / bm["saved_logits_bytes_analytic"],
    }
    print(
        f"V={vocab:>6} W={width:>4}: softmax {soft['time_ms_median']:8.1f} ms, peak {sm['peak_bytes'] / 2**20:7.1f} MiB"
        f" | bits k={bits['out_features']} {bits['time_ms_median']:6.2f} ms, peak {bm['peak_bytes'] / 2**20:5.1f} MiB"
        f" | softmax/bits: time {ratios['time_median']:.0f}x (min {ratios['time_min']:.0f}x), "
        f"peak memory {ratios['peak_memory_measured']:.0f}x",
        flush=True,
    )
    return {
        "vocab": vocab,
        "width": width,
        "bits": bit_width(vocab),
        "softmax": soft,
        "bitstream": bits,
        "ratio_softmax_over_bits": ratios,
    }


# ---- main -----------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16, help="B; N = B * L tokens")
    p.add_argument("--length", type=int, default=256, help="L")
    p.add_argument("--width", type=int, nargs="+", default=[256, 768], help="hidden widths W")
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 50257], help="vocabulary sizes V")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or plain float32")
    p.add_argument("--bits-loss", choices=["mse", "bce"], default="mse", help="EDM-weighted MSE of sigmoid, or BCE")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds at least (one softmax step per round)")
    p.add_argument("--min-time", type=float, default=1.0, help="time rounds until the softmax head ran this long")
    p.add_argument("--max-repeats", type=int, default=100, help="timed rounds at most")
    p.add_argument("--max-inner", type=int, default=20, help="bits steps per round at most")
    p.add_argument("--warmup", type=int, default=0, help="untimed rounds after the memory step (itself a warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default bench/results/output_layer_<device type>.json")
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. measurement conditions)")
    return p.parse_args()


def main() -> None:
    """Run every ``(W, V)`` configuration and write the JSON."""
    cfg = parse_args()
    wall0 = time.perf_counter()
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    configs = [run_config(v, w, cfg, device) for w in cfg.width for v in cfg.vocab]
    result: dict[str, Any] = {
        "benchmark": "output_layer",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": "bfloat16 autocast (weights float32)" if cfg.dtype == "bf16" else "float32",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "batch": cfg.batch,
        "length": cfg.length,
        "tokens": cfg.batch * cfg.length,
        "step": "forward + backward (dW, db, dh) of the head and its loss; grads set to None before each step",
        "softmax_loss": "F.cross_entropy(Linear(W, V)(h), ids), random ids",
        "bits_loss": (
            "BCE with logits per bit, float32"
            if cfg.bits_loss == "bce"
            else "EDM-weighted MSE: sum lambda(sigma) (sigmoid(logit) - b)^2 / (N k), float32 after the head, "
            "lambda = (s^2 + 0.25) / (0.25 s^2), log sigma ~ N(-1.2, 1.2^2) per sequence"
        ),
        "flops_formula": FLOPS_FORMULA,
        "timing": {
            "scheme": (
                "after the memory step (the warm-up), interleaved rounds: one softmax step, then bits steps until "
                "they ran as long (<= max_inner)"
            ),
            "warmup_rounds": cfg.warmup,
            "rounds_min": cfg.repeats,
            "min_time_s": cfg.min_time,
            "max_inner": cfg.max_inner,
            "stat": "median (min also given)",
        },
        "memory_notes": (
            "saved_logits_bytes_analytic: logit-sized tensors autograd keeps for backward. "
            "held_after_forward_bytes: measured bytes allocated by the forward and still alive (everything saved "
            "for backward, incl. the bf16 copies of h and the weight under autocast). peak_bytes: measured peak of "
            "forward + backward above the inputs (h, ids/bits, weights); it includes the transient gradients of "
            "the logits and dh [N, W], dW."
        ),
        "configs": configs,
        "runtime_s": time.perf_counter() - wall0,
    }
    if cfg.note:
        result["note"] = cfg.note
    out = Path(cfg.out or f"bench/results/output_layer_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"[{result['device_name']}, {result['threads']} threads, {result['dtype']}] N = {cfg.batch} x {cfg.length}"
        f" tokens, bits loss {cfg.bits_loss}; total {result['runtime_s']:.0f} s; wrote {out}."
    )


if __name__ == "__main__":
    main()

"""Training throughput, MFU and peak memory of cdlm's objectives on one GPU, against a same-size BERT, in one process.

For each objective (masked, flow, langflow, bitstream) at the ``small`` preset (12 x 768), L 1024, bf16 autocast:
forward + backward + fused AdamW on packed rows of random token ids (V 50,257, GPT-2's vocabulary), eager and with
``model.compile=true``; tokens/s (median over timed steps and its spread), MFU against the bf16 matmul peak measured
in the same run, peak allocated memory, and the host-device syncs one training step makes (counted with
``torch.cuda.set_sync_debug_mode``). ``transformers``' ``BertForMaskedLM`` of the same size is timed on the same
batches as the reference. Results are written after every configuration, so a run cut short keeps what it measured.

    python bench/gpu_train.py [--preset small] [--seq-len 1024] [--batch-size 32] [--steps 20] [--warmup 5]
        [--objectives masked flow langflow bitstream] [--compile both|on|off] [--out bench/results/gpu_train.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdlm.device import device_name  # noqa: E402

VOCAB = 50257
FLOPS_FORMULA = "6 * N_matmul_params + 12 * depth * seq_len * width  (per token, forward + backward)"


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Mean bf16 FLOP/s of ``repeats`` ``n x n`` products after three warm-ups, timed with CUDA events."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3)


def linear_weights(module: nn.Module) -> int:
    """Weight entries of every ``nn.Linear`` (biases excluded): the matmul parameters of the FLOPs formula."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def build_objective(name: str, preset: str, compile_blocks: bool) -> nn.Module:
    """The objective as ``train.py objective=NAME model=PRESET`` builds it, with GPT-2's vocabulary size."""
    from cdlm.config import compose, instantiate

    cfg = compose([f"model={preset}", f"objective={name}", f"model.compile={str(compile_blocks).lower()}"])
    return instantiate(cfg.objective, "objective", backbone=instantiate(cfg.model, "model"), vocab_size=VOCAB)


def build_bert(width: int, depth: int, heads: int, seq_len: int) -> nn.Module:
    """``BertForMaskedLM`` of the same size (no download), dropout off, SDPA attention."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB + 1,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return BertForMaskedLM(config)


def bert_loss(model: nn.Module):
    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["input_ids"]
        t = torch.rand(x.shape[0], 1, device=x.device)
        masked = torch.rand(x.shape, device=x.device) < t
        out = model(input_ids=torch.where(masked, VOCAB, x), labels=torch.where(masked, x, -100))
        return out.loss

    return loss


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), fused=True)


def batches(n: int, batch_size: int, seq_len: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Packed rows of random ids; the mask is the broadcast all-True one DiffusionLM hands over for packed rows."""
    from cdlm.models.backbone import dense_padding

    g = torch.Generator(device).manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), device=device, generator=g)
        out.append({"input_ids": ids, "attention_mask": dense_padding(ids.shape, device)})
    return out


def time_training(model: nn.Module, loss_fn, data: list, warmup: int) -> dict[str, Any]:
    """Per-step seconds (CUDA events) of forward + backward + AdamW + zero_grad; compile happens in the warm-up."""
    model.train()
    opt = optimizer(model)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    compile_start = time.perf_counter()
    for i, batch in enumerate(data):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        if i == warmup - 1:
            torch.cuda.synchronize()
            warmup_s = time.perf_counter() - compile_start
        if i >= warmup:
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            losses.append(float(loss))
    tokens = data[0]["input_ids"].numel()
    rates = sorted(tokens / t for t in times)
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min_max": [rates[0], rates[-1]],
        "step_s_median": statistics.median(times),
        "timed_steps": len(times),
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_first_last": [losses[0], losses[-1]],
    }


def count_syncs(model: nn.Module, loss_fn, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Host-device syncs of one training step (forward, backward, AdamW), reported by CUDA's sync debug mode."""
    opt = optimizer(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # a first step outside the count: lazy state allocation
        loss_fn(batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
    return {"syncs_per_step": len(syncs), "examples": syncs[:5]}


def per_token_flops(model: nn.Module, depth: int, seq_len: int, width: int) -> int:
    return 6 * linear_weights(model) + 12 * depth * seq_len * width


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--objectives", nargs="+", default=["masked", "flow", "langflow", "bitstream"])
    p.add_argument("--compile", choices=("both", "on", "off"), default="both")
    p.add_argument("--out", default="bench/results/gpu_train.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_train.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.set_float32_matmul_precision("high")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(device)
    from cdlm.config import compose

    sizes = compose([f"model={args.preset}"]).model
    width, depth, heads = int(sizes.width), int(sizes.depth), int(sizes.heads)
    result: dict[str, Any] = {
        "benchmark": "gpu_train",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "preset": args.preset,
        "model": {"width": width, "depth": depth, "heads": heads},
        "vocab_size": VOCAB,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "precision": "bf16 autocast, float32 weights and fused AdamW state, TF32 matmuls for float32",
        "data": "random token ids, packed rows (no padding)",
        "peak_bf16_flops_measured": peak,
        "flops_formula": FLOPS_FORMULA,
        "load_average": os.getloadavg(),
        "runs": {},
    }

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    data = batches(args.warmup + args.steps, args.batch_size, args.seq_len, device)
    bert = build_bert(width, depth, heads, args.seq_len).to(device)
    run = time_training(bert, bert_loss(bert), data, args.warmup)
    run["flops_per_token"] = per_token_flops(bert, depth, args.seq_len, width)
    run["mfu"] = run["tokens_per_s"] * run["flops_per_token"] / peak
    result["runs"]["bert"] = run
    del bert
    torch.cuda.empty_cache()
    save()
    print(f"bert: {run['tokens_per_s']:,.0f} tok/s, MFU {run['mfu']:.1%}", flush=True)

    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    for compiled in modes:
        for name in args.objectives:
            key = f"{name}{'+compile' if compiled else ''}"
            try:
                torch.manual_seed(0)
                objective = build_objective(name, args.preset, compiled).to(device)
                loss_fn = lambda batch, objective=objective: objective.loss(batch).loss  # noqa: E731
                run = time_training(objective, loss_fn, data, args.warmup)
                run["flops_per_token"] = per_token_flops(objective, depth, args.seq_len, width)
                run["mfu"] = run["tokens_per_s"] * run["flops_per_token"] / peak
                run["ratio_to_bert"] = run["tokens_per_s"] / result["runs"]["bert"]["tokens_per_s"]
                if not compiled:
                    run["syncs"] = count_syncs(objective, loss_fn, data[0])
                del objective
            except Exception as err:  # noqa: BLE001 - one configuration failing must not lose the others
                run = {"error": f"{type(err).__name__}: {err}"[:2000]}
            torch.cuda.empty_cache()
            result["runs"][key] = run
            save()
            if "error" in run:
                print(f"{key}: {run['error'][:300]}", flush=True)
            else:
                print(
                    f"{key}: {run['tokens_per_s']:,.0f} tok/s ({run['ratio_to_bert']:.2f}x BERT), MFU "
                    f"{run['mfu']:.1%}, peak {run['peak_memory_gib']:.1f} GiB, warm-up {run['warmup_s']:.0f} s"
                    + (f", syncs/step {run['syncs']['syncs_per_step']}" if "syncs" in run else ""),
                    flush=True,
                )
    result["load_average_after"] = os.getloadavg()
    save()
    if not math.isfinite(peak):
        raise SystemExit("matmul peak not finite")


if __name__ == "__main__":
    main()

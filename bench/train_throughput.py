"""Training throughput and MFU of cdlm's masked diffusion objective against a plain ``transformers`` BERT MLM.

In one process: (1) the device's bf16 (and fp32) matmul peak, (2) tokens/s of forward + backward + AdamW for
``MaskedDiffusion`` built from cdlm's configs, (3) tokens/s of a same-sized ``BertForMaskedLM`` trained on the same
batches with a matching MLM recipe (t ~ U(0, 1) masked fraction per row), (4) MFU of both. Writes one JSON file.

Repeated ``--repeats`` times (the two models' order alternating), each repetition against the peak measured just
before it; the JSON holds every repetition, their median and spread, and the load average before and after.

    python bench/train_throughput.py [--preset small-cpu] [--seq-len 256] [--batch-size 16] [--steps 8]
        [--warmup 3] [--repeats 3] [--compile on|off] [--attention auto|sdpa|matmul] [--device auto]
        [--out bench/results/train_throughput_cpu.json]
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
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdlm.device import device_name
from cdlm.device import synchronize as sync

VOCAB = 2048  # the quickstart's BPE vocabulary
LR, WEIGHT_DECAY, BETAS = 1e-3, 0.1, (0.9, 0.98)  # cdlm's defaults (configs/config.yaml, module)
FLOPS_FORMULA = "6 * N_matmul_params + 12 * depth * seq_len * width  (per token, forward + backward)"

Batch = dict[str, torch.Tensor]


# ---- device helpers -------------------------------------------------------------------------------------------
def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on the given device type."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_matmul_flags() -> list[str]:
    """The CPU's bf16/AMX/AVX-512 matmul-relevant feature flags (empty where /proc/cpuinfo is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = ("amx", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")
    return sorted(f for f in flags if f.startswith(wanted))


# ---- 1. matmul peak -------------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 3) -> dict[str, Any]:
    """Best achieved FLOP/s of square ``n x n`` matmuls (after one warm-up) over ``sizes``."""
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)  # warm-up
        sync(device)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            sync(device)
            best = min(best, time.perf_counter() - start)
        per_size[str(n)] = 2 * n**3 / best
        del a, b, out
    return {"flops": max(per_size.values()), "per_size_flops": per_size, "repeats": repeats}


# ---- batches --------------------------------------------------------------------------------------------------
def make_batches(n: int, batch_size: int, seq_len: int, seed: int) -> tuple[list[Batch], str]:
    """``n`` batches from the embedded corpus with the BPE tokenizer, or random ids if that fails."""
    try:
        from cdlm.data.datamodule import TextDataModule

        dm = TextDataModule(tokenizer="bpe", vocab_size=VOCAB, seq_len=seq_len, batch_size=batch_size, seed=seed)
        dm.prepare_tokenizer()
        dm.setup("fit")
        batches: list[Batch] = []
        while len(batches) < n:
            for batch in dm.train_dataloader():
                batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].bool()})
                if len(batches) == n:
                    break
        source = f"shakespeare corpus, BPE tokenizer (vocab {dm.tokenizer.vocab_size})"
        if dm.tokenizer.vocab_size > VOCAB:
            raise ValueError(f"tokenizer vocab {dm.tokenizer.vocab_size} exceeds {VOCAB}")
        return batches, source
    except Exception as err:  # noqa: BLE001 - any data problem falls back to random ids
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, VOCAB, (batch_size, seq_len), generator=g) for _ in range(n)]
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool)
        return [{"input_ids": x, "attention_mask": mask} for x in ids], f"random ids ({type(err).__name__}: {err})"


# ---- models ---------------------------------------------------------------------------------------------------
def build_cdlm(preset: str, overrides: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """``MaskedDiffusion`` over the preset's backbone with ``overrides``, built as the toolkit does from its configs."""
    from cdlm.config import compose, instantiate

    cfg = compose([f"model={preset}", *overrides])
    backbone = instantiate(cfg.model)
    objective = instantiate(cfg.objective, backbone=backbone, vocab_size=VOCAB)
    sizes = {k: int(cfg.model[k]) for k in ("width", "depth", "heads", "mlp_ratio")}
    return objective, sizes


def build_bert(sizes: dict[str, Any], seq_len: int) -> nn.Module:
    """A same-sized ``BertForMaskedLM`` from a config (no download), dropout off, SDPA attention."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB + 1,  # + [MASK]
        hidden_size=sizes["width"],
        num_hidden_layers=sizes["depth"],
        num_attention_heads=sizes["heads"],
        intermediate_size=sizes["mlp_ratio"] * sizes["width"],
        max_position_embeddings=seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return BertForMaskedLM(config)


def linear_weights(modules: list[nn.Module]) -> int:
    """Number of weight entries of the ``nn.Linear`` layers in ``modules`` (biases excluded)."""
    seen: set[int] = set()
    total = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                total += m.weight.numel()
    return total


def optimizer_for(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """cdlm's AdamW (``cdlm.optim.adamw``, as ``DiffusionLM.configure_optimizers`` builds it: no decay on parameters
    of rank < 2, the fused kernel on CPUs and GPUs), for both models: the step compared is the model's."""
    from cdlm.optim import FUSED_ADAMW, adamw

    return adamw(model.parameters(), LR, WEIGHT_DECAY, BETAS, fused=device.type in FUSED_ADAMW)


def cdlm_loss(objective: nn.Module) -> Callable[[Batch], tuple[torch.Tensor, float]]:
    """The diffusion objective's training loss and its masked fraction, with its noise drawn per global row as a
    training step draws it (``cdlm.draws.row_draws``, one generator per row)."""
    from cdlm.draws import row_draws

    steps = iter(range(1 << 62))

    def loss(batch: Batch) -> tuple[torch.Tensor, float]:
        rows = list(range(batch["input_ids"].shape[0]))
        with row_draws(0, next(steps), 0, rows, batch["input_ids"].device):
            out = objective.loss(batch)
        return out.loss, out.logs["masked_fraction"]

    return loss


def bert_loss(model: nn.Module, mask_id: int) -> Callable[[Batch], tuple[torch.Tensor, float]]:
    """Standard MLM with cdlm's masking: t ~ U(0, 1) per row, each valid token masked with probability t."""

    def loss(batch: Batch) -> tuple[torch.Tensor, float]:
        x, padding = batch["input_ids"], batch["attention_mask"]
        t = torch.rand(x.shape[0], 1, device=x.device)
        masked = (torch.rand(x.shape, device=x.device) < t) & padding
        inputs = torch.where(masked, mask_id, x)
        labels = torch.where(masked, x, -100)
        out = model(input_ids=inputs, attention_mask=padding.long(), labels=labels)
        return out.loss, masked.sum() / padding.sum().clamp_min(1)

    return loss


# ---- 2./3. training throughput --------------------------------------------------------------------------------
def train_throughput(
    model: nn.Module,
    loss_fn: Callable[[Batch], tuple[torch.Tensor, float]],
    batches: list[Batch],
    warmup: int,
    device: torch.device,
) -> dict[str, Any]:
    """Time forward + backward + AdamW step + zero_grad per batch; the first ``warmup`` batches are not timed."""
    model.to(device).train()
    opt = optimizer_for(model, device)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    losses, fractions = [], []
    tokens = 0
    for i, cpu_batch in enumerate(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss, fraction = loss_fn(batch)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                phases[name].append(dt)
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(loss.detach()))
            fractions.append(float(fraction))
    total = sum(phases["step"])
    return {
        "tokens_per_s": tokens / total,
        "timed_steps": len(phases["step"]),
        "timed_tokens": tokens,
        "total_s": total,
        "step_s_median": statistics.median(phases["step"]),
        "step_s_min": min(phases["step"]),
        "step_s_max": max(phases["step"]),
        "phase_s_mean": {k: statistics.fmean(v) for k, v in phases.items() if k != "step"},
        "loss_first_last": [losses[0], losses[-1]],
        "masked_fraction_mean": statistics.fmean(fractions),
    }


def flops_per_token(n_matmul: int, depth: int, seq_len: int, width: int) -> int:
    """Model FLOPs per trained token: ``6 N + 12 depth L width``."""
    return 6 * n_matmul + 12 * depth * seq_len * width


# ---- main -----------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small-cpu", help="cdlm model preset (cdlm/configs/model/*.yaml)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed training steps per model and repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing, per repetition")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of (peak, cdlm, BERT), order alternating")
    p.add_argument("--compile", choices=("on", "off"), default="on", help="cdlm's model.compile (regional)")
    p.add_argument("--attention", choices=("auto", "sdpa", "matmul"), default="auto", help="cdlm's model.attention")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/train_throughput_cpu.json")
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. measurement conditions)")
    return p.parse_args()


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    """Run the benchmark and write the JSON."""
    args = parse_args()
    wall0 = time.perf_counter()
    load_before = os.getloadavg()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    L, B = args.seq_len, args.batch_size
    sizes_mm = (2048, 4096, 8192) if device.type == "cuda" else (2048, 4096)
    batches, data_source = make_batches(args.warmup + args.steps, B, L, args.seed)

    overrides = [f"model.compile={args.compile == 'on'}", f"model.attention={args.attention}"]
    objective, sizes = build_cdlm(args.preset, overrides)
    width, depth = sizes["width"], sizes["depth"]
    cdlm_ada = linear_weights([m for name, m in objective.backbone.named_modules() if name.endswith("ada")])
    cdlm_head = objective.head.weight.numel()
    cdlm_n = linear_weights([objective.backbone]) + cdlm_head
    cdlm_params = sum(p.numel() for p in objective.parameters())
    bert = build_bert(sizes, L)
    bert_head = bert.cls.predictions.decoder.weight.numel()
    bert_n = linear_weights([bert.bert.encoder, bert.cls])
    bert_params = sum(p.numel() for p in bert.parameters())  # the decoder is tied to the word embeddings
    cdlm_fpt, bert_fpt = flops_per_token(cdlm_n, depth, L, width), flops_per_token(bert_n, depth, L, width)

    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        peak_bf16 = matmul_peak(device, torch.bfloat16, sizes_mm, repeats=10 if device.type == "cuda" else 3)
        peak_fp32 = matmul_peak(device, torch.float32, sizes_mm, repeats=10 if device.type == "cuda" else 2)
        order = ("cdlm", "bert") if rep % 2 == 0 else ("bert", "cdlm")
        res: dict[str, dict[str, Any]] = {}
        for name in order:
            torch.manual_seed(args.seed + rep)
            if name == "cdlm":
                res[name] = train_throughput(objective, cdlm_loss(objective), batches, args.warmup, device)
            else:
                res[name] = train_throughput(bert, bert_loss(bert, VOCAB), batches, args.warmup, device)
        peak = peak_bf16["flops"]
        # What cdlm executes: adaLN linears once per sequence, the head only on masked positions (on a CPU).
        executed_n = cdlm_n - cdlm_ada - cdlm_head + cdlm_ada / L + cdlm_head * res["cdlm"]["masked_fraction_mean"]
        for name, fpt in (("cdlm", cdlm_fpt), ("bert", bert_fpt)):
            res[name]["model_flops_per_s"] = res[name]["tokens_per_s"] * fpt
            res[name]["mfu"] = res[name]["model_flops_per_s"] / peak
        executed_fpt = flops_per_token(round(executed_n), depth, L, width)
        res["cdlm"]["mfu_executed"] = res["cdlm"]["tokens_per_s"] * executed_fpt / peak
        runs.append(
            {
                "order": list(order),
                "peak_bf16_flops": peak,
                "peak_bf16": peak_bf16,
                "peak_fp32_flops": peak_fp32["flops"],
                "cdlm": res["cdlm"],
                "bert": res["bert"],
                "ratio_cdlm_over_bert": res["cdlm"]["tokens_per_s"] / res["bert"]["tokens_per_s"],
                "load_average_after": list(os.getloadavg()),
            }
        )
        print(
            f"repetition {rep + 1}/{args.repeats}: peak {peak / 1e9:.0f} GFLOP/s bf16; cdlm "
            f"{res['cdlm']['tokens_per_s']:.0f} tok/s (MFU {res['cdlm']['mfu']:.1%}), BERT "
            f"{res['bert']['tokens_per_s']:.0f} tok/s (MFU {res['bert']['mfu']:.1%}), ratio "
            f"{runs[-1]['ratio_cdlm_over_bert']:.2f}; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    import lightning
    import transformers

    summary = {
        "cdlm_tokens_per_s": spread([r["cdlm"]["tokens_per_s"] for r in runs]),
        "bert_tokens_per_s": spread([r["bert"]["tokens_per_s"] for r in runs]),
        "ratio_cdlm_over_bert": spread([r["ratio_cdlm_over_bert"] for r in runs]),
        "cdlm_mfu": spread([r["cdlm"]["mfu"] for r in runs]),
        "cdlm_mfu_executed": spread([r["cdlm"]["mfu_executed"] for r in runs]),
        "bert_mfu": spread([r["bert"]["mfu"] for r in runs]),
        "peak_bf16_flops": spread([r["peak_bf16_flops"] for r in runs]),
    }
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_flags": cpu_matmul_flags() if device.type == "cpu" else None,
        "threads": torch.get_num_threads(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "dtype": "bfloat16 autocast (weights and optimizer state float32)",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
        },
        "preset": args.preset,
        "cdlm_settings": overrides,
        "model": sizes,
        "vocab_size": VOCAB,
        "seq_len": L,
        "batch_size": B,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "data": data_source,
        "optimizer": {
            "name": "AdamW",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "betas": list(BETAS),
            "fused": device.type in ("cuda", "cpu"),
        },
        "step": "forward (autocast) + backward + AdamW step + zero_grad",
        "flops_formula": FLOPS_FORMULA,
        "flops_notes": (
            "N_matmul_params = weights of nn.Linear layers (biases, embeddings, norms excluded) plus the output "
            "head. cdlm: all backbone Linears incl. adaLN modulation + objective.head; BERT: encoder Linears + "
            "MLM transform dense + decoder (tied to the embeddings, counted as head). `mfu` counts cdlm's head at "
            "the full per-token rate and its adaLN linears per token, for comparability; on a CPU cdlm computes "
            "the head only on masked positions (~half) and the adaLN linears once per sequence, which "
            "`mfu_executed` accounts for. BERT computes its head on every position. MFU of each repetition is "
            "against the peak measured in that repetition."
        ),
        "cdlm": {
            "objective": "cdlm.objectives.masked.MaskedDiffusion",
            "params": cdlm_params,
            "n_matmul_params": cdlm_n,
            "n_adaln_params": cdlm_ada,
            "n_head_params": cdlm_head,
            "flops_per_token": cdlm_fpt,
        },
        "bert": {
            "model": "transformers.BertForMaskedLM (sdpa, dropout 0, eager), MLM, t ~ U(0,1) masked fraction per row",
            "params": bert_params,
            "n_matmul_params": bert_n,
            "n_head_params": bert_head,
            "flops_per_token": bert_fpt,
        },
        "summary": summary,
        "runs": runs,
        "runtime_s": time.perf_counter() - wall0,
    }
    if args.note:
        result["note"] = args.note
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    def fmt(key: str, scale: float = 1.0, spec: str = ".0f") -> str:
        s = summary[key]
        return f"{s['median'] * scale:{spec}} [{s['min'] * scale:{spec}}, {s['max'] * scale:{spec}}]"

    print(
        f"[{result['device_name']}, {result['threads']} threads, bf16 autocast, load {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after] {args.repeats} repetitions, median [min, max]: peak "
        f"{fmt('peak_bf16_flops', 1e-9)} GFLOP/s; {args.preset} ({depth}x{width}), B={B}, L={L}, cdlm "
        f"{' '.join(overrides)}: {fmt('cdlm_tokens_per_s')} tok/s, MFU {fmt('cdlm_mfu', 100, '.1f')}% (executed "
        f"{fmt('cdlm_mfu_executed', 100, '.1f')}%); BertForMaskedLM {fmt('bert_tokens_per_s')} tok/s, MFU "
        f"{fmt('bert_mfu', 100, '.1f')}%; ratio cdlm/bert {fmt('ratio_cdlm_over_bert', 1, '.2f')}. "
        f"Total {result['runtime_s']:.0f} s; wrote {out}."
    )


if __name__ == "__main__":
    main()

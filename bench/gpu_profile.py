"""Where a training step's GPU time goes: ``torch.profiler`` tables of cdlm's objectives and a same-size BERT.

Three warm-up and three profiled steps of ``bench/gpu_train.py``'s loop per model (12 x 768, L 1024, B 32, bf16,
V 50,257); the kernels sorted by their CUDA time, one text table per model.

    python bench/gpu_profile.py [--objectives masked bitstream] [--out-dir bench/results/gpu_profile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train as bench  # noqa: E402


def profile_steps(model: torch.nn.Module, loss_fn, data: list, warmup: int = 3) -> str:
    """The kernel table (top 40 by CUDA time) of ``len(data) - warmup`` training steps."""
    opt = bench.optimizer(model)

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in data[:warmup]:
        step(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in data[warmup:]:
            step(batch)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objectives", nargs="+", default=["masked", "bitstream"])
    p.add_argument("--out-dir", default="bench/results/gpu_profile")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda")
    data = bench.batches(6, 32, 1024, device)
    bert = bench.build_bert(768, 12, 12, 1024).to(device)
    (out / "bert.txt").write_text(profile_steps(bert, bench.bert_loss(bert), data))
    del bert
    for name in args.objectives:
        objective = bench.build_objective(name, "small", False).to(device)
        table = profile_steps(objective, lambda b, o=objective: o.loss(b).loss, data)
        (out / f"{name}.txt").write_text(table)
        print(name, table[:3000], flush=True)
        del objective
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

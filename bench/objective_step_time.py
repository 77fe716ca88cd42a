"""Training step time of each objective at one model size, in one process (same batches, same load).

    python bench/objective_step_time.py                       # quickstart size: 4 x 256, BPE 2048, B 32, L 256
    python bench/objective_step_time.py --experiments quickstart flow_quickstart --steps 3

Writes ``bench/results/objective_step_time_cpu.json``: seconds per training step (forward + backward + AdamW, bf16
autocast) of every experiment's objective, and each one's ratio to the first (masked diffusion by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cdlm.config import compose, instantiate
from cdlm.device import device_name


def step_seconds(experiment: str, batch_size: int, seq_len: int, vocab: int, steps: int) -> float:
    """Median seconds per training step of ``experiment``'s objective on random ids (after one warm-up step)."""
    cfg = compose([f"experiment={experiment}"])
    torch.manual_seed(0)
    objective = instantiate(cfg.objective, backbone=instantiate(cfg.model), vocab_size=vocab)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective.loss({**batch, "u": torch.rand(batch_size)}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["quickstart", "flow_quickstart", "langflow_quickstart"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/objective_step_time_cpu.json"))
    args = parser.parse_args()
    seconds = {e: step_seconds(e, args.batch_size, args.seq_len, args.vocab, args.steps) for e in args.experiments}
    first = seconds[args.experiments[0]]
    result = {
        "benchmark": "objective_step_time",
        "device": f"cpu ({device_name('cpu')})",
        "threads": torch.get_num_threads(),
        "dtype": "bfloat16 autocast",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "vocab": args.vocab,
        "seconds_per_step": seconds,
        "ratio_to_first": {e: s / first for e, s in seconds.items()},
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["seconds_per_step"], indent=2), json.dumps(result["ratio_to_first"], indent=2))


if __name__ == "__main__":
    main()

"""Autoregressive sampling with and without the KV cache, at the quickstart model size, bf16 autocast on CPU.

In one process: build ``Autoregressive`` from ``compose(["experiment=ar_quickstart"])`` (4 x 256, vocabulary 2048,
random init), draw ``n`` sequences of ``length`` tokens with the registered ``autoregressive`` sampler once with
the cache (one new position per network call) and once without (the whole prefix per call), under one seed,
assert the samples are identical, and report seconds per sample, tokens/s and the speed-up. Writes one JSON file.

    python bench/ar_kv_cache.py [--n 4] [--length 256] [--seed 0] [--out bench/results/ar_kv_cache_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cdlm.config import compose, instantiate
from cdlm.device import device_name
from cdlm.samplers import get_sampler

VOCAB = 2048  # the quickstart's BPE vocabulary


def timed_sample(objective: torch.nn.Module, n: int, length: int, seed: int, cache: bool) -> tuple[torch.Tensor, float]:
    """Samples ``[n, length]`` of the ``autoregressive`` sampler (temperature 1) and the wall time in seconds."""
    spec = get_sampler("autoregressive", objective)
    generator = torch.Generator().manual_seed(seed)
    x = objective.prior(n, length, torch.device("cpu"))
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = spec.fn(objective, x, spec.grid(1, "cpu"), generator=generator, cache=cache)
    return out, time.perf_counter() - start


def run(n: int, length: int, seed: int) -> dict[str, Any]:
    """Time both paths after a short warm-up; fail if their samples differ."""
    cfg = compose(["experiment=ar_quickstart"])
    torch.manual_seed(seed)
    objective = instantiate(cfg.objective, backbone=instantiate(cfg.model), vocab_size=VOCAB).eval()
    for cache in (True, False):  # warm-up: kernels, allocator
        timed_sample(objective, n, 8, seed, cache)
    cached, t_cached = timed_sample(objective, n, length, seed, cache=True)
    full, t_full = timed_sample(objective, n, length, seed, cache=False)
    if not torch.equal(cached, full):
        raise AssertionError("KV-cached samples differ from the full-prefix samples under the same seed")
    return {
        "model": {"width": cfg.model.width, "depth": cfg.model.depth, "heads": cfg.model.heads, "vocab_size": VOCAB},
        "parameters": sum(p.numel() for p in objective.parameters()),
        "n": n,
        "length": length,
        "seed": seed,
        "sampler": {"name": "autoregressive", "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "network_calls": length,
        "outputs_equal": True,
        "cached": {"seconds": t_cached, "seconds_per_sample": t_cached / n, "tokens_per_s": n * length / t_cached},
        "uncached": {"seconds": t_full, "seconds_per_sample": t_full / n, "tokens_per_s": n * length / t_full},
        "speedup": t_full / t_cached,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ar_kv_cache_cpu.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.n, args.length, args.seed)
    result.update(
        device=f"cpu ({device_name('cpu')})",
        dtype="bfloat16 autocast (float64 categorical draws)",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        runtime_s=time.perf_counter() - start,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    c, u = result["cached"], result["uncached"]
    print(
        f"AR sampling, {result['parameters'] / 1e6:.2f} M parameters, n={args.n} x L={args.length}, bf16 autocast on "
        f"{result['device']}, torch {torch.__version__}, {result['threads']} threads: KV cache "
        f"{c['seconds_per_sample']:.2f} s/sample ({c['tokens_per_s']:.0f} tokens/s), full prefix "
        f"{u['seconds_per_sample']:.2f} s/sample ({u['tokens_per_s']:.0f} tokens/s), speed-up "
        f"{result['speedup']:.1f}x; identical samples. Wrote {args.out}."
    )


if __name__ == "__main__":
    main()

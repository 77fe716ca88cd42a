"""Fast-dLLM's block caches, dKV-Cache's delayed cache and FreeCache's window against full passes: seconds per
sample, speed-up and deviation, bf16 autocast on CPU.

In one process: a masked diffusion model (``--path`` a trained run's ``final/``; without it the quickstart's
``MaskedDiffusion`` at random init, whose deviation means little), semi-autoregressive blocks of ``--block`` with the
top-k selector and ``L / 2`` steps; for each length in ``--lengths``, ``n`` samples under one seed with ``kv_cache``
none, prefix, dual, delayed (``kv_refresh`` 8) and window (``kv_window`` 32), repeated ``--repeats`` times (the
fastest kept), the load average before and after. Deviation of a cache: along its own trajectory, every cached pass
is also scored by a full pass, and the KL of the full pass's rows from the cached ones on the masked positions fed
is averaged (nats per position), with the max abs difference of log-probabilities; and the fraction of tokens equal
to the uncached run's under the same seed. Writes one JSON file (docs/sampling.md, "Block caches").

    python bench/block_cache.py [--path runs/quickstart/final] [--lengths 256 1024] [--n 2] [--caches prefix dual]
        [--out bench/results/block_cache_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cdlm.config import compose, instantiate
from cdlm.device import device_name
from cdlm.samplers.parallel import sample_parallel

VOCAB = 2048  # the quickstart's BPE vocabulary


CACHES = ("none", "prefix", "dual", "delayed", "window")


class Deviation:
    """Wraps ``objective.denoise_span`` and ``denoise_positions``: every cached pass after a full one is also scored
    by a full pass."""

    def __init__(self, objective: torch.nn.Module) -> None:
        self.objective, self.kl, self.max_abs, self.passes = objective, 0.0, 0.0, 0
        self.span, self.positions = objective.denoise_span, objective.denoise_positions

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cache, span: slice) -> torch.Tensor:
        out = self.span(z, t, cache, span)  # [B, n, V]
        if span.start == 0 and span.stop == z.shape[1]:
            return out
        index = torch.arange(span.start, span.stop, device=z.device).expand(z.shape[0], -1)
        self.measure(z, t, index, out)
        return out

    def at(self, z: torch.Tensor, t: torch.Tensor, cache, index: torch.Tensor) -> torch.Tensor:
        out = self.positions(z, t, cache, index)  # [B, m, V]
        self.measure(z, t, index, out)
        return out

    def measure(self, z: torch.Tensor, t: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
        """Accumulate the KL of the full pass's rows at ``index`` ``[B, m]`` from the cached ones ``out``."""
        full = self.objective.denoise(z, t).gather(1, index[..., None].expand(-1, -1, out.shape[-1])).float()
        masked = z.gather(1, index) == self.objective.mask_id  # [B, m]
        if masked.any():
            p, q = full[masked], out.float()[masked]  # [N, V] log-probabilities
            self.kl += float((p.exp() * (p - q)).sum(-1).mean())
            self.max_abs = max(self.max_abs, float((p - q).abs().max()))
            self.passes += 1


def timed(objective, n: int, length: int, block: int, seed: int, kv_cache: str) -> tuple[torch.Tensor, float]:
    """Samples ``[n, length]`` and their wall seconds."""
    x = objective.prior(n, length, torch.device("cpu"))
    ts = torch.linspace(1, 0, length // 2 + 1)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample_parallel(
            objective, x, ts, generator=torch.Generator().manual_seed(seed), block_length=block, kv_cache=kv_cache
        )
    return out, time.perf_counter() - start


def deviation(objective, n: int, length: int, block: int, seed: int, kv_cache: str) -> dict[str, float]:
    """The cache's mean KL and max abs log-probability difference from full passes along its own trajectory."""
    probe = Deviation(objective)
    objective.denoise_span, objective.denoise_positions = probe, probe.at
    try:
        timed(objective, n, length, block, seed, kv_cache)
    finally:
        del objective.denoise_span, objective.denoise_positions
    return {"kl_nats_mean": probe.kl / max(probe.passes, 1), "max_abs_logp": probe.max_abs, "passes": probe.passes}


def build(path: str | None, seed: int) -> tuple[torch.nn.Module, str]:
    """The model to measure and where it came from."""
    if path:
        from cdlm import load

        return load(path, device="cpu").objective.eval(), path
    cfg = compose(["experiment=quickstart"])
    torch.manual_seed(seed)
    model = instantiate(cfg.objective, backbone=instantiate(cfg.model), vocab_size=VOCAB).eval()
    return model, "random init (experiment=quickstart)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    objective, source = build(args.path, args.seed)
    timed(objective, args.n, 2 * args.block, args.block, args.seed, "dual")  # warm-up
    rows = []
    for length in args.lengths:
        seconds, samples = {}, {}
        for cache in ("none", *args.caches):
            runs = [timed(objective, args.n, length, args.block, args.seed, cache) for _ in range(args.repeats)]
            samples[cache], seconds[cache] = runs[0][0], min(t for _, t in runs)
        row: dict[str, Any] = {"length": length, "steps": length // 2, "seconds_per_sample": {}}
        for cache in ("none", *args.caches):
            row["seconds_per_sample"][cache] = seconds[cache] / args.n
            if cache != "none":
                row[cache] = {
                    "speedup": seconds["none"] / seconds[cache],
                    "tokens_equal_to_uncached": float((samples[cache] == samples["none"]).float().mean()),
                    **deviation(objective, args.n, length, args.block, args.seed, cache),
                }
        rows.append(row)
        print(json.dumps(row))
    return {"model": source, "parameters": sum(p.numel() for p in objective.parameters()), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caches", nargs="+", default=list(CACHES[1:]), choices=CACHES[1:])
    parser.add_argument("--out", type=Path, default=Path("bench/results/block_cache_cpu.json"))
    args = parser.parse_args()
    load_before, start = os.getloadavg(), time.perf_counter()
    result = run(args)
    result.update(
        sampler={"name": "parallel", "selector": "topk", "block_length": args.block, "steps": "L / 2", "kv_refresh": 8},
        n=args.n,
        repeats=args.repeats,
        seed=args.seed,
        device=f"cpu ({device_name('cpu')})",
        dtype="bfloat16 autocast",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        runtime_s=time.perf_counter() - start,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Sampler overhead: the wall time of each sampler against the network evaluations it makes, in one process.

For every sampler preset in ``cdlm/configs/sampler/`` and every objective it fits (masked, flow, langflow,
bitstream, flow map, autoregressive; quickstart-size networks, ``model=mini``, V 2048, randomly initialised: the
cost of a step does not depend on the weights), ``generate`` draws B x L tokens; the objective's network methods are
timed from outside (outermost call only) and counted. Reported per configuration (median of ``--repeats`` runs after
one warm-up):

- ``overhead``: ``wall / (NFE x one forward) - 1``, where one forward is the median time of the first network call
  of the run repeated alone on the same inputs (for the autoregressive sampler, whose calls grow with its KV cache,
  the time measured inside its calls instead);
- ``overhead_inside``: ``wall / time inside the network calls - 1``: the per-step work around the network.

    python bench/sampler_overhead.py [--batch-size 8] [--length 256] [--steps 64] [--dtype auto|fp32|bf16]
        [--repeats 3] [--only PATTERN ...] [--malloc default|steady]
        [--out bench/results/sampler_overhead_cpu.json]

``--only`` restricts the run to the configurations ``preset/objective`` matching any of the shell patterns given
(e.g. ``--only 'churn/*' heun/flow``), to iterate on a few samplers; the definitions above are unchanged.
``--malloc steady`` fixes glibc's allocator policy for the process (``mallopt``: mmap threshold 32 MiB, no trimming of
the heap, 256 MiB top pad): under the default, dynamic policy, whether a large temporary of the network reuses heap
pages or faults in fresh ones depends on the allocation history, and the page faults move a forward's time by tens of
percent between runs (the first call repeated alone included). The default leaves the allocator as it is.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdlm.device import device_name, synchronize  # noqa: E402

VOCAB = 2048
OBJECTIVES = ("masked", "flow", "langflow", "bitstream", "flow_map", "autoregressive")
NETWORK = ("denoise", "flow_denoise", "denoise_projected", "flow_denoise_projected", "next_logits", "logits")


class NetworkTimer:
    """Wraps an objective's network methods: counts and times the outermost calls, keeps the first call's inputs."""

    def __init__(self, objective: torch.nn.Module, device: torch.device) -> None:
        self.device, self.depth, self.calls, self.inside, self.first = device, 0, 0, 0.0, None
        self.originals = {}
        for name in NETWORK:
            method = getattr(objective, name, None)
            if callable(method):
                self.originals[name] = method
                setattr(objective, name, self.wrap(name, method))

    def wrap(self, name: str, method):
        def timed(*args, **kwargs):
            if self.depth:
                return method(*args, **kwargs)
            self.depth += 1
            synchronize(self.device)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.inside += time.perf_counter() - start
                self.calls += 1
                self.depth -= 1
                if self.first is None:
                    self.first = (name, args, kwargs)

        return timed

    def reset(self) -> None:
        self.calls, self.inside, self.first = 0, 0.0, None

    def one_forward(self, repeats: int = 10) -> float:
        """Median seconds of the first recorded call, repeated alone on the same inputs."""
        name, args, kwargs = self.first
        method, times = self.originals[name], []
        with torch.no_grad():
            for _ in range(repeats):
                synchronize(self.device)
                start = time.perf_counter()
                method(*args, **kwargs)
                synchronize(self.device)
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def steady_malloc() -> bool:
    """Fix glibc's malloc policy (``--malloc steady``); whether it applied (False off glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # mallopt parameters (malloc.h)
    settings = ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 << 20))
    return all(bool(libc.mallopt(param, value)) for param, value in settings)


def build(objective: str, device: torch.device):
    """A ``DiffusionLM`` with the quickstart's network size and a byte tokenizer's decode (for ``generate``)."""
    from cdlm.checkpoint import build_module
    from cdlm.config import compose, to_dict

    class Tokenizer:  # generate decodes ids; the benchmark does not look at the texts
        vocab_size = VOCAB

        def decode(self, ids: list[int]) -> str:
            return ""

    cfg = compose(["model=mini", f"objective={objective}", "data.seq_len=256"])
    module = build_module(to_dict(cfg), Tokenizer(), inputs=False)  # random weights: no teacher or VAE is read
    return module.to(device).eval()


def presets() -> dict[str, dict[str, Any]]:
    """The sampler presets of ``cdlm/configs/sampler/*.yaml`` as ``{preset: {name, steps, knobs}}``."""
    from cdlm.config import group_options, load_group, sampler_knobs

    out = {}
    for preset in group_options("sampler"):
        node = load_group("sampler", preset)  # a preset's ``defaults`` filled in from its base
        out[preset] = {"name": str(node.name), "steps": int(node.steps), "knobs": sampler_knobs(node)}
    return out


def measure(module, preset: dict[str, Any], args, dtype: torch.dtype | None, device: torch.device) -> dict:
    timer = NetworkTimer(module.objective, device)
    steps = min(preset["steps"], args.steps)
    cached = preset["name"] == "autoregressive"  # its calls grow with the cache: the reference is inside time
    walls, insides, calls, forwards = [], [], [], []
    for repeat in range(args.repeats + 1):
        timer.reset()
        synchronize(device)
        start = time.perf_counter()
        module.generate(
            args.batch_size, args.length, preset["name"], steps, seed=repeat, dtype=dtype, **preset["knobs"]
        )
        synchronize(device)
        wall = time.perf_counter() - start
        if repeat:  # the first run warms up
            walls.append(wall)
            insides.append(timer.inside)
            calls.append(timer.calls)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                forwards.append(float("nan") if cached else timer.one_forward())
    wall, inside, nfe, forward = (statistics.median(v) for v in (walls, insides, calls, forwards))
    reference = inside if cached else nfe * forward
    return {
        "steps": steps,
        "nfe": nfe,
        "wall_s": wall,
        "wall_s_all": walls,
        "inside_network_s": inside,
        "one_forward_s": None if cached else forward,
        "reference_s": reference,
        "overhead": wall / reference - 1,
        "overhead_inside": wall / inside - 1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=64, help="at most this many steps per preset")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--only", nargs="+", default=None, metavar="PATTERN", help="preset/objective shell patterns")
    p.add_argument("--malloc", choices=("default", "steady"), default="default", help="glibc allocator policy")
    p.add_argument("--out", default="bench/results/sampler_overhead_cpu.json")
    args = p.parse_args()
    malloc = args.malloc if args.malloc == "default" or steady_malloc() else "default (steady did not apply)"
    from cdlm.options import resolve_device

    device = torch.device(resolve_device(args.device))
    native_bf16 = device.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    dtype = {"fp32": None, "bf16": torch.bfloat16, "auto": torch.bfloat16 if native_bf16 else None}[args.dtype]
    result: dict[str, Any] = {
        "benchmark": "sampler_overhead",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "network": "model=mini (4 x 256), V 2048, random weights",
        "batch_size": args.batch_size,
        "length": args.length,
        "dtype": "bf16 autocast" if dtype is not None else "float32",
        "repeats": args.repeats,
        "malloc": malloc,
        "load_average_before": os.getloadavg(),
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    modules = {name: build(name, device) for name in OBJECTIVES}  # all built, so the initial weights do not move
    for preset_name, preset in presets().items():
        from cdlm.samplers import get_sampler

        for objective, module in modules.items():
            if not get_sampler(preset["name"]).fits(module.objective):
                continue
            key = f"{preset_name}/{objective}"
            if args.only is not None and not any(fnmatch.fnmatchcase(key, pattern) for pattern in args.only):
                continue
            result["runs"][key] = run = measure(module, preset, args, dtype, device)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(
                f"{key}: NFE {run['nfe']}, wall {run['wall_s']:.2f} s, overhead {run['overhead']:+.1%} "
                f"(around the network {run['overhead_inside']:+.1%})",
                flush=True,
            )
    result["load_average_after"] = os.getloadavg()
    result["max_overhead"] = max(r["overhead"] for r in result["runs"].values())
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

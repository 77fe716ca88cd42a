"""Resident memory of a training process against the number of steps: it must stay flat.

Trains ``experiment=quickstart`` (overrides may be added) in this process and records, every ``--every`` steps, the
resident set size and its anonymous and file-backed parts (``/proc/self/status``: ``RssAnon``, ``RssFile``). Writes
the series, the peak and the growth from ``--from-step`` on.

    python bench/train_memory.py [--steps 1000] [--every 25] [--from-step 200] [override ...]
    python bench/train_memory.py trainer.precision=32-true    # on CPUs without native bf16 (see the README)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


def memory_mb() -> dict[str, float]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` and ``VmHWM`` (peak) of this process, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


class MemoryRecorder(L.Callback):
    """``{step, seconds, VmRSS, RssAnon, RssFile}`` every ``every`` optimizer steps."""

    def __init__(self, every: int) -> None:
        self.every, self.rows, self.started = every, [], time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (not self.rows or self.rows[-1]["step"] != step):
            self.rows.append({"step": step, "seconds": round(time.perf_counter() - self.started, 1), **memory_mb()})
            print(json.dumps(self.rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--from-step", type=int, default=200)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/cdlm-train-memory"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/train_memory_cpu.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.precision=32-true")
    opts = parser.parse_args()

    from cdlm.config import compose
    from cdlm.training import prepare

    shutil.rmtree(opts.run_dir, ignore_errors=True)
    args = [
        "experiment=quickstart", f"trainer.max_steps={opts.steps}", f"run_dir={opts.run_dir}",
        "trainer.enable_progress_bar=false", *opts.overrides,
    ]  # fmt: skip
    cfg = compose(args)
    load_before = os.getloadavg()
    start = memory_mb()
    run = prepare(cfg)
    recorder = MemoryRecorder(opts.every)
    run.trainer.callbacks.append(recorder)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    rows = recorder.rows
    late = [r for r in rows if r["step"] >= opts.from_step]
    result = {
        "config": args,
        "precision": str(cfg.trainer.precision),
        "before_training": start,
        "series": rows,
        "peak_rss_mb": max(r["VmHWM"] for r in rows),
        f"growth_from_step_{opts.from_step}_mb": round(late[-1]["VmRSS"] - late[0]["VmRSS"], 1),
        f"anon_growth_from_step_{opts.from_step}_mb": round(late[-1]["RssAnon"] - late[0]["RssAnon"], 1),
        "conditions": {
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    key = f"growth_from_step_{opts.from_step}_mb"
    print(f"peak {result['peak_rss_mb']} MB; from step {opts.from_step} to {late[-1]['step']}: {result[key]} MB; "
          f"wrote {opts.out}")  # fmt: skip


if __name__ == "__main__":
    main()

"""End-to-end checks of the training entry point on one GPU, through ``train.py`` as a user runs it.

1. ``trainer=gpu`` with ``model.compile=true`` on the quickstart: the run finishes, its throughput figures and final
   bound are read from the run's logs.
2. ``trainer=fsdp`` (FSDP2, ``ema=null``): an uninterrupted run, and a run killed after its step-``crash``
   checkpoint and resumed with ``resume=auto``; the resumed steps' losses against the uninterrupted ones.

Each run is a subprocess; results go to one JSON file.

    python bench/gpu_checks.py [--steps 100] [--out bench/results/gpu_checks.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.runs import CRASH_DRIVER  # noqa: E402  (the test suite's driver: killed at a step)


def train(work: Path, run_dir: Path, overrides: list[str], crash: int = 0) -> dict[str, Any]:
    """Run ``train.py`` (through a driver that may stop it at step ``crash``); return its exit status and timing."""
    driver = work / "driver.py"
    driver.write_text(CRASH_DRIVER)
    cmd = [sys.executable, str(driver), str(crash), "experiment=quickstart", f"run_dir={run_dir}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return {
        "command": " ".join(["python train.py", *cmd[3:]]),
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - start,
        "stdout_tail": proc.stdout[-1500:],
        "stderr_tail": proc.stderr[-1500:] if proc.returncode not in (0, 3) else "",
    }


def logged(run_dir: Path, column: str) -> dict[int, float]:
    """``{step: value}`` of one column over every ``logs/version_*/metrics.csv`` of a run."""
    out = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get(column):
                out[int(row["step"])] = float(row[column])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--work", default="/tmp/cdlm_gpu_checks")
    p.add_argument("--out", default="bench/results/gpu_checks.json")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps, every = args.steps, args.steps // 4
    common = [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1",
        f"checkpoint.every_n_train_steps={every}",
        "sample.n=2",
        "sample.length=64",
    ]
    result: dict[str, Any] = {"benchmark": "gpu_checks", "steps": steps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    gpu = work / "gpu_compile"
    result["gpu_compile"] = train(work, gpu, ["trainer=gpu", "model.compile=true", *common])
    metrics = gpu / "metrics.json"
    result["gpu_compile"]["metrics"] = json.loads(metrics.read_text()) if metrics.exists() else None
    columns = {}
    for path in sorted((gpu / "logs").glob("version_*/metrics.csv")):
        header = next(csv.reader(path.open()))
        columns = {c: logged(gpu, c) for c in header if "per_sec" in c or "mfu" in c}
    result["gpu_compile"]["throughput_last"] = {c: v[max(v)] for c, v in columns.items() if v}
    save()

    fsdp = ["trainer=fsdp", "ema=null", *common]
    result["fsdp_full"] = train(work, work / "fsdp_full", fsdp)
    crash = every * 2 + every // 2
    result["fsdp_killed"] = train(work, work / "fsdp_resumed", fsdp, crash=crash)
    result["fsdp_resumed"] = train(work, work / "fsdp_resumed", [*fsdp, "resume=auto"])
    full, resumed = logged(work / "fsdp_full", "train/loss"), logged(work / "fsdp_resumed", "train/loss")
    replayed = [s for s in range(every * 2, steps) if s in full and s in resumed]
    result["fsdp_resume"] = {
        "crash_step": crash,
        "resumed_from_step": every * 2,
        "compared_steps": len(replayed),
        "max_abs_loss_difference": max((abs(full[s] - resumed[s]) for s in replayed), default=None),
        "uninterrupted_loss_first_last": [full.get(0), full.get(steps - 1)],
    }
    save()
    print(json.dumps({k: v for k, v in result.items() if k == "fsdp_resume"}, indent=2))
    print({k: (v.get("returncode"), round(v.get("seconds", 0))) for k, v in result.items() if isinstance(v, dict)})


if __name__ == "__main__":
    main()

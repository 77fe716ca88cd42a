"""The bias of few-step and multi-commit sampling, measured with exact models of tiny known laws.

``tests/test_exact_samplers.py`` proves that every sampler draws the law of an exact model at many steps. This
script measures what a sampler costs in exactness at the step counts people use: for every sampler setting of that
suite, every objective it fits and both laws of ``tests/exact.py`` (four positions; independent, and correlated over
six sequences), it draws ``--n`` sequences through ``DiffusionLM.generate`` at each of ``--steps`` and records the
total-variation distance of their histogram from the law, the fraction outside its support, and the chi-square
p-value. The sampling noise of the TV itself is about ``sqrt(K / (2 pi n))``: 0.02 for the 16-sequence law at
``n = 4000``, so only larger figures are bias.

    python bench/exact_bias.py [--n 4000] [--steps 1 2 4 8 16 32] [--out bench/results/exact_bias.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cdlm.components import OBJECTIVES  # noqa: E402
from cdlm.module import DiffusionLM  # noqa: E402
from cdlm.samplers import SAMPLERS  # noqa: E402
from tests.exact import LAWS, compare, install_oracle  # noqa: E402
from tests.test_exact_samplers import CASES, build, fitting  # noqa: E402


def measure(path: str, case: str, law_name: str, steps: int, n: int) -> dict:
    """One setting at ``steps``: TV, outside fraction and p-value of ``n`` draws, and the NFE per sample."""
    name, _, knobs = CASES[case]
    high = SAMPLERS[name].steps.high
    steps = steps if high is None else min(steps, int(high))
    law = LAWS[law_name]()
    objective = build(path)
    install_oracle(objective, law)
    nfe = []
    ids, _ = DiffusionLM(objective).generate(
        n, law.length, name, steps, seed=1, dtype=None, callback=lambda s: nfe.append(s.nfe), **knobs
    )
    fit = compare(ids, law)
    return {
        "objective": path.rpartition(".")[2],
        "case": case,
        "law": law_name,
        "steps": steps,
        "nfe": nfe[-1] if nfe else None,
        "tv": round(fit.tv, 4),
        "outside": round(fit.outside, 4),
        "p_value": fit.p_value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--out", default="bench/results/exact_bias.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load, rows = os.getloadavg(), []
    for path in OBJECTIVES:
        for case in fitting(path):
            if SAMPLERS[CASES[case][0]].space == "autoregressive":
                continue  # one network call per position whatever the steps: exact (the suite checks it)
            for law_name in sorted(LAWS):
                for steps in args.steps:
                    try:
                        rows.append(measure(path, case, law_name, steps, args.n))
                    except ValueError as err:  # e.g. fewer steps than semi-AR blocks
                        print(f"skipped {path} {case} {steps}: {err}", flush=True)
                        continue
                    print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load,
        "n": args.n,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

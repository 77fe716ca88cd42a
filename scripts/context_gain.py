"""How much of each continuous run's denoising comes from context: the model against the context-free Bayes
denoiser of the run's unigram model, on the same validation tokens and noise (``cdlm.metrics.context_gain``,
docs/math.md §8).

    python scripts/context_gain.py runs/langflow_quickstart/final runs/flow_quickstart/final --chars 22000
    # writes bench/results/issue17/context_gain.{json,md}

For each run: the ELBO diffusion term of the model and of the context-free denoiser (nats/token) and their
difference ``gain`` (> 0: the model reads its neighbours), both ELBOs against the unigram NLL of the same tokens, and
the largest fraction of the context-free squared error the model removes at any level of the grid (the JSON has
every level). The tokens are the leading validation rows that cover ``--chars`` characters,
as in ``scripts/bound_table.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import cdlm
from cdlm.checkpoint import trained_steps
from cdlm.device import device_name
from cdlm.evaluate import (
    run_datamodule,
    set_objective_options,
    tokens_for_chars,
    train_unigram,
    unigram_validation_bound,
)
from cdlm.metrics.context_gain import LEVELS, context_gain


def gain_row(path: str, chars: int, levels: int, seed: int, options: list[str]) -> dict:
    module = cdlm.load(path)
    settings = set_objective_options(module, options)
    unigram = train_unigram(module)
    tokens = tokens_for_chars(module, chars)
    batches = run_datamodule(module, max_val_tokens=tokens).val_dataloader()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = context_gain(module.objective, unigram.log_probs.float(), batches, levels, generator)
    nll = unigram_validation_bound(module, unigram, data={"max_val_tokens": tokens})["val_nll"]
    return {
        "path": path,
        "objective": type(module.objective).__name__,
        "train_steps": trained_steps(path),
        "settings": settings,
        "seconds": time.perf_counter() - start,
        **result,
        "unigram_nll": nll,  # nats/token on the same tokens: elbo_free should land here (I-MMSE)
    }


def markdown(rows: list[dict], chars: int) -> str:
    lines = [
        f"Denoising against the context-free Bayes denoiser (unigram prior), first {chars:,} validation characters; "
        "all terms in nats/token.\n",
        "| run | objective | steps | tokens | diffusion term: model | context-free | gain | ELBO: model "
        "| context-free | unigram NLL | ELBO - unigram | most removed (log sigma) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        path = Path(r["path"])
        run = path.parent.name if path.name == "final" else str(path)
        run += "".join(f" {name}={value:g}" for name, value in r.get("settings", {}).items())
        best = max(range(len(r["removed"])), key=lambda i: r["removed"][i])
        lines.append(
            f"| {run} | {r['objective']} | {r['train_steps']} | {r['tokens']} | {r['diffusion_model']:.3f} | "
            f"{r['diffusion_free']:.3f} | {r['gain']:+.3f} | {r['elbo_model']:.3f} | {r['elbo_free']:.3f} | "
            f"{r['unigram_nll']:.3f} | {r['elbo_model'] - r['unigram_nll']:+.3f} | "
            f"{r['removed'][best]:+.1%} ({math.log(r['sigma'][best]):.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="save_pretrained folders or .ckpt files of continuous runs")
    parser.add_argument("--chars", type=int, default=22000)
    parser.add_argument("--levels", type=int, default=LEVELS, help="noise levels, log-uniform in sigma")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--objective", action="append", default=[], metavar="NAME=VALUE", help="evaluation-time setting: t_min=0.01"
    )
    parser.add_argument("--out", default="bench/results/issue17/context_gain")
    args = parser.parse_args()
    rows = []
    for path in args.paths:
        rows.append(gain_row(path, args.chars, args.levels, args.seed, args.objective))
        print(f"{path}: gain {rows[-1]['gain']:+.3f} nats/token ({rows[-1]['seconds']:.0f} s)", flush=True)
    table = markdown(rows, args.chars)
    write(Path(args.out), {"device": device_name(torch.device("cpu")), "chars": args.chars, "rows": rows}, table)
    print(table)


def write(out: Path, payload: dict, table: str) -> None:
    """``out.json`` (the rows with every level) and ``out.md`` (the table)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2)), (".md", table)):
        out.with_suffix(suffix).write_text(text)


if __name__ == "__main__":
    main()

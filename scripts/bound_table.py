"""Validation bounds of several runs on the same validation characters, as one table (BPC at equal compute).

    python scripts/bound_table.py runs/quickstart/final runs/ar_quickstart/final runs/flow_quickstart/final \
        runs/langflow_quickstart/final runs/bitstream_quickstart/final --chars 22000
    # writes bench/results/bound_table.{json,md}

Every model is scored on the leading rows of its own tokenisation of the validation split that cover the first
``--chars`` characters (one row more at most), so a character-level and a BPE model see the same text and BPC
(docs/math.md section 0) compares them. Each objective reports its own bound: the NELBO (masked), the exact NLL
(autoregressive), the ODE bound of docs/math.md section 6 with the objective's ``ode_steps`` or ``--ode-steps``
(continuous ones), and for latent runs the bound of section 5 (the prior's ODE density in the same way).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cdlm
from cdlm.device import device_name
from cdlm.evaluate import run_datamodule, validation_bound


def tokens_for_chars(module, chars: int) -> int:
    """Real tokens in the leading validation rows whose characters first reach ``chars``."""
    rows = run_datamodule(module, max_val_tokens=None).dataset("validation")
    reached = (rows.n_chars.cumsum(0) < chars).sum().item() + 1  # rows needed
    return int(rows.mask[:reached].sum())


def bound_row(path: str, chars: int, ode_steps: int | None = None) -> dict:
    module = cdlm.load(path)
    if ode_steps is not None and hasattr(module.objective, "ode_steps"):
        module.objective.ode_steps = ode_steps  # the ODE bound's Heun steps (continuous objectives)
    tokens = tokens_for_chars(module, chars)
    start = time.perf_counter()
    metrics = validation_bound(module, data={"max_val_tokens": tokens})
    objective = module.objective
    return {
        "path": path,
        "objective": type(objective).__name__,
        "tokenizer": module.config["data"].get("tokenizer"),
        "vocab_size": module.tokenizer.vocab_size,
        "parameters": sum(p.numel() for p in module.parameters()),
        "train_steps": module.config["trainer"].get("max_steps"),
        "ode_steps": getattr(objective, "ode_steps", None),
        "val_tokens": tokens,
        "seconds": time.perf_counter() - start,
        **metrics,
    }


def markdown(rows: list[dict], chars: int) -> str:
    lines = [
        f"Validation bound on the first {chars:,} characters of the validation split (each model's own tokens).\n",
        "| run | objective | tokenizer (V) | params | steps | val tokens | ODE steps | BPC (bound) | NLL nats/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        path = Path(r["path"])
        run = path.parent.name if path.name == "final" else str(path)  # runs/<name>/final -> <name>
        lines.append(
            f"| {run} | {r['objective']} | {r['tokenizer']} ({r['vocab_size']}) | {r['parameters'] / 1e6:.2f} M | "
            f"{r['train_steps']} | {r['val_tokens']} | {r.get('ode_steps') or '—'} | {r['val_bpc']:.3f} | "
            f"{r['val_nll']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="save_pretrained folders or .ckpt files")
    parser.add_argument("--chars", type=int, default=22000)
    parser.add_argument("--out", default="bench/results/bound_table")
    parser.add_argument("--merge", action="store_true", help="keep the other runs' rows of an existing table")
    parser.add_argument("--ode-steps", type=int, default=None, help="Heun steps of the ODE bound (default: the run's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for path in args.paths:
        rows.append(bound_row(path, args.chars, args.ode_steps))
        print(f"{path}: {rows[-1]['val_bpc']:.3f} BPC on {rows[-1]['val_tokens']} tokens ({rows[-1]['seconds']:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old["chars"] != args.chars:
            raise SystemExit(f"--merge: the existing table is on {old['chars']} characters, not {args.chars}")
        rows = [r for r in old["rows"] if r["path"] not in args.paths] + rows
    payload = {"device": device_name(torch.device("cpu")), "chars": args.chars, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, args.chars))
    print(markdown(rows, args.chars))


if __name__ == "__main__":
    main()

"""Validation bounds of several runs on the same validation characters, as one table (BPC at equal compute).

    python scripts/bound_table.py runs/quickstart/final runs/ar_quickstart/final runs/flow_quickstart/final \
        runs/langflow_quickstart/final runs/bitstream_quickstart/final --chars 22000
    # writes bench/results/bound_table.{json,md}

Every model is scored on the leading rows of its own tokenisation of the validation split that cover the first
``--chars`` characters (one row more at most), so a character-level and a BPE model see the same text and BPC
(docs/math.md section 0) compares them. Each objective reports its own bound: the NELBO (masked), the exact NLL
(autoregressive), the ODE bound of docs/math.md section 6 with the objective's ``ode_steps`` or ``--ode-steps``
(continuous ones; ``--ode-probes R`` >= 2 averages R Hutchinson probes on each trajectory and reports the bound's
standard error; ``--self-condition`` scores LangFlow and bitstream runs by the self-conditioned two-pass denoiser
their samplers use, docs/math.md section 6; ``--objective NAME=VALUE`` sets a numeric attribute of each objective at
evaluation time, e.g. FLM's ``t_min``, which moves ``sigma_min`` and so the bound's decoder), and for latent runs
the bound of section 5 (the prior's ODE density in the same way).

For each tokenizer among the runs the table has a row "unigram (train split, <tokenizer>)": an add-0.5 unigram
model fitted on the train split's tokens (docs/math.md section 8) scored on the same validation tokens and characters
as that tokenizer's runs, and every run has a column "vs unigram (nats/token)": its bound less the unigram's NLL on
the run's own scored tokens (negative: the bound is below the unigram's, so the model has learned more than token
frequencies).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

import cdlm
from cdlm.checkpoint import trained_steps
from cdlm.config import compose, instantiate
from cdlm.device import device_name
from cdlm.evaluate import (
    set_objective_options,
    tokens_for_chars,
    train_unigram,
    unigram_validation_bound,
    validation_bound,
)
from cdlm.types import SelfConditionedBound

UNIGRAM = "Unigram"  # the objective column of the unigram rows


def bound_row(
    path: str,
    chars: int,
    ode_steps: int | None = None,
    ode_probes: int | None = None,
    self_condition: bool = False,
    options: tuple[str, ...] = (),
) -> dict:
    module = cdlm.load(path)
    settings = set_objective_options(module, list(options))  # evaluation-time numeric attributes (``--objective``)
    if self_condition and isinstance(module.objective, SelfConditionedBound):
        module.objective.ode_self_condition = True  # the two-pass denoiser the sampler uses (docs/math.md §6)
    if ode_steps is not None and hasattr(module.objective, "ode_steps"):
        module.objective.ode_steps = ode_steps  # the ODE bound's Heun steps (continuous objectives)
    if ode_probes is not None and hasattr(module.objective, "ode_probes"):
        module.objective.ode_probes = ode_probes  # Hutchinson probes per sequence: >= 2 gives a standard error
    tokens = tokens_for_chars(module, chars)
    start = time.perf_counter()
    metrics = validation_bound(module, data={"max_val_tokens": tokens})
    seconds = time.perf_counter() - start
    unigram = unigram_validation_bound(module, train_unigram(module), data={"max_val_tokens": tokens})
    objective = module.objective
    return {
        "path": path,
        "objective": type(objective).__name__,
        "tokenizer": module.config["data"].get("tokenizer"),
        "vocab_size": module.tokenizer.vocab_size,
        "parameters": sum(p.numel() for p in module.parameters()),
        "train_steps": trained_steps(path),
        "ode_steps": getattr(objective, "ode_steps", None),
        "ode_probes": getattr(objective, "ode_probes", None),
        "ode_self_condition": getattr(objective, "ode_self_condition", None),
        "settings": settings,
        "val_tokens": tokens,
        "seconds": seconds,
        **metrics,
        "unigram_tokenizer": tokenizer_label(module),
        "unigram_nll": unigram["val_nll"],
        "unigram_bpc": unigram["val_bpc"],
        "vs_unigram": metrics["val_nll"] - unigram["val_nll"],  # nats/token on the same tokens; < 0: below unigram
        "unigram_fit": unigram,  # the unigram row's figures (popped by unigram_rows)
    }


def tokenizer_label(module) -> str:
    """The run's tokenizer, as its unigram row names it: kind, name (if any) and vocabulary, e.g. ``bpe 2048``."""
    data = module.config["data"]
    name = data.get("tokenizer_name")
    return f"{data.get('tokenizer')}{f' {name}' if name else ''} {module.tokenizer.vocab_size}"


def unigram_rows(rows: list[dict]) -> list[dict]:
    """One unigram row per tokenizer (and validation token count) of the model rows, in order of appearance; pops
    each model row's ``unigram_fit``."""
    fits: dict[tuple[str, int], dict] = {}
    for r in rows:
        fit = r.pop("unigram_fit", None)
        if fit is not None:
            key = (r["unigram_tokenizer"], r["val_tokens"])
            fits.setdefault(key, {**fit, "tokenizer": r["tokenizer"], "V": r["vocab_size"]})
    labels = [label for label, _ in fits]
    out = []
    for (label, tokens), fit in fits.items():
        suffix = f", {tokens} tokens" if labels.count(label) > 1 else ""  # one tokenizer, several token counts
        out.append(
            {
                "path": f"unigram (train split, {label}{suffix})",
                "objective": UNIGRAM,
                "tokenizer": fit["tokenizer"],
                "vocab_size": fit["V"],
                "parameters": None,
                "train_steps": None,
                "ode_steps": None,
                "val_tokens": fit["val_tokens"],
                "val_nll": fit["val_nll"],
                "val_ppl": fit["val_ppl"],
                "val_bpc": fit["val_bpc"],
                "vs_unigram": 0.0,
                "alpha": fit["alpha"],
                "train_tokens": fit["train_tokens"],
            }
        )
    return out


def cell(value, spec: str = "") -> str:
    """``value`` formatted with ``spec``, or a dash when there is none."""
    return "—" if value is None else format(value, spec)


def se(row: dict) -> str:
    """`` ± 0.012``: the bound's Hutchinson standard error (nats/token), where measured (``--ode-probes`` >= 2)."""
    return f" ± {row['val_nll_se']:.3f}" if row.get("val_nll_se") is not None else ""


def markdown(rows: list[dict], chars: int) -> str:
    lines = [
        f"Validation bound on the first {chars:,} characters of the validation split (each model's own tokens).\n",
        "| run | objective | tokenizer (V) | params | steps | val tokens | ODE steps | BPC (bound) "
        "| NLL nats/token (± SE) | vs unigram (nats/token) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        path = Path(r["path"])
        run = path.parent.name if path.name == "final" else str(path)  # runs/<name>/final -> <name>
        run += " (self-conditioned bound)" if r.get("ode_self_condition") else ""
        run += "".join(f" ({name}={value:g})" for name, value in (r.get("settings") or {}).items())
        params = "—" if r["parameters"] is None else f"{r['parameters'] / 1e6:.2f} M"
        lines.append(
            f"| {run} | {r['objective']} | {r['tokenizer']} ({r['vocab_size']}) | {params} | "
            f"{cell(r['train_steps'])} | {r['val_tokens']} | {r.get('ode_steps') or '—'} | {r['val_bpc']:.3f} | "
            f"{r['val_nll']:.3f}{se(r)} | {cell(r.get('vs_unigram'), '+.3f')} |"
        )
    return "\n".join(lines) + "\n"


def table_rows(rows: list[dict], fits: list[dict] = ()) -> list[dict]:
    """The model rows, then the unigram rows: new ones for the runs just scored and for ``fits`` (``data_fit``;
    each carries a ``unigram_fit``), the old ones of other tokenizers kept. A model row scored before the table had
    a unigram row (no ``vs_unigram``) gets its gap to the unigram row of its tokenizer and validation tokens."""
    models = [r for r in rows if r["objective"] != UNIGRAM]
    new = unigram_rows(models + list(fits))
    fresh = {r["path"] for r in new}
    unigrams = [r for r in rows if r["objective"] == UNIGRAM and r["path"] not in fresh] + new
    by_tokens = {(f"{u['tokenizer']} {u['vocab_size']}", u["val_tokens"]): u for u in unigrams}
    for r in models:
        match = by_tokens.get((f"{r['tokenizer']} {r['vocab_size']}", r["val_tokens"]))
        if r.get("vs_unigram") is None and match is not None:
            r["vs_unigram"] = r["val_nll"] - match["val_nll"]  # nats/token on the same tokens
    return models + unigrams


def data_fit(overrides: str, chars: int) -> dict:
    """The unigram row's inputs for a data config without a run (``--unigram-data "data=shakespeare_char"``): the
    config's tokenizer (built as a run builds it, or read from its cache) and the unigram model of its train split,
    scored on the validation tokens that cover ``chars`` characters."""
    config = compose(overrides.split())
    datamodule = instantiate(config.data)
    stand_in = SimpleNamespace(  # what the unigram helpers read of a run
        config={"data": OmegaConf.to_container(config.data)}, tokenizer=datamodule.prepare_tokenizer()
    )
    tokens = tokens_for_chars(stand_in, chars)
    fit = unigram_validation_bound(stand_in, train_unigram(stand_in), data={"max_val_tokens": tokens})
    return {
        "tokenizer": config.data.get("tokenizer"),
        "vocab_size": stand_in.tokenizer.vocab_size,
        "val_tokens": tokens,
        "unigram_tokenizer": tokenizer_label(stand_in),
        "unigram_fit": fit,
    }


def row_key(row: dict) -> tuple[str, str, bool]:
    """What makes a row: its run, its evaluation-time settings and the self-conditioned bound (``--merge`` replaces
    a row of the same key)."""
    return row["path"], json.dumps(row.get("settings") or {}, sort_keys=True), bool(row.get("ode_self_condition"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="save_pretrained folders or .ckpt files")
    parser.add_argument("--chars", type=int, default=22000)
    parser.add_argument("--out", default="bench/results/bound_table")
    parser.add_argument("--merge", action="store_true", help="keep the other runs' rows of an existing table")
    parser.add_argument("--ode-steps", type=int, default=None, help="Heun steps of the ODE bound (default: the run's)")
    parser.add_argument(
        "--ode-probes", type=int, default=None, help="Hutchinson probes per sequence (>= 2: the bound's standard error)"
    )
    parser.add_argument(
        "--self-condition",
        action="store_true",
        help="LangFlow / bitstream: the bound of the self-conditioned two-pass denoiser (docs/math.md section 6)",
    )
    parser.add_argument(
        "--objective",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a numeric attribute of each run's objective before scoring (e.g. t_min=0.01); repeatable",
    )
    parser.add_argument(
        "--unigram-data",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help='a unigram row for a data config without a run, e.g. "data=shakespeare_bpe data.vocab_size=4096"',
    )
    args = parser.parse_args()
    if not args.paths and not args.unigram_data:
        parser.error("give runs to score or --unigram-data")
    torch.manual_seed(0)
    rows = []
    for path in args.paths:
        rows.append(bound_row(path, args.chars, args.ode_steps, args.ode_probes, args.self_condition, args.objective))
        print(f"{path}: {rows[-1]['val_bpc']:.3f} BPC on {rows[-1]['val_tokens']} tokens ({rows[-1]['seconds']:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old["chars"] != args.chars:
            raise SystemExit(f"--merge: the existing table is on {old['chars']} characters, not {args.chars}")
        replaced = {row_key(r) for r in rows}
        rows = [r for r in old["rows"] if row_key(r) not in replaced] + rows
    rows = table_rows(rows, [data_fit(overrides, args.chars) for overrides in args.unigram_data])
    payload = {"device": device_name(torch.device("cpu")), "chars": args.chars, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, args.chars))
    print(markdown(rows, args.chars))


if __name__ == "__main__":
    main()

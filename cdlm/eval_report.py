"""What a ``cdlm eval`` result means and how it reads: the protocol recorded beside every result, the text summary
and the JSON file (docs/math.md §8). ``cdlm.evaluate`` computes the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cdlm.device import device_name
from cdlm.metrics.unigram import ALPHA

if TYPE_CHECKING:
    from cdlm.module import DiffusionLM

STREAMED_TRAIN_TOKENS = 2**24  # a streamed source's unigram is fitted on the first tokens of its train stream
UNIGRAM_SEED = 0  # the seed of the unigram-draws reference row


def conditional_protocol(source: str, prompt_tokens: int, length: int) -> str:
    """What the conditional rows mean (``cdlm.conditional_eval``)."""
    return (
        f"prompts={source}: the first {prompt_tokens} tokens of n validation windows of {length} tokens (evenly "
        f"spaced over the split); samples, the true continuations (reference) and {length - prompt_tokens} "
        "independent unigram draws (unigram_draws) continue them; gen_ppl is the judge's token-weighted perplexity "
        "of each continuation given its prompt (each encoded apart by the judge), entropy and distinct-n are the "
        "continuations' own ids; mauve (if asked): MAUVE (mauve-text, k-means seed 25) of the continuations against "
        "the true ones on the judge's last hidden states"
    )


ZERO_SHOT_PROTOCOL = (
    "objective.nll, fixed noise, EMA weights, over each corpus retokenised with the model's tokenizer (EOS after "
    "each document), packed into data.seq_len blocks as the validation split; scored: a local file or folder whole, "
    "an hf: dataset's named split, else its test split, else its validation split (cdlm/zero_shot.py)"
)


UNIGRAM_PROTOCOL = (
    f"add-{ALPHA} unigram over the tokenizer's whole vocabulary, fitted on the train split's token stream (the run's "
    f"tokenizer; a streamed source: its first {STREAMED_TRAIN_TOKENS} tokens), scored on the model's validation tokens"
)


def protocol(module: DiffusionLM, judge, sampler: dict, n: int, length: int, seeds: int) -> dict:
    """What a number means: recorded beside every result (docs/math.md §8)."""
    return {
        "judge": getattr(judge, "name", None),
        "judge_tokenizer": getattr(judge, "tokenizer_name", None),
        "eos_rule": getattr(judge, "eos_rule", None),
        "judge_dtype": "float32",
        "gen_ppl": "token-weighted exp(mean NLL) of the judge on decoded, retokenised text",
        "entropy": "mean per-sample unigram entropy of the model's own token ids, nats",
        "distinct": "mean per-sample fraction of unique n-grams of the model's token ids",
        "self_bleu": "mean BLEU-4 of each sample's token ids against the other samples' (between-sample diversity)",
        "left_to_right": "masked diffusion: mean Spearman correlation of position and commit step (1 = AR order)",
        "arness": "masked diffusion: NAP's Global-ARness@1, commits left of every position still masked (1 = AR)",
        "likelihood": "objective.nll over the validation split, full time range, EMA weights, fixed noise",
        "unigram": UNIGRAM_PROTOCOL,
        "unigram_draws": f"{n} sequences of {length} independent unigram draws (seed {UNIGRAM_SEED}), decoded",
        "samples_per_seed": n,
        "length": length,
        "seeds": list(range(seeds)),
        "sampler": dict(sampler),
        "objective": type(module.objective).__name__,
        "model_dtype": "bfloat16 autocast",
        "device": str(module.device),
        "device_name": device_name(module.device),
        "torch": torch.__version__,
    }


def unigram_line(metrics: dict, unigram: dict) -> str:
    """The unigram bound beside the model's: bits/char, nats/token and the model's bound less the unigram's."""
    line = (
        f"unigram (train split, add-{unigram['alpha']}): {unigram['val_bpc']:.4f} bits/char, "
        f"{unigram['val_nll']:.4f} nats/token over {unigram['val_tokens']} tokens"
    )
    if "val_nll" in metrics:
        line += f"; model - unigram: {metrics['val_nll'] - unigram['val_nll']:+.4f} nats/token"
    return line


def summary(result: dict) -> str:
    """A short human-readable table of an evaluation result."""
    m, ref, draws = result["metrics"], result["reference"], result.get("unigram_draws")
    se = f" +- {m['val_bpc_se']:.4f} (Hutchinson SE)" if "val_bpc_se" in m else ""
    lines = [f"validation bound: {m['val_bpc']:.4f}{se} bits/char, PPL {m['val_ppl']:.2f}"] if "val_bpc" in m else []
    if result.get("unigram"):
        lines.append(unigram_line(m, result["unigram"]))
    if result.get("protocol", {}).get("conditional"):
        lines.append(f"conditional protocol: {result['protocol']['conditional']}")
    if "infill_accuracy_mean" in m:
        fill = result["infill"]
        bound = "" if fill["span_nll"] is None else f", span bound {fill['span_nll']:.4f} nats/token"
        bound += f" (unigram {fill['unigram_span_nll']:.4f})"
        lines.append(
            f"infilling {fill['span']} tokens: accuracy {m['infill_accuracy_mean']:.4f} +- "
            f"{m['infill_accuracy_std']:.4f} (unigram draws {fill['unigram_accuracy']:.4f}){bound}"
        )
    if "gen_ppl_mean" in m:
        lines.append(
            f"samples ({result['protocol']['sampler']['name']}, NFE {m['nfe']}): Gen PPL {m['gen_ppl_mean']:.2f} "
            f"+- {m['gen_ppl_std']:.2f}, entropy {m['entropy_mean']:.3f} +- {m['entropy_std']:.3f} nats, "
            f"{m['seconds_per_sample_mean']:.3f} s/sample"
        )
    extras = [
        (key, label)
        for key, label in (("self_bleu", "self-BLEU"), ("left_to_right", "left-to-right"), ("arness", "ARness@1"))
        if key + "_mean" in m
    ]
    if extras:
        lines.append(", ".join(f"{label} {m[key + '_mean']:.3f} +- {m[key + '_std']:.3f}" for key, label in extras))
    judge = result.get("protocol", {}).get("judge")
    for label, row in (("reference (real validation text)", ref), ("unigram draws", draws)):
        if row:
            lines.append(f"{label}, judge {judge}: Gen PPL {row['gen_ppl']:.2f}, entropy {row['entropy']:.3f}")
    for row in result.get("zero_shot", []):
        lines.append(
            f"zero-shot {row['corpus']} ({row['split']}): {row['nll']:.4f} nats/token, PPL {row['ppl']:.2f}, "
            f"{row['bpc']:.4f} bits/char over {row['tokens']} tokens"
        )
    return "\n".join(lines)


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path

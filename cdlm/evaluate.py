"""``cdlm eval``: the fixed evaluation protocol of docs/math.md §8, one JSON file per evaluation.

Reports the validation bound (BPC, PPL; full time range, the checkpoint's EMA weights) with the unigram bound on
the same tokens beside it, Gen PPL under a judge with the mean per-sample unigram entropy and distinct-n beside it,
mean +- std over seeds, NFE and seconds per sample, and the same generative figures for real validation text (the
reference row) and for independent draws of the unigram model (the unigram-draws row).
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import torch
from omegaconf import OmegaConf

from cdlm.conditional_eval import check_mauve, conditional_scores, mauve_score, split_windows
from cdlm.config import ConfigError, instantiate
from cdlm.eval_report import (
    STREAMED_TRAIN_TOKENS,
    UNIGRAM_SEED,
    ZERO_SHOT_PROTOCOL,
    conditional_protocol,
    protocol,
)
from cdlm.infill_eval import infill_row, span_accuracy, span_bound, span_canvas
from cdlm.metrics import DistinctN, GenPPL, UnigramEntropy, UnigramModel, build_judge, unigram_bound
from cdlm.metrics.decoding_order import DecodingOrder
from cdlm.metrics.diversity import self_bleu
from cdlm.metrics.likelihood import score_batches
from cdlm.metrics.unigram import ALPHA, TokenStream
from cdlm.module import DiffusionLM
from cdlm.options import DEFAULT_EVAL_N, DEFAULT_PROMPT_TOKENS, DEFAULT_SEEDS, sample_length
from cdlm.prompts import Prompt, after_eos
from cdlm.sampling import Samples, draw
from cdlm.types import AbsorbingObjective


def run_datamodule(module: DiffusionLM, **overrides):
    """The run's ``TextDataModule`` (its ``data`` config, with ``overrides``) using the model's tokenizer."""
    datamodule = instantiate(OmegaConf.create({**module.config["data"], **overrides}))
    datamodule.set_tokenizer(module.tokenizer)
    return datamodule


def tokens_for_chars(module: DiffusionLM, chars: int) -> int:
    """Real tokens in the leading validation rows whose characters first reach ``chars`` (so models with different
    tokenizers are scored on the same text: ``data={"max_val_tokens": tokens_for_chars(module, chars)}``)."""
    rows = run_datamodule(module, max_val_tokens=None).dataset("validation")
    tokens = seen = 0
    for i in range(len(rows)):  # rows in order, up to the one whose characters reach ``chars``
        row = rows[i]
        tokens, seen = tokens + int(row["attention_mask"].sum()), seen + int(row["n_chars"])
        if seen >= chars:
            break
    return tokens


def set_objective_options(module: DiffusionLM, assignments: list[str]) -> dict[str, float]:
    """Evaluation-time settings of the objective's numeric attributes, ``["t_min=0.01", ...]`` (e.g. FLM's
    ``t_min``, which moves ``sigma_min`` and so the decoder of the bound); the settings, as applied. Only existing
    int or float attributes may be set: a ``ValueError`` names the others."""
    applied = {}
    objective = module.objective
    for item in assignments:
        name, sep, text = item.partition("=")
        current = getattr(objective, name, None) if sep else None
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ValueError(
                f"--objective {item!r}: expected NAME=NUMBER for a numeric attribute of {type(objective).__name__}"
            )
        value = type(current)(float(text)) if isinstance(current, int) else float(text)
        setattr(objective, name, value)
        applied[name] = value
    return applied


def validation_bound(
    module: DiffusionLM, max_batches: int | None = None, dtype=torch.bfloat16, data: dict | None = None
) -> dict:
    """The objective's ``nll`` over the validation split with the module's fixed evaluation noise.

    ``data``: overrides of the run's data config (e.g. ``{"max_val_tokens": n}``).
    """
    batches = run_datamodule(module, **(data or {})).val_dataloader()
    metric = score_batches(module, batches, max_batches, dtype)
    return {f"val_{k}": float(v) for k, v in metric.compute().items()}


_UNIGRAMS: dict[tuple, UnigramModel] = {}  # fitted unigram models of this process, by train stream and vocabulary


def train_stream(datamodule, tokenizer) -> TokenStream:
    """The train split's token stream ``[N]``, the one the run trains on (its tokenizer, EOS after each document).

    A streamed source has no token cache: the first ``STREAMED_TRAIN_TOKENS`` tokens of its train stream are read.
    """
    if not datamodule.streaming:
        return datamodule.dataset("train").tokens
    from cdlm.data.streaming import read_tokens

    def encode(doc: str) -> list[int]:
        return [*tokenizer.encode(doc), tokenizer.eos_id]

    stream = datamodule.stream()
    return read_tokens(stream.documents(stream.texts("train")), encode, STREAMED_TRAIN_TOKENS)[0]


def train_unigram(module: DiffusionLM, alpha: float = ALPHA) -> UnigramModel:
    """The unigram model of the run's train split over the tokenizer's whole vocabulary (docs/math.md §8), fitted
    once per process for each train stream (a token cache, or a streamed source and tokenizer)."""
    datamodule, tokenizer = run_datamodule(module), module.tokenizer
    if datamodule.streaming:
        stream_key = ("stream", datamodule.source, json.dumps(tokenizer.config(), sort_keys=True, default=str))
    else:
        stream_key = ("cache", str(datamodule.token_cache()))
    key = (*stream_key, tokenizer.vocab_size, float(alpha))
    if key not in _UNIGRAMS:
        _UNIGRAMS[key] = UnigramModel.fit(train_stream(datamodule, tokenizer), tokenizer.vocab_size, alpha)
    return _UNIGRAMS[key]


def unigram_validation_bound(
    module: DiffusionLM, unigram: UnigramModel, max_batches: int | None = None, data: dict | None = None
) -> dict:
    """``unigram``'s NLL on the tokens and characters that ``validation_bound(module, max_batches, data=data)``
    scores: ``val_nll`` (nats/token), ``val_ppl``, ``val_bpc``, ``val_tokens``, the fit's ``alpha`` and
    ``train_tokens``."""
    batches = run_datamodule(module, **(data or {})).val_dataloader()
    scores = unigram_bound(unigram, batches, max_batches)
    return scores | {"alpha": unigram.alpha, "train_tokens": unigram.train_tokens}


def unigram_texts(
    module: DiffusionLM, unigram: UnigramModel, n: int, length: int, seed: int = UNIGRAM_SEED
) -> tuple[list[str], torch.Tensor]:
    """``n`` sequences of ``length`` tokens drawn independently from ``unigram`` (a generator seeded with ``seed``),
    decoded with the run's tokenizer."""
    ids = unigram.sample(n, length, torch.Generator().manual_seed(seed))  # [n, length]
    return [module.tokenizer.decode(row.tolist()) for row in ids], ids


def generative_scores(judge, texts: list[str], ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Gen PPL under ``judge``, mean unigram entropy (nats) and distinct-n of one set of samples (the ids where
    ``mask`` ``[n, L]``, if given, holds)."""
    gen_ppl, entropy, distinct = GenPPL(judge), UnigramEntropy(), DistinctN()
    gen_ppl.update(texts)
    entropy.update(ids, mask)
    distinct.update(ids, mask)
    scores = {"gen_ppl": float(gen_ppl.compute()), "entropy": float(entropy.compute())}
    scores.update({name: float(v) for name, v in distinct.compute().items()})  # distinct_1, distinct_2, ...
    scores["self_bleu"] = self_bleu(ids, mask)  # between samples: 1 = collapsed onto each other
    return scores


def reference_texts(module: DiffusionLM, n: int, length: int) -> tuple[list[str], torch.Tensor]:
    """``n`` windows of ``length`` tokens of real validation text, evenly spaced over the whole split (the run's
    ``max_val_tokens`` cap, which bounds the cost of the likelihood bound, does not apply)."""
    rows = run_datamodule(module, max_val_tokens=None).dataset("validation")  # rows over the split's token map
    ids = torch.from_numpy(rows.tokens[:].astype(np.int64))  # [N]: the split's token stream, EOS between documents
    if ids.numel() < n * length:
        raise ValueError(f"the validation split has {ids.numel()} tokens, fewer than n * length = {n * length}")
    starts = torch.linspace(0, ids.numel() - length, n).long()
    windows = torch.stack([ids[s : s + length] for s in starts])  # [n, length]
    return [module.tokenizer.decode(w.tolist()) for w in windows], windows


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate(
    module: DiffusionLM,
    judge: str | None,
    sampler: dict,
    n: int = DEFAULT_EVAL_N,
    length: int | None = None,
    seeds: int = DEFAULT_SEEDS,
    val_batches: int | None = None,
    reference: bool = True,
    zero_shot: list[str] | None = None,
    zero_shot_tokens: int | None = None,
    batch_size: int | None = None,
    prompts: str | None = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    mauve: bool = False,
    infill_span: int | None = None,
) -> dict:
    """Run the protocol; returns the JSON-ready result (``metrics`` is a flat dict of scalars).

    ``prompts="val"``: the conditional protocol (``cdlm.conditional_eval``): every sample continues the first
    ``prompt_tokens`` tokens of a validation window, and Gen PPL, entropy and distinct-n are the continuations',
    given their prompts, in the samples', reference and unigram rows; ``mauve``: also MAUVE of the samples' and the
    unigram draws' continuations against the true ones, on the judge's features. ``infill_span``: the samples fill
    the middle ``infill_span`` tokens of the reference row's validation windows, the rest kept; each seed's row adds
    ``infill_accuracy`` and ``result["infill"]`` the unigram draws' expected accuracy and the span's conditional
    bound (``cdlm.infill_eval``).

    ``zero_shot``: corpora (``cdlm.zero_shot.resolve`` specs: files, folders, ``hf:`` datasets, standard names) whose
    likelihood bound is added as ``result["zero_shot"]``, one row each (at most ``zero_shot_tokens`` tokens each).
    ``batch_size``: samples per sampler call (default: all ``n`` at once); the validation and zero-shot bounds run
    in batches of the run's ``data.eval_batch_size``.
    """
    from cdlm.zero_shot import resolve, zero_shot_table

    length = sample_length(module.config, length)
    check_protocols(length, judge, prompts, prompt_tokens, mauve, infill_span)
    # first: a judge that cannot be loaded fails before any work
    scorer = build_judge(judge, device=module.device) if judge else None
    for corpus in zero_shot or []:
        resolve(corpus)  # likewise a zero-shot corpus that cannot be found
    metrics = validation_bound(module, val_batches) if val_batches != 0 else {}  # val_batches=0: samples only
    result = {"metrics": metrics, "unigram": {}, "per_seed": [], "reference": {}, "unigram_draws": {}}
    if val_batches != 0:  # the unigram model on the same validation tokens: what token frequencies alone give
        result["unigram"] = unigram_validation_bound(module, train_unigram(module), val_batches)
    if zero_shot:
        result["zero_shot"] = zero_shot_table(module, zero_shot, max_tokens=zero_shot_tokens)
    knobs = {k: v for k, v in sampler.items() if k not in ("name", "steps")}
    given, canvas = protocol_inputs(module, n, length, prompts, prompt_tokens, infill_span)
    if given is not None:
        knobs["prompt"] = [row.tolist() for row in given[0]]
    if canvas is not None:
        knobs["prompt"] = canvas
    for seed in range(seeds):
        samples, row = seed_samples(module, sampler, knobs, n, length, seed, batch_size, given, canvas)
        if scorer is not None:
            row |= sample_scores(scorer, module, samples.ids, samples.texts, given, mauve)
        result["per_seed"].append(row)
    metrics |= seed_statistics(result["per_seed"])
    if scorer is not None and reference:
        result["reference"], result["unigram_draws"] = reference_rows(scorer, module, n, length, given, mauve)
    result["protocol"] = protocol(module, scorer, sampler, n, length, seeds)
    if given is not None:
        result["protocol"]["conditional"] = conditional_protocol(prompts, prompt_tokens, length)
    if zero_shot:
        result["protocol"]["zero_shot"] = ZERO_SHOT_PROTOCOL
    if canvas is not None:
        result["infill"] = infill_row(canvas, train_unigram(module), span_bound(module, canvas))
        metrics["infill_unigram_accuracy"] = result["infill"]["unigram_accuracy"]
        metrics["infill_span_nll"] = result["infill"]["span_nll"]
        metrics["infill_unigram_span_nll"] = result["infill"]["unigram_span_nll"]
    return result


def seed_samples(
    module: DiffusionLM,
    sampler: dict,
    knobs: dict,
    n: int,
    length: int,
    seed: int,
    batch_size: int | None,
    given: tuple | None,
    canvas: Prompt | None,
) -> tuple[Samples, dict]:
    """One seed's samples and its row before the judge: NFE, seconds per sample, the decoding order's
    left-to-right-ness and ARness (masked diffusion; the prompt's positions left out) and the infilling accuracy
    (``canvas``: the infilling protocol's kept positions)."""
    fixed = canvas.fixed if canvas is not None else None if given is None else prompt_positions(n, length, given[0])
    order = decoding_order(module, fixed)
    samples = draw(module, n, length, sampler["name"], sampler["steps"], seed, order, batch_size=batch_size, **knobs)
    row = {"seed": seed, "nfe": samples.nfe, "seconds_per_sample": samples.seconds_per_sample}
    if order is not None:
        row["left_to_right"], row["arness"] = order.value(), order.arness()
    if canvas is not None:
        row["infill_accuracy"] = span_accuracy(samples.ids, canvas)
    return samples, row


def check_protocols(
    length: int, judge: str | None, prompts: str | None, prompt_tokens: int, mauve: bool, infill_span: int | None
) -> None:
    """A ``ConfigError`` for a protocol that cannot run on samples of ``length`` tokens, before any work."""
    if prompts is not None and not 0 < prompt_tokens < length:
        raise ConfigError(f"prompt_tokens={prompt_tokens} must lie in [1, length - 1] with length={length}")
    if infill_span is not None and prompts is not None:
        raise ConfigError("infill_span and prompts=val are two protocols: give one of them")
    if infill_span is not None and not 0 < infill_span < length:
        raise ConfigError(f"infill_span={infill_span} must lie in [1, length - 1] with length={length}")
    if mauve and (prompts is None or judge is None):
        raise ConfigError("mauve=true compares continuations: give prompts=val and a judge (its features)")
    if mauve:
        check_mauve()


def protocol_inputs(
    module: DiffusionLM, n: int, length: int, prompts: str | None, prompt_tokens: int, infill_span: int | None
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, Prompt | None]:
    """``(given, canvas)`` from the reference row's ``n`` validation windows: the conditional protocol's (prompts
    ``[n, k]``, true continuations ``[n, length - k]``) and the infilling canvas, each None when not asked for."""
    if prompts is None and infill_span is None:
        return None, None
    windows = reference_texts(module, n, length)[1]
    given = None if prompts is None else split_windows(windows, prompt_tokens)
    return given, None if infill_span is None else span_canvas(windows, infill_span)


def seed_statistics(rows: list[dict]) -> dict[str, float]:
    """``<key>_mean`` and ``<key>_std`` over the per-seed ``rows`` of every figure they report (a figure a seed
    could not compute, None, is left out), and the first seed's ``nfe``."""
    stats: dict[str, float] = {}
    for key in rows[0]:
        values = [float(r[key]) for r in rows if r[key] is not None]
        if key != "seed" and values:
            stats[f"{key}_mean"], stats[f"{key}_std"] = mean_std(values)
    return stats | {"nfe": rows[0]["nfe"]}


def prompt_positions(n: int, length: int, prompts: torch.Tensor) -> torch.Tensor:
    """``[n, length]`` (bool): the first ``k`` positions of every row, for prompts ``[n, k]``."""
    return (torch.arange(length) < prompts.shape[1])[None].expand(n, -1)


def decoding_order(module: DiffusionLM, fixed: torch.Tensor | None) -> DecodingOrder | None:
    """A ``DecodingOrder`` callback for a masked-diffusion model (the prompt's ``fixed`` positions left out), else
    None: the left-to-right-ness of the other families' order is fixed by their sampler."""
    if not isinstance(module.objective, AbsorbingObjective):
        return None
    return DecodingOrder(module.objective.mask_id, fixed)


def sample_scores(
    scorer, module: DiffusionLM, ids: torch.Tensor, texts: list[str], given: tuple | None, mauve: bool
) -> dict:
    """A set of samples' scores: Gen PPL, entropy, distinct-n of ``ids`` ``[n, L]`` (``texts`` decoded); under the
    conditional protocol (``given`` = prompts ``[n, k]``, true continuations) those of the continuations
    ``ids[:, k:]`` given their prompts, and with ``mauve`` their MAUVE against the true ones."""
    if given is None:
        return generative_scores(scorer, texts, ids, until_eos(module, ids))
    prompts, truth = given
    continuations = ids[:, prompts.shape[1] :]  # [n, L - k]
    scores = conditional_scores(scorer, module.tokenizer, prompts, continuations, until_eos(module, continuations))
    if mauve:
        scores["mauve"] = continuation_mauve(scorer, module.tokenizer, continuations, truth)
    return scores


def until_eos(module: DiffusionLM, ids: torch.Tensor) -> torch.Tensor | None:
    """``[n, L]`` (bool): the positions of ``ids`` up to each row's first EOS (the positions after it are padding,
    not text: ``cdlm.prompts.after_eos``), or None without a tokenizer."""
    return None if module.tokenizer is None else ~after_eos(ids, module.tokenizer.eos_id)


def reference_rows(
    scorer, module: DiffusionLM, n: int, length: int, given: tuple | None, mauve: bool
) -> tuple[dict, dict]:
    """``(reference, unigram_draws)``: real validation text and independent unigram draws scored as the samples
    are; under the conditional protocol, the true continuations and unigram draws after the same prompts (MAUVE
    for the draws only: the true continuations are its reference)."""
    unigram = train_unigram(module)
    if given is None:
        texts, ids = reference_texts(module, n, length)
        reference = generative_scores(scorer, texts, ids)
        texts, ids = unigram_texts(module, unigram, n, length)
        return reference, generative_scores(scorer, texts, ids)
    prompts, truth = given
    _, draws = unigram_texts(module, unigram, n, truth.shape[1])
    reference = sample_scores(scorer, module, torch.cat(given, 1), [], given, mauve=False)
    return reference, sample_scores(scorer, module, torch.cat([prompts, draws], 1), [], given, mauve)


def continuation_mauve(judge, tokenizer, ids: torch.Tensor, truth: torch.Tensor) -> float:
    """MAUVE of continuations ``ids`` ``[n, m]`` against the true ones ``truth`` ``[n, m]`` (decoded)."""
    decode = lambda rows: [tokenizer.decode(row.tolist()) for row in rows]  # noqa: E731
    return mauve_score(judge, decode(ids), decode(truth))

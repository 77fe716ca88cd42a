"""The conditional evaluation protocol (``cdlm eval prompts=val``; docs/math.md §8, "Conditional protocol").

Prompts are the first ``prompt_tokens`` tokens of ``n`` windows of real validation text (evenly spaced over the
split, as the reference row's windows), and the rest of each window is its true continuation. The model continues
each prompt (the prompt kept exactly, docs/sampling.md "Prompts"); the judge scores every continuation given its
prompt (conditional Gen PPL: token-weighted ``exp`` of the judge's NLL of the continuation's tokens given the
prompt's), beside the entropy and distinct-n of the continuation's own ids. The true continuations (the reference
row) and independent unigram draws after the same prompts (the unigram row) are scored the same way. With
``mauve=true``, MAUVE (Pillutla et al. 2021) compares the continuations with the true ones on the judge's features.
"""

from __future__ import annotations

import math

import torch

from cdlm.config import ConfigError
from cdlm.metrics.diversity import self_bleu
from cdlm.metrics.generative import DistinctN, UnigramEntropy

MAUVE_SEED = 25  # mauve-text's default k-means seed, fixed so a result can be reproduced

PROMPT_SOURCES = ("val",)
"""Where ``cdlm eval prompts=...`` takes its prompts from: ``val``, windows of the validation split."""


def split_windows(windows: torch.Tensor, prompt_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompts [n, k], continuations [n, L - k])`` of validation windows ``[n, L]``; a ``ValueError`` unless
    ``0 < k < L``."""
    length = windows.shape[1]
    if not 0 < prompt_tokens < length:
        raise ValueError(f"prompt_tokens must lie in [1, length - 1] = [1, {length - 1}], got {prompt_tokens}")
    return windows[:, :prompt_tokens], windows[:, prompt_tokens:]


def conditional_scores(
    judge, tokenizer, prompts: torch.Tensor, continuations: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Conditional Gen PPL of ``continuations`` ``[n, m]`` given ``prompts`` ``[n, k]`` (token ids of the run's
    tokenizer, decoded for the judge) under ``judge.score_given``, and the continuations' mean unigram entropy
    (nats) and distinct-n; ``mask`` ``[n, m]``: the continuation tokens to use (those up to an EOS)."""
    keep = torch.ones_like(continuations, dtype=torch.bool) if mask is None else mask
    prompt_texts = [tokenizer.decode(row.tolist()) for row in prompts]
    texts = [tokenizer.decode(row[m].tolist()) for row, m in zip(continuations, keep)]
    scored = judge.score_given(prompt_texts, texts)
    nll, tokens = sum(s for s, _ in scored), sum(n for _, n in scored)
    entropy, distinct = UnigramEntropy(), DistinctN()
    entropy.update(continuations, keep)
    distinct.update(continuations, keep)
    scores = {"gen_ppl": math.exp(nll / max(tokens, 1)), "judge_tokens": tokens, "entropy": float(entropy.compute())}
    scores["self_bleu"] = self_bleu(continuations, keep)
    return scores | {name: float(v) for name, v in distinct.compute().items()}


def check_mauve() -> None:
    """A ``ConfigError`` naming the extra when ``mauve-text`` is not installed (before any work)."""
    try:
        import mauve  # noqa: F401
    except ImportError as err:
        raise ConfigError("mauve=true needs the mauve-text package: pip install -e '.[mauve]'") from err


def mauve_score(judge, texts: list[str], references: list[str], seed: int = MAUVE_SEED) -> float:
    """MAUVE of ``texts`` against ``references`` (Pillutla et al. 2021: the area under the divergence frontier of
    the two feature histograms after joint k-means quantisation), on the judge's features (``judge.features``: the
    last hidden state of each text, so it runs offline). It needs hundreds of texts per set: mauve-text quantises into
    ``n / 10`` clusters, and at ``n`` = 16 even unigram draws score 1.0 (bench/results/conditional/)."""
    check_mauve()
    import mauve

    p = judge.features(texts).double().numpy()  # [n, d]
    q = judge.features(references).double().numpy()  # [m, d]
    return float(mauve.compute_mauve(p_features=p, q_features=q, seed=seed, verbose=False).mauve)

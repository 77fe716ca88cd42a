"""Gen PPL judges: causal LMs that score decoded samples (docs/math.md §8, "Gen PPL").

The fixed protocol, shared by every judge here:

- retokenise each decoded text with the judge's own tokenizer (no specials added by the tokenizer);
- drop every token after the first EOS of the retokenised text; the first EOS itself is kept and scored
  (the judge is charged for ending the text there), as in MDLM's generative-perplexity evaluation;
- every remaining token is scored: ``HFJudge`` prepends the judge's BOS (its EOS when it has no BOS, as GPT-2)
  as unscored context, a cdlm autoregressive judge scores its first token through its own BOS;
- a text longer than the judge's context is cut into consecutive, non-overlapping windows, each scored as an
  independent sequence (with its own BOS), so every token is scored exactly once;
- the judge runs in float32 (on the evaluated model's device in ``cdlm eval``), and ``score`` returns per text
  ``(sum of token NLL in nats, tokens)`` so that callers aggregate token-weighted:
  ``Gen PPL = exp(sum NLL / sum tokens)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

EOS_RULE = "keep-first-eos: tokens after the first EOS of the retokenised text are dropped; that EOS is scored"
DEFAULT_CONTEXT = 1024  # when neither the model config nor the tokenizer states a context length


@runtime_checkable
class Judge(Protocol):
    """A causal LM that scores texts for Gen PPL (docs/math.md §8)."""

    name: str
    eos_rule: str
    tokenizer_name: str

    def score(self, texts: list[str]) -> list[tuple[float, int]]:
        """Per text: (sum of token NLL in nats, number of scored tokens)."""
        ...

    def score_given(self, prompts: list[str], texts: list[str]) -> list[tuple[float, int]]:
        """Per pair: (sum of the NLL of the text's tokens given the prompt's, number of the text's tokens)."""
        ...


def truncate_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """``ids`` up to and including the first ``eos_id`` (the protocol's EOS rule); all of them if none."""
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive non-overlapping chunks of at most ``size`` tokens (none for an empty text)."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def given_rows(context: list[int], ids: list[int], size: int) -> list[tuple[list[int], int]]:
    """Rows of at most ``size`` tokens that score ``ids`` after ``context``: ``(row, start)`` with the tokens of
    ``row[start:]`` scored. ``ids`` is cut into windows of ``size // 2`` or fewer tokens, each read after as many of
    the tokens before it (``context`` then the earlier windows) as fit."""
    step = max(size // 2, 1)
    rows = []
    for begin in range(0, len(ids), step):
        window = ids[begin : begin + step]
        before = (context + ids[:begin])[-(size - len(window)) :] if size > len(window) else []
        rows.append((before + window, len(before)))
    return rows


def padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` right-padded with ``pad_id``: ids ``[B, W]`` (int64) and the mask of real tokens ``[B, W]`` (bool;
    ``W`` at least 1)."""
    width = max(max((len(r) for r in rows), default=0), 1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def _gather(rows: list[list[int]], owners: list[int], n_texts: int, row_scores: list[float]) -> list[tuple[float, int]]:
    totals = [[0.0, 0] for _ in range(n_texts)]
    for row, owner, nll in zip(rows, owners, row_scores):
        totals[owner][0] += nll
        totals[owner][1] += len(row)
    return [(float(s), int(n)) for s, n in totals]


class JudgeError(ValueError):
    """A judge that cannot be loaded; the message says what a judge may be."""


class HFJudge:
    """Any ``transformers`` causal LM (hub name or local path) as a Gen PPL judge, in float32 on ``device``.

    Protocol (docs/math.md §8): the text is retokenised with the judge's tokenizer, cut after its first EOS
    (kept), split into windows of ``context - 1`` tokens, and each window is scored as ``[BOS] + window``
    where BOS is the tokenizer's ``bos_token`` or, when it has none, its ``eos_token``. Rows are batched with
    right padding and an attention mask; the result equals scoring each text alone.

    Args:
        name_or_path: a model name or a local ``save_pretrained`` folder (model and tokenizer).
        max_length: the judge's context in tokens, BOS included; default the model's
            ``max_position_embeddings`` / ``n_positions`` (capped by the tokenizer's ``model_max_length``).
        batch_size: rows (windows) per forward pass.
        device: where the judge runs (the evaluated model's device in ``cdlm eval``); float32 on every device.
    """

    eos_rule = EOS_RULE

    def __init__(
        self, name_or_path: str, max_length: int | None = None, batch_size: int = 8, device: str = "cpu"
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(name_or_path)
        try:  # never a model class of the folder's own (trust_remote_code=False)
            self.tokenizer = AutoTokenizer.from_pretrained(self.name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(self.name, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            raise JudgeError(
                f"judge={self.name!r} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); give "
                "an autoregressive cdlm run (RUN_DIR/final or a .ckpt), a local transformers folder, or a hub name "
                "(downloaded, so it needs the network)"
            ) from err
        self.tokenizer_name = str(getattr(self.tokenizer, "name_or_path", "") or self.name)
        self.device = torch.device(device)
        self.model = model.float().to(self.device).eval()  # float32 whatever dtype the weights were stored in
        self.batch_size = int(batch_size)
        self.eos_id: int | None = self.tokenizer.eos_token_id
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id
        if bos is None:
            raise ValueError(f"judge {self.name!r} has neither a BOS nor an EOS token to score the first token with")
        self.bos_id = int(bos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.bos_id  # padded positions are masked out anyway
        self.max_length = int(max_length) if max_length is not None else self._context()
        if self.max_length < 2:
            raise ValueError(f"judge context must be >= 2 tokens (BOS + one token), got {self.max_length}")

    def _context(self) -> int:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                context = value
                break
        else:
            context = DEFAULT_CONTEXT
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 1 < tok_max < context:
            context = tok_max
        return context

    def encode(self, text: str) -> list[int]:
        """The judge's ids for ``text`` (no specials added), cut by the EOS rule."""
        return truncate_at_eos(self.prompt_ids(text), self.eos_id)

    def prompt_ids(self, text: str) -> list[int]:
        """The judge's ids for ``text`` (no specials added), whole."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    @torch.no_grad()
    def _score_rows(self, rows: list[list[int]], starts: list[int] | None = None) -> list[float]:
        """Sum NLL (nats) of the tokens ``row[start:]`` of each row (every token by default) given ``[BOS] + row``
        as input; float64 sums."""
        out: list[float] = []
        starts = [0] * len(rows) if starts is None else starts
        for start in range(0, len(rows), self.batch_size):
            chunk = [[self.bos_id, *row] for row in rows[start : start + self.batch_size]]
            first = torch.tensor(starts[start : start + self.batch_size])[:, None]  # [B, 1]
            ids, mask = padded(chunk, self.pad_id)
            width = ids.shape[1]
            ids, mask = ids.to(self.device), mask.long().to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # [B, W, V]
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, W - 1]
            scored = mask[:, 1:].cpu().bool() & (torch.arange(width - 1)[None] >= first)  # [B, W - 1]
            nll = -(logp.double() * scored.to(logp.device))
            out.extend(nll.sum(-1).tolist())
        return out

    def score(self, texts: list[str]) -> list[tuple[float, int]]:
        """Per text ``(sum NLL in nats, scored tokens)`` under the protocol in the class docstring."""
        rows: list[list[int]] = []
        owners: list[int] = []
        for k, text in enumerate(texts):
            for window in windows(self.encode(text), self.max_length - 1):
                rows.append(window)
                owners.append(k)
        return _gather(rows, owners, len(texts), self._score_rows(rows))

    def score_given(self, prompts: list[str], texts: list[str]) -> list[tuple[float, int]]:
        """Per pair ``(sum NLL of the text's tokens given the prompt's, the text's tokens)``: prompt and text are
        encoded apart (the text cut by the EOS rule) and read as one sequence (``given_rows``)."""
        return score_given(self, prompts, texts, self.max_length - 1)

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        """``[n, d]`` float32: the last layer's hidden state at each text's last token (its first ``max_length - 1``
        tokens after BOS, cut by the EOS rule), the text feature MAUVE compares (docs/math.md §8)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [[self.bos_id, *self.encode(t)][: self.max_length] for t in texts[start : start + self.batch_size]]
            ids, mask = padded(chunk, self.pad_id)
            ids, mask = ids.to(self.device), mask.long().to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            out.append(hidden[torch.arange(len(chunk)), mask.sum(1) - 1].float().cpu())  # [b, d]
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"HFJudge({self.name!r}, max_length={self.max_length})"


class CdlmJudge:
    """A cdlm autoregressive checkpoint (``save_pretrained`` folder or ``.ckpt``) as a Gen PPL judge.

    Protocol (docs/math.md §8): texts are encoded with the model's own tokenizer, cut after the first EOS
    (kept), split into windows of ``max_length`` tokens, and each window is scored with the objective's exact
    per-token NLL (``objective.nll``), which scores every token, the first one through the model's own BOS.

    Args:
        path: the checkpoint; its objective must be autoregressive (``objective.space == "autoregressive"``).
        max_length: window length in tokens (the model's trained length or less).
        batch_size: windows per forward pass.
        device: where the judge runs (float32 on every device).
    """

    eos_rule = EOS_RULE

    def __init__(self, path: str, max_length: int = 256, batch_size: int = 8, device: str = "cpu") -> None:
        from cdlm.checkpoint import load

        self.name = str(path)
        model = load(path, device=device)
        space = getattr(model.objective, "space", None)
        if space != "autoregressive":
            raise ValueError(
                f"{path} holds a {type(model.objective).__name__} model (objective.space={space!r}); a cdlm Gen PPL "
                "judge needs an autoregressive checkpoint (objective=autoregressive) with an exact likelihood"
            )
        if model.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer; a judge must retokenise decoded text")
        self.model = model.float().eval()
        self.tokenizer = model.tokenizer
        self.tokenizer_name = f"{self.tokenizer.kind}:{self.tokenizer.name}"
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.eos_id = int(self.tokenizer.eos_id)
        self.pad_id = int(self.tokenizer.pad_id)

    def encode(self, text: str) -> list[int]:
        """The model's ids for ``text``, cut by the EOS rule."""
        return truncate_at_eos(self.tokenizer.encode(text), self.eos_id)

    def prompt_ids(self, text: str) -> list[int]:
        """The model's ids for ``text``, whole."""
        return self.tokenizer.encode(text)

    @torch.no_grad()
    def _score_rows(self, rows: list[list[int]], starts: list[int] | None = None) -> list[float]:
        """Sum NLL (nats) of the tokens ``row[start:]`` of each row (every token by default); float64 sums."""
        out: list[float] = []
        lengths = self.tokenizer.char_lengths()
        starts = [0] * len(rows) if starts is None else starts
        for start in range(0, len(rows), self.batch_size):
            first = torch.tensor(starts[start : start + self.batch_size])[:, None]  # [B, 1]
            chunk = rows[start : start + self.batch_size]
            ids, mask = padded(chunk, self.pad_id)
            width = ids.shape[1]
            batch = {"input_ids": ids, "attention_mask": mask, "n_chars": (lengths[ids] * mask).sum(-1)}
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            mask = batch["attention_mask"]
            result = self.model.objective.nll(batch)
            scored = mask & (torch.arange(width, device=mask.device)[None] >= first.to(mask.device))  # [B, W]
            out.extend((result.nll.double() * scored).sum(-1).tolist())
        return out

    def score(self, texts: list[str]) -> list[tuple[float, int]]:
        """Per text ``(sum NLL in nats, scored tokens)`` under the protocol in the class docstring."""
        rows: list[list[int]] = []
        owners: list[int] = []
        for k, text in enumerate(texts):
            for window in windows(self.encode(text), self.max_length):
                rows.append(window)
                owners.append(k)
        return _gather(rows, owners, len(texts), self._score_rows(rows))

    def score_given(self, prompts: list[str], texts: list[str]) -> list[tuple[float, int]]:
        """Per pair ``(sum NLL of the text's tokens given the prompt's, the text's tokens)`` (``given_rows``)."""
        return score_given(self, prompts, texts, self.max_length)

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        """``[n, W]`` float32: the hidden state after each text's last token (its first ``max_length`` tokens, cut
        by the EOS rule; ``Autoregressive.features``), the text feature MAUVE compares (docs/math.md §8)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [self.encode(t)[: self.max_length] for t in texts[start : start + self.batch_size]]
            ids, mask = padded(chunk, self.pad_id)
            device = self.model.device
            out.append(self.model.objective.features(ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"CdlmJudge({self.name!r}, max_length={self.max_length})"


def score_given(judge, prompts: list[str], texts: list[str], size: int) -> list[tuple[float, int]]:
    """``Judge.score_given`` for a judge with ``prompt_ids``, ``encode`` and ``_score_rows(rows, starts)``: each
    prompt and text
    encoded apart (the prompt's EOS rule does not apply to it: a prompt may hold EOS between documents), rows of at
    most ``size`` tokens."""
    if len(prompts) != len(texts):
        raise ValueError(f"give one prompt per text, got {len(prompts)} prompts and {len(texts)} texts")
    rows: list[list[int]] = []
    starts: list[int] = []
    owners: list[int] = []
    for k, (prompt, text) in enumerate(zip(prompts, texts)):
        for row, start in given_rows(judge.prompt_ids(prompt), judge.encode(text), size):
            rows.append(row)
            starts.append(start)
            owners.append(k)
    scores = judge._score_rows(rows, starts)
    totals = [[0.0, 0] for _ in texts]
    for row, start, owner, nll in zip(rows, starts, owners, scores):
        totals[owner][0] += nll
        totals[owner][1] += len(row) - start
    return [(float(total), int(n)) for total, n in totals]


def is_cdlm_checkpoint(spec: str | Path) -> bool:
    """A ``save_pretrained`` folder (``config.yaml`` + ``model.safetensors``) or a ``.ckpt`` file."""
    path = Path(spec)
    if path.is_dir():
        return (path / "config.yaml").is_file() and (path / "model.safetensors").is_file()
    return path.suffix == ".ckpt"


def build_judge(spec: str, max_length: int | None = None, batch_size: int = 8, device: str = "cpu") -> Judge:
    """The judge ``spec`` names (docs/math.md §8): a cdlm checkpoint -> ``CdlmJudge``, else ``HFJudge``.

    ``max_length`` is the judge's context (``CdlmJudge`` defaults to 256, ``HFJudge`` to the model's own); the judge
    runs in float32 on ``device``.
    """
    kwargs: dict[str, Any] = {"batch_size": batch_size, "device": str(device)}
    if is_cdlm_checkpoint(spec):
        return CdlmJudge(str(spec), max_length=max_length or 256, **kwargs)
    return HFJudge(str(spec), max_length=max_length, **kwargs)

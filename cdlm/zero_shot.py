"""Zero-shot likelihood: a model's bound on corpora it was not trained on (the table of MDLM and SEDD).

Protocol (that of MDLM and SEDD: the test text retokenised with the model's own tokenizer, documents joined with EOS
and cut into blocks of the model's length): each corpus is read as documents, every document (an empty or
whitespace-only one dropped) is tokenised with the model's tokenizer with EOS after it, and the stream is packed into
the run's ``data.seq_len`` blocks (or, for a run trained without ``packing``, one document per padded row), exactly as
the run's own validation split (``cdlm.data``: the same token cache, the same rows). The bound is the objective's
``nll`` under the module's fixed evaluation noise (batch ``i`` seeded by ``(seed, -1, i)``, as the validation bound),
with the checkpoint's (EMA) weights. Unlike MDLM (a BOS and an EOS per block, the last partial block dropped), cdlm
adds no BOS and scores the last block padded: every token of the text counts once. No detokenisation is applied:
the text is scored as the corpus stores it.

What is scored: a local ``.txt`` file (one document), ``.jsonl`` file (one document per line, ``text_field``) or
folder of them: all of its text (no split is held out). ``hf:<name>[:<config>]`` (a Hugging Face hub dataset) or
``hf:<saved folder>`` (``load_from_disk``): the split ``Corpus.split`` names, by default its ``test`` split if it has
one, else its ``validation`` split (a dataset with one split only, or a saved ``Dataset``: that one). The standard
corpora of ``ZERO_SHOT`` name the split MDLM and SEDD score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cdlm.data.datamodule import TextDataModule
from cdlm.data.documents import Documents, LoadedDocuments, digest, files_fingerprint
from cdlm.data.sources import MissingDependencyError, SourceError, read_file, read_folder
from cdlm.data.token_cache import MANIFEST
from cdlm.metrics.likelihood import score_batches
from cdlm.module import DiffusionLM

SCORED = "scored-"  # the token cache's one split is named SCORED + the corpus's split ("all" for a local source)


@dataclass(frozen=True)
class Corpus:
    """A zero-shot corpus: ``source`` (a ``.txt`` / ``.jsonl`` file, a folder of them, ``hf:<name>[:<config>]`` or
    ``hf:<saved folder>``), the ``text_field`` of its rows (``.jsonl`` and ``hf:``), and for ``hf:`` the ``split`` to
    score (None: ``test`` if the dataset has one, else ``validation``)."""

    source: str
    text_field: str = "text"
    split: str | None = None


# The corpora of the zero-shot table of MDLM (Sahoo et al. 2024, its dataloader.py) and SEDD (Lou et al. 2024): the
# Hugging Face datasets, configs, text fields and splits their code loads. Hub names need the network the first time
# (a token cache is kept, keyed by the corpus and the tokenizer). ``scientific_papers`` is a loading-script dataset
# that ``datasets>=4`` refuses: load it with an older ``datasets``, ``save_to_disk`` it and score
# ``Corpus("hf:<that folder>", "article", "validation")``. LAMBADA: MDLM and SEDD read OpenAI's lambada_test.jsonl,
# which is the default config of EleutherAI/lambada_openai. MDLM and SEDD score the validation split of Wikitext, PTB
# and the scientific papers, and the test split of AG News and LAMBADA.
ZERO_SHOT: dict[str, Corpus] = {
    "wikitext2": Corpus("hf:wikitext:wikitext-2-raw-v1", split="validation"),
    "wikitext103": Corpus("hf:wikitext:wikitext-103-raw-v1", split="validation"),
    "ptb": Corpus("hf:ptb_text_only", "sentence", split="validation"),
    "lambada": Corpus("hf:EleutherAI/lambada_openai", split="test"),
    "ag_news": Corpus("hf:ag_news", split="test"),
    "pubmed": Corpus("hf:scientific_papers:pubmed", "article", split="validation"),
    "arxiv": Corpus("hf:scientific_papers:arxiv", "article", split="validation"),
}


def resolve(spec: str | Corpus) -> Corpus:
    """The ``Corpus`` of ``spec``: an existing ``.txt`` / ``.jsonl`` file or folder, a name of ``ZERO_SHOT``, or
    ``hf:<name>[:<config>]`` / ``hf:<saved folder>``. Checked without reading the corpus."""
    if isinstance(spec, Corpus):
        return spec
    if Path(spec).expanduser().exists():  # a file of a kind cdlm.data cannot read is refused when it is read
        return Corpus(spec)
    if spec in ZERO_SHOT:
        return ZERO_SHOT[spec]
    if spec.startswith("hf:") and spec[3:].strip(": "):
        return Corpus(spec)
    raise SourceError(
        f"zero-shot corpus {spec!r} not found: give a .txt or .jsonl file, a folder of them, "
        f"hf:<name>[:<config>], hf:<saved folder>, or one of {sorted(ZERO_SHOT)}"
    )


def hf_name(source: str) -> tuple[str, str | None]:
    """``(name or saved folder, config or None)`` of ``hf:<name>[:<config>]`` / ``hf:<saved folder>``."""
    rest = source.removeprefix("hf:")
    if Path(rest).expanduser().exists():
        return str(Path(rest).expanduser()), None
    name, _, config = rest.partition(":")
    return name, config or None


def pick_split(available: list[str], split: str | None, source: str) -> str:
    """``split`` if given, else ``test``, else ``validation``, else the only split; an error naming the splits."""
    if split is None:
        split = next((s for s in ("test", "validation") if s in available), None)
        split = split or (available[0] if len(available) == 1 else None)
    if split is None or split not in available:
        raise SourceError(
            f"zero-shot corpus {source!r} has no split {split or 'test or validation'!r} (it has {sorted(available)})"
        )
    return split


def column(rows, text_field: str, source: str) -> list[str]:
    """The ``text_field`` column of a ``datasets.Dataset`` as strings (null values skipped)."""
    if text_field not in rows.column_names:
        raise SourceError(
            f"zero-shot corpus {source!r} has no column {text_field!r} (columns: {rows.column_names}); "
            "set Corpus.text_field"
        )
    return [str(t) for t in rows[text_field] if t is not None]


def read_hf_split(corpus: Corpus) -> tuple[str, list[str]]:
    """``(split, documents)`` of an ``hf:`` corpus; from the hub only the scored split is loaded."""
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError(
            f'zero-shot corpus {corpus.source!r} needs the `datasets` package: pip install "cdlm[hf]"'
        ) from e
    name, config = hf_name(corpus.source)
    if Path(name).exists():
        data = datasets.load_from_disk(name)
        if isinstance(data, datasets.Dataset):  # no splits: all of it
            return "all", column(data, corpus.text_field, corpus.source)
        split = pick_split(list(data), corpus.split, corpus.source)
        return split, column(data[split], corpus.text_field, corpus.source)
    available = [corpus.split] if corpus.split else datasets.get_dataset_split_names(name, config)
    split = pick_split(available, corpus.split, corpus.source)
    return split, column(datasets.load_dataset(name, config, split=split), corpus.text_field, corpus.source)


def read_corpus(corpus: Corpus) -> tuple[str, list[str]]:
    """``(split, documents)``: what is scored of ``corpus`` (``all`` of a local source); blank documents dropped."""
    if corpus.source.startswith("hf:"):
        split, docs = read_hf_split(corpus)
    else:
        path = Path(corpus.source).expanduser()
        split = "all"
        docs = read_folder(path, corpus.text_field) if path.is_dir() else read_file(path, corpus.text_field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SourceError(f"zero-shot corpus {corpus.source!r} ({split}) contains no text")
    return split, docs


def saved_states(name: str) -> list[str]:
    """The ``state.json`` files of a dataset saved with ``save_to_disk`` (its own fingerprints); none for a hub name."""
    path = Path(name)
    return [p.read_text() for p in sorted(path.rglob("state.json"))] if path.is_dir() else []


def corpus_documents(corpus: Corpus) -> Documents:
    """``corpus`` as ``Documents`` with one split, ``SCORED + <split>``, read only when a token cache is built.

    The fingerprint (the token cache's key) is that of a local source's files, or of an ``hf:`` corpus's name,
    config, split and saved state (a hub dataset: its name; its files are not expected to change); it differs from
    the fingerprint of the same source used for training, whose validation split is held out.
    """
    if corpus.source.startswith("hf:"):
        name, config = hf_name(corpus.source)
        source_print = digest(name, config, saved_states(name))
    else:
        source_print = files_fingerprint(Path(corpus.source).expanduser())
    fingerprint = digest("zero-shot", source_print, corpus.split, corpus.text_field)

    def load() -> dict[str, list[str]]:
        split, docs = read_corpus(corpus)
        return {SCORED + split: docs}

    return LoadedDocuments(corpus.source, fingerprint, load)


class CorpusDataModule(TextDataModule):
    """A ``TextDataModule`` over one zero-shot corpus (``corpus_documents``): the same token cache and rows as a
    run's validation split, without a held-out split."""

    def __init__(self, corpus: Corpus, **kwargs) -> None:
        super().__init__(source=corpus.source, text_field=corpus.text_field, **kwargs)
        self.corpus_docs = corpus_documents(corpus)

    def documents(self) -> Documents:
        return self.corpus_docs


def scored_split(cache: Path) -> str:
    """The one split of a zero-shot token cache (its name is ``SCORED + <the corpus's split>``)."""
    splits = list(json.loads((cache / MANIFEST).read_text())["splits"])
    if len(splits) != 1 or not splits[0].startswith(SCORED):
        raise ValueError(f"{cache} is not the token cache of a zero-shot corpus (splits {splits})")
    return splits[0]


def corpus_data(module: DiffusionLM, corpus: Corpus, max_tokens: int | None, workers: int) -> CorpusDataModule:
    """The corpus's data module with the model's tokenizer, ``seq_len``, packing and token cache folder."""
    data = module.config.get("data", {})
    datamodule = CorpusDataModule(
        corpus,
        tokenizer=module.tokenizer.kind,
        seq_len=int(data.get("seq_len", 256)),
        packing=bool(data.get("packing", True)),
        batch_size=1,  # unused: only the scored split is read
        max_val_tokens=max_tokens,
        cache_dir=data.get("cache_dir"),
        prepare_workers=workers,
    )
    datamodule.set_tokenizer(module.tokenizer)
    return datamodule


def eval_batch_size(module: DiffusionLM) -> int:
    """The run's evaluation batch size (``data.eval_batch_size``, else ``data.batch_size``)."""
    data = module.config.get("data", {})
    return int(data.get("eval_batch_size") or data.get("batch_size", 32))


@torch.no_grad()
def zero_shot_bound(
    module: DiffusionLM,
    corpus: str | Corpus,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    workers: int = 1,
) -> dict:
    """The model's likelihood bound on ``corpus`` (a spec for ``resolve``, or a ``Corpus``); see the module docstring.

    ``max_tokens``: score the first rows up to this many tokens (None: all of the scored text). ``batch_size``: rows
    per batch (None: the run's evaluation batch size; it is part of the fixed noise, so keep it to compare numbers).
    ``dtype``: autocast dtype of the network (None: full precision). ``workers``: tokenising processes.

    Returns ``corpus`` (the spec), ``source``, ``split``, ``text_field``, ``nll`` (nats/token), ``ppl``, ``bpc``
    (bits/char: ``nll * tokens / (chars * ln 2)``), ``tokens`` (scored, EOS included), ``chars`` (their decoded
    characters), ``seq_len``, ``packing``, ``max_tokens``.
    """
    resolved = resolve(corpus)
    datamodule = corpus_data(module, resolved, max_tokens, workers)
    split = scored_split(datamodule.token_cache())
    loader = DataLoader(datamodule.dataset(split), batch_size=batch_size or eval_batch_size(module), shuffle=False)
    metric = score_batches(module, loader, dtype=dtype)
    values = {k: float(v) for k, v in metric.compute().items()}
    return {
        "corpus": corpus if isinstance(corpus, str) else resolved.source,
        "source": resolved.source,
        "split": split.removeprefix(SCORED),
        "text_field": resolved.text_field,
        **values,
        "tokens": int(metric.tokens),
        "chars": int(metric.chars),
        "seq_len": datamodule.seq_len,
        "packing": datamodule.packing,
        "max_tokens": max_tokens,
    }


def zero_shot_table(
    module: DiffusionLM,
    corpora: list[str | Corpus],
    max_tokens: int | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> list[dict]:
    """``zero_shot_bound`` of each corpus, one row each, in order (every spec is resolved before any is scored)."""
    for corpus in corpora:
        resolve(corpus)
    return [zero_shot_bound(module, corpus, max_tokens, batch_size, dtype) for corpus in corpora]

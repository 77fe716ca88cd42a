"""Streamed sources: a Hugging Face dataset read with ``streaming=True``, tokenised on the fly (docs/data.md,
"Streaming").

For corpora that do not fit on disk. Each rank reads its own part of the training stream
(``datasets.distributed.split_dataset_by_node``: whole shards when their count divides the world size, else every
``W``-th document), tokenises it and cuts it into rows as the token cache's rows are cut (``packing``: documents
joined with EOS in wrap-around blocks of ``L``; else each document with its EOS in its own padded chunks). The
stream's position (the dataset's own ``state_dict``), the tokens carried into the next row and the pass number are
the loader's resumable state, so a resumed run reads on from the same token. Validation is the first
``max_val_tokens`` tokens of the validation split (or of ``validation_docs`` documents held out at the head of the
train stream, which training then skips), read once into memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from cdlm.data.hf_sources import is_saved_dataset
from cdlm.data.sources import SourceError, SourceOptions, import_datasets
from cdlm.data.tokenizers import Tokenizer

Row = dict[str, torch.Tensor]
ENDLESS = 1 << 50  # rows "in" an endless stream (see StreamedRows.__len__)


def check_streamable(source: str, tokenizer: str, num_workers: int) -> None:
    """``streaming=true`` needs a dataset by name (``hf:<name>``), a tokenizer not trained on the corpus, and the
    loader in the training process (a worker process would repeat the rank's rows)."""
    if not source.startswith("hf:") or is_saved_dataset(Path(source[3:])):
        raise ValueError(
            f"streaming=true reads a Hugging Face dataset by name ('hf:<name>', or 'hf:json' with data_files); "
            f"{source!r} is a local source: leave streaming=false and its token cache is built once"
        )
    if tokenizer not in ("hf", "byte"):
        raise ValueError(
            f"streaming=true needs a tokenizer that is not trained on the corpus ('hf' or 'byte'), got {tokenizer!r}"
        )
    if num_workers:
        raise ValueError(
            f"streaming=true reads the stream in the training process: num_workers must be 0, got {num_workers}"
        )


class StreamSource:
    """The splits of ``hf:<name>`` opened with ``streaming=True`` (nothing is downloaded or read until iterated)."""

    def __init__(self, name: str, options: SourceOptions) -> None:
        if options.hf_splits is not None and any("[" in v for v in options.hf_splits.values()):
            raise ValueError(
                f"streaming reads whole splits: hf_splits slices such as 'train[:1%]' cannot be streamed, "
                f"got {options.hf_splits!r}"
            )
        self.name, self.options = name, options
        self._splits: dict[str, Any] | None = None

    def splits(self) -> dict[str, Any]:
        """cdlm split name -> the dataset's ``IterableDataset`` (``hf_splits`` maps the names)."""
        if self._splits is None:
            datasets = import_datasets(f"source 'hf:{self.name}'")
            opts = self.options
            own = datasets.load_dataset(self.name, opts.hf_config, data_files=opts.data_files, streaming=True)
            own = {"train": own} if isinstance(own, datasets.IterableDataset) else dict(own)
            mapping = opts.hf_splits or {s: s for s in ("train", "validation", "test") if s in own}
            if missing := sorted(set(mapping.values()) - set(own)):
                raise SourceError(
                    f"hf dataset {self.name!r} has no split(s) {missing} (found {sorted(own)}); set hf_splits"
                )
            if "train" not in mapping:
                raise SourceError(f"hf dataset {self.name!r} has no 'train' split (found {sorted(own)})")
            self._splits = {split: own[spec] for split, spec in mapping.items()}
        return self._splits

    def held_out_docs(self) -> int:
        """Documents held out at the head of the train stream as validation (0 when the source has its own)."""
        if "validation" in self.splits() or "test" in self.splits():
            return 0
        if self.options.validation_docs is None:
            raise ValueError(
                f"streamed source 'hf:{self.name}' has no validation split: set validation_docs (documents held out "
                "at the head of the train stream) or hf_splits.validation"
            )
        return self.options.validation_docs

    def texts(self, split: str, rank: int = 0, world: int = 1) -> Any:
        """The ``IterableDataset`` of ``split``'s documents on ``rank`` of ``world`` (validation: the held-out head of
        train if the source has no validation split; train: without that head)."""
        splits, held = self.splits(), self.held_out_docs()
        if split == "validation" and held:
            ds = splits["train"].take(held)
        elif split == "validation":
            ds = splits.get("validation", splits.get("test"))
        else:
            ds = splits[split].skip(held) if split == "train" and held else splits[split]
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        return ds

    def documents(self, ds: Any) -> Iterator[str]:
        """The non-empty documents of a streamed dataset."""
        field = self.options.text_field
        for example in ds:
            if field not in example:
                raise SourceError(
                    f"hf dataset {self.name!r} has no column {field!r} (columns: {sorted(example)}); set text_field"
                )
            text = example[field]
            if text is not None and str(text).strip():
                yield str(text)


def cut_rows(ids: list[int], seq_len: int, packing: bool) -> tuple[list[list[int]], list[int]]:
    """Complete rows from the front of ``ids`` and what is carried into the next: wrap-around blocks of ``seq_len``
    (``packing``), else every chunk of one document (its last chunk short, padded later; nothing carried)."""
    n_full = len(ids) // seq_len
    rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_full)]
    rest = ids[n_full * seq_len :]
    if packing:
        return rows, rest
    return rows + ([rest] if rest else []), []


def as_row(ids: list[int], seq_len: int, pad_id: int, char_lengths: torch.Tensor) -> Row:
    """``{"input_ids": [L], "attention_mask": [L], "n_chars": []}`` of ``ids`` (at most ``L``) padded to ``L``."""
    row = torch.full((seq_len,), pad_id, dtype=torch.long)  # [L]
    row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.arange(seq_len) < len(ids)  # [L]
    return {"input_ids": row, "attention_mask": mask, "n_chars": (char_lengths[row] * mask).sum()}


class RowStream:
    """The iterator of ``StreamedRows``: rows in order, forever (pass after pass); ``state_dict`` / ``load_state_dict``
    hold the position (``datasets.IterableDataset.state_dict``), the carried tokens and the pass."""

    def __init__(self, rows: StreamedRows) -> None:
        self.rows, self.epoch, self.carry, self.stream_state = rows, 0, [], None
        self._ds: Any = None
        self._docs: Iterator[str] | None = None
        self._ready: list[list[int]] = []
        self._read_this_pass = False

    def __iter__(self) -> RowStream:
        return self

    def _open(self) -> None:
        self._ds = self.rows.open_stream()
        self._ds.set_epoch(self.epoch)
        self._read_this_pass = self.stream_state is not None  # resumed inside a pass that has read documents
        if self.stream_state is not None:
            self._ds.load_state_dict(self.stream_state)
        self._docs = self.rows.source.documents(self._ds)

    def __next__(self) -> Row:
        rows = self.rows
        while not self._ready:
            if self._docs is None:
                self._open()
            doc = next(self._docs, None)
            if doc is None:  # the end of this pass: start the next one
                if not self._read_this_pass:
                    raise SourceError(f"streamed source {rows.spec!r} has no training documents on rank {rows.rank}")
                self.epoch, self.stream_state, self._docs = self.epoch + 1, None, None
                continue
            self._read_this_pass = True
            self._ready, self.carry = cut_rows(self.carry + rows.encode(doc), rows.seq_len, rows.packing)
        return as_row(self._ready.pop(0), rows.seq_len, rows.pad_id, rows.char_lengths)

    def state_dict(self) -> dict[str, Any]:
        """Rows already cut from the last document read are not yet served: they are kept in the state as well."""
        stream = self._ds.state_dict() if self._docs is not None else self.stream_state  # just after the last document
        ready = [list(r) for r in self._ready]
        return {"epoch": self.epoch, "stream": stream, "carry": list(self.carry), "ready": ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.stream_state = int(state["epoch"]), state["stream"]
        self.carry, self._ready = list(state["carry"]), [list(r) for r in state["ready"]]
        self._docs = None


class StreamedRows(IterableDataset):
    """Training rows of ``L`` tokens of this rank's part of a streamed source (see the module docstring)."""

    def __init__(
        self,
        source: StreamSource,
        tokenizer: Tokenizer,
        seq_len: int,
        packing: bool,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.source, self.tokenizer, self.seq_len, self.packing = source, tokenizer, seq_len, packing
        self.rank, self.world, self.spec = rank, world, f"hf:{source.name}"
        self.pad_id, self.char_lengths = tokenizer.pad_id, tokenizer.char_lengths()

    def open_stream(self) -> Any:
        return self.source.texts("train", self.rank, self.world)

    def encode(self, doc: str) -> list[int]:
        return [*self.tokenizer.encode(doc), self.tokenizer.eos_id]

    def __iter__(self) -> RowStream:
        return RowStream(self)

    def __len__(self) -> int:
        """``ENDLESS``: the stream repeats pass after pass, and a sized loader is what keeps Lightning from fetching a
        batch ahead, which would put the loader's saved position one batch past the trained one."""
        return ENDLESS


def read_tokens(
    docs: Iterator[str], encode: Callable[[str], list[int]], max_tokens: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The token stream (EOS after each document) ``[N]`` int64 and document offsets ``[D + 1]`` of ``docs``, read
    until ``max_tokens`` tokens (None: all)."""
    tokens, offsets = [], [0]
    for doc in docs:
        tokens.extend(encode(doc))
        offsets.append(len(tokens))
        if max_tokens is not None and len(tokens) >= max_tokens:
            break
    return np.asarray(tokens, dtype=np.int64), np.asarray(offsets, dtype=np.int64)

"""``TextDataModule``: a text source + a tokenizer -> fixed-length batches of token ids with masks and char counts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from cdlm.data.corpus import corpus_checksum
from cdlm.data.documents import Documents, open_source
from cdlm.data.rows import DocumentRows, MappedRows, PackedRows
from cdlm.data.sampler import ResumableSampler
from cdlm.data.sources import SourceOptions, Splits
from cdlm.data.streaming import StreamedRows, StreamSource, check_streamable, read_tokens
from cdlm.data.token_cache import TokenMap, prepare_cache
from cdlm.data.tokenizers import KINDS, Tokenizer, build_tokenizer
from cdlm.models.backbone import dense_padding


class TextDataModule(L.LightningDataModule):
    """Batches ``{"input_ids": [B, L] int64, "attention_mask": [B, L] bool, "n_chars": [B] int64}``.

    ``source`` is "shakespeare" (the embedded corpus), a ``.txt`` / ``.jsonl`` / ``.parquet`` file or a folder of them,
    or ``hf:<name or path>``; ``validation_docs``, ``split_chars``, ``hf_config``, ``hf_splits`` and ``data_files`` say
    how it is read and split (``cdlm.data.sources.SourceOptions``). The source is tokenised once into a memory-mapped
    cache (``cdlm.data.token_cache``; ``prepare_workers`` processes, None = one per core for large sources) that every
    later launch, rank and resume only maps. With ``packing`` documents are joined with EOS after each one and cut
    into ``seq_len`` blocks; without, each document (plus EOS) is split into its own padded ``seq_len`` chunks
    (docs/data.md). ``streaming`` reads an ``hf:`` dataset by name as a stream tokenised on the fly on every rank,
    with no cache (``cdlm.data.streaming``).
    """

    def __init__(
        self,
        source: str = "shakespeare",
        text_field: str = "text",
        tokenizer: str = "char",
        tokenizer_name: str | None = None,
        vocab_size: int = 2048,
        seq_len: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        packing: bool = True,
        val_fraction: float = 0.05,
        validation_docs: int | None = None,
        split_chars: list[int] | None = None,
        hf_config: str | None = None,
        hf_splits: dict[str, str] | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        max_val_tokens: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        prepare_workers: int | None = None,
        streaming: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if tokenizer not in KINDS:
            raise ValueError(f"unknown tokenizer kind {tokenizer!r}; valid kinds are {sorted(KINDS)}")
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.source, self.text_field = source, text_field
        self.tokenizer_kind, self.tokenizer_name, self.vocab_size = tokenizer, tokenizer_name, vocab_size
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.source_options = SourceOptions(
            text_field, val_fraction, validation_docs, split_chars, hf_config, hf_splits, data_files
        )
        self.source_options.check_source(source)
        self.packing, self.val_fraction, self.max_val_tokens = packing, val_fraction, max_val_tokens
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        self.prepare_workers, self.streaming = prepare_workers, streaming
        if streaming:
            check_streamable(source, tokenizer, num_workers)
        self.tokenizer: Tokenizer | None = None
        self._documents: Documents | None = None
        self._cache: Path | None = None
        self._datasets: dict[str, MappedRows | StreamedRows] = {}
        self._stream: StreamSource | None = None

    def documents(self) -> Documents:
        """The source's documents (opened once; read only when a tokenizer is trained or a cache is built)."""
        if self._documents is None:
            options = self.source_options
            self._documents = open_source(
                self.source,
                options.text_field,
                options.val_fraction,
                validation_docs=options.validation_docs,
                split_chars=options.split_chars,
                hf_config=options.hf_config,
                hf_splits=options.hf_splits,
                data_files=options.data_files,
            )
        return self._documents

    def texts(self) -> Splits:
        """The source's documents per split, as lists (reads the whole source)."""
        return {split: self.documents().texts(split) for split in self.documents().splits()}

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use an existing tokenizer (e.g. the one saved with a checkpoint) instead of building one."""
        self.tokenizer = tokenizer
        self._cache = None
        self._datasets.clear()

    def prepare_tokenizer(self) -> Tokenizer:
        """Build (or load from the cache) the tokenizer from the train split; idempotent."""
        if self.tokenizer is None:
            needs_texts = self.tokenizer_kind in ("char", "bpe")
            self.tokenizer = build_tokenizer(
                self.tokenizer_kind,
                texts=(lambda: self.documents().texts("train")) if needs_texts else None,
                vocab_size=self.vocab_size,
                name_or_path=self.tokenizer_name,
                cache_dir=self.cache_dir,
                cache_key=self.tokenizer_key() if needs_texts else None,
            )
        return self.tokenizer

    def tokenizer_key(self) -> str:
        """What a trained (char / bpe) tokenizer is cached under: the source's fingerprint (so a launch on a prepared
        source reads no text)."""
        if self.source == "shakespeare":
            return f"shakespeare-{corpus_checksum()}"  # the key of the embedded corpus's cached BPE since its start
        return f"{self.documents().fingerprint()}"

    def prepare_data(self) -> None:
        """The tokenizer and the token cache (Lightning calls this on one process per node); a stream has no cache."""
        if self.streaming:
            self.prepare_tokenizer()
        else:
            self.token_cache()

    def token_cache(self) -> Path:
        """The token cache of this source and tokenizer, built on first use (under a lock: ranks build it once)."""
        if self.streaming:
            raise ValueError(
                f"data.streaming=true: source {self.source!r} is tokenised while training and has no token cache; "
                "set data.streaming=false to prepare one"
            )
        if self._cache is None:
            tokenizer = self.prepare_tokenizer()
            self._cache = prepare_cache(self.documents(), tokenizer, self.cache_dir, self.prepare_workers)
        return self._cache

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Note, while the batch is still in host memory (so without a device sync), whether it has no padding."""
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and bool(mask.all()):
            batch = {**batch, "packed": True}
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """A batch without padding gets the broadcast all-True mask of ``dense_padding``: the backbone then attends
        with the kernels that take no mask (flash attention on GPUs) without reading the mask back."""
        if isinstance(batch, dict) and batch.get("packed") is True:
            batch = {k: v for k, v in batch.items() if k != "packed"}
            batch["attention_mask"] = dense_padding(batch["attention_mask"].shape, batch["attention_mask"].device)
        return batch

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}
        for split in splits.get(stage or "fit", ("train", "validation")):
            self.dataset(split)

    def _build(self, split: str) -> MappedRows:
        """The rows of ``split`` over the mapped cache (the validation split capped at ``max_val_tokens``)."""
        mapped = TokenMap.open(self.token_cache(), split)
        tok, lengths = self.tokenizer, self.tokenizer.char_lengths()
        if self.packing:
            rows = PackedRows(mapped.tokens, self.seq_len, tok.pad_id, lengths)
        else:
            rows = DocumentRows(mapped.tokens, mapped.docs, self.seq_len, tok.pad_id, lengths)
        if split == "train":
            self._check_train_size(rows)
        elif self.max_val_tokens is not None and len(rows) > 0:
            rows.cap(self.max_val_tokens)
        return rows

    def _check_train_size(self, rows: MappedRows) -> None:
        n_rows, n_tokens = len(rows), int(rows.row_lengths().sum())
        if n_rows >= self.batch_size and n_tokens >= self.seq_len:
            return
        raise ValueError(
            f"source {self.source!r} is too short: its train split has {n_tokens} tokens = {n_rows} training "
            f"rows of seq_len={self.seq_len}, fewer than one batch (batch_size={self.batch_size}) of full rows; "
            f"use batch_size <= {max(n_rows, 1)} or seq_len <= {max(n_tokens // self.batch_size, 1)}, or more text"
        )

    def dataset(self, split: str) -> MappedRows | StreamedRows:
        """The dataset of ``split`` ("train", "validation" or "test"), built on first use."""
        if split not in self._datasets:
            self._datasets[split] = self._build_streamed(split) if self.streaming else self._build(split)
        return self._datasets[split]

    def stream(self) -> StreamSource:
        if self._stream is None:
            self._stream = StreamSource(self.source[3:], self.source_options)
        return self._stream

    def _build_streamed(self, split: str) -> MappedRows | StreamedRows:
        """Training: this rank's rows of the stream (its first row read now, so a bad source fails at the start).
        Evaluation: the split's first ``max_val_tokens`` tokens, read into memory once."""
        tok = self.prepare_tokenizer()
        if split == "train":
            rank, world = self._ranks()
            rows = StreamedRows(self.stream(), tok, self.seq_len, self.packing, rank, world)
            next(iter(rows))
            return rows
        if split == "test" and "test" not in self.stream().splits():
            raise ValueError(f"streamed source {self.source!r} has no test split")
        docs = self.stream().documents(self.stream().texts(split))
        tokens, offsets = read_tokens(docs, lambda d: [*tok.encode(d), tok.eos_id], self.max_val_tokens)
        if len(tokens) == 0:
            raise ValueError(f"streamed source {self.source!r} has no {split} documents")
        lengths = tok.char_lengths()
        if self.packing:
            rows = PackedRows(tokens, self.seq_len, tok.pad_id, lengths)
        else:
            rows = DocumentRows(tokens, offsets, self.seq_len, tok.pad_id, lengths)
        if self.max_val_tokens is not None:
            rows.cap(self.max_val_tokens)
        return rows

    def _ranks(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the attached trainer (``(0, 1)`` outside one)."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled training rows in batches of ``batch_size`` per rank (``ResumableSampler``: the order is a function
        of the seed and the position, which the loader's checkpointed state carries)."""
        rank, world = self._ranks()
        if self.streaming:  # this rank's part of the stream; the position is the loader's state (RowStream)
            rows = StreamedRows(self.stream(), self.prepare_tokenizer(), self.seq_len, self.packing, rank, world)
            return StatefulDataLoader(rows, batch_size=self.batch_size, num_workers=self.num_workers)
        sampler = ResumableSampler(
            len(self.dataset("train")), self.batch_size, seed=self.seed, rank=rank, world_size=world
        )
        return StatefulDataLoader(
            self.dataset("train"),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> StatefulDataLoader:
        """Rows ``r::W`` of ``split`` on rank ``r``, in order: each row is scored once over all ranks."""
        rank, world = self._ranks()
        rows = range(rank, len(self.dataset(split)), world)
        return StatefulDataLoader(
            self.dataset(split), batch_size=self.eval_batch_size, sampler=list(rows), num_workers=self.num_workers
        )

    def val_dataloader(self) -> StatefulDataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> StatefulDataLoader:
        return self._eval_loader("test")

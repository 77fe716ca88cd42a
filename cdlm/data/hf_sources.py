"""``hf:`` sources: Hugging Face datasets by name, builder (``json``, ``parquet`` over ``data_files``) or saved folder,
read in batches from their Arrow tables without copying the text column (docs/data.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdlm.data.source_options import (
    SPLITS,
    SourceError,
    SourceOptions,
    Splits,
    check_fraction,
    held_out_count,
    hold_out,
    import_datasets,
)

if TYPE_CHECKING:
    import datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def hf_load(datasets: Any, name: str, options: SourceOptions, split: str | None) -> Any:
    """``datasets.load_dataset(name, hf_config, data_files=..., split=split)``: a hub dataset (downloaded once into
    the Hugging Face cache), a builder such as ``json`` or ``parquet`` over ``data_files``, or a local folder."""
    return datasets.load_dataset(name, options.hf_config, data_files=options.data_files, split=split)


def as_splits(datasets: Any, data: Any) -> dict[str, Any]:
    """A ``Dataset`` as ``{"train": it}``, a ``DatasetDict`` as a plain dict."""
    return {"train": data} if isinstance(data, datasets.Dataset) else dict(data)


def hf_open(name: str, options: SourceOptions) -> dict[str, datasets.Dataset]:
    """The dataset of each split the source has, by cdlm split name (``hf_splits`` maps them, else the dataset's own
    ``train``/``validation``/``test``); a saved dataset (``save_to_disk``) is mapped from disk, never copied."""
    datasets = import_datasets(f"source 'hf:{name}'")
    mapping = options.hf_splits
    if is_saved_dataset(Path(name)):
        data = as_splits(datasets, datasets.load_from_disk(name))
        missing = sorted(set((mapping or {}).values()) - set(data))
        if missing:
            raise SourceError(f"hf dataset {name!r} has no split(s) {missing} (found {sorted(data)}); set hf_splits")
        own = {split: data[spec] for split, spec in mapping.items()} if mapping else data
    elif mapping is None:
        own = as_splits(datasets, hf_load(datasets, name, options, None))
    else:
        own = {split: hf_load(datasets, name, options, spec) for split, spec in mapping.items()}
    return checked_splits(name, own, options.text_field)


def checked_splits(name: str, data: dict[str, Any], text_field: str) -> dict[str, Any]:
    """The train/validation/test datasets of ``data``, in that order, each reduced to its ``text_field`` column; an
    error for a missing ``train`` split or column."""
    if "train" not in data:
        raise ValueError(f"hf dataset {name!r} has no 'train' split (found {sorted(data)})")
    kept = {split: data[split] for split in SPLITS if split in data}
    for split, ds in kept.items():
        if text_field not in ds.column_names:
            raise ValueError(
                f"hf dataset {name!r} split {split!r} has no column {text_field!r} "
                f"(columns: {ds.column_names}); set text_field"
            )
    return {split: ds.select_columns([text_field]) for split, ds in kept.items()}


def hf_texts(ds: datasets.Dataset, text_field: str, start: int = 0, stop: int | None = None) -> list[str]:
    """The documents of rows ``start:stop`` of ``ds`` (a slice of its memory-mapped table; null values skipped)."""
    stop = len(ds) if stop is None else stop
    return [str(t) for t in ds[start:stop][text_field] if t is not None]


def hold_out_rows(train: datasets.Dataset, options: SourceOptions) -> dict[str, datasets.Dataset]:
    """Validation held out of a train dataset: its last ``validation_docs`` rows, else its last ``val_fraction``
    (at least one) as ``hold_out`` does, by ``select(range(...))`` (no copy); a one-row dataset is cut by text."""
    check_fraction(options.val_fraction)
    if len(train) == 1 and options.validation_docs is None:
        import datasets

        parts = hold_out(hf_texts(train, options.text_field), options.val_fraction)
        return {k: datasets.Dataset.from_dict({options.text_field: v}) for k, v in parts.items()}
    n_val = held_out_count(len(train), options.val_fraction, options.validation_docs)
    cut = len(train) - n_val
    return {"train": train.select(range(cut)), "validation": train.select(range(cut, len(train)))}


def read_hf(name: str, text_field: str, options: SourceOptions | None = None) -> Splits:
    """A Hugging Face dataset's documents per split, as lists (``hf_open``; reads every row: for small datasets)."""
    options = options or SourceOptions(text_field)
    return {split: hf_texts(ds, text_field) for split, ds in hf_open(name, options).items()}


# ---- splitting ----------------------------------------------------------------------------------------------------

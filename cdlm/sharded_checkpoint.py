"""Reading sharded (``torch.distributed.checkpoint``) checkpoints as data (docs/security.md, docs/runs.md "Many GPUs").

A sharded checkpoint is a directory: ``.metadata`` (which tensor lives in which file, at which offset), one
``__<rank>_<n>.distcp`` file per writer, and Lightning's ``meta.pt`` (step, loops, callbacks, cdlm's config). Torch's
own reader unpickles ``.metadata`` with plain ``pickle`` (any class, any code), opens whatever file names it lists and
reads non-tensor entries with ``torch.load(weights_only=False)``. cdlm reads it instead with:

- ``.metadata`` through an unpickler that builds only the checkpoint-description classes of
  ``torch.distributed.checkpoint`` and torch's sizes, dtypes and layouts (``METADATA_CLASSES``);
- file names checked: plain names inside the directory, no separators, no ``..``, no hidden files;
- non-tensor entries and ``meta.pt`` with ``torch.load(weights_only=True)``.

``load_sharded`` restores a sharded module and its optimizers in a running process group (resume under
``trainer=fsdp``); ``read_sharded_ckpt`` reads the whole checkpoint into one process as a full state dict, the form
of an ordinary ``.ckpt`` (``cdlm.load``, ``cdlm sample``, resume on one device). A run with an EMA stores, as
Lightning's EMA layout does, the average as ``state_dict`` and the trained weights as ``current_model_state``
(``TRAINED_STATE``), both sharded.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

METADATA_FILE = ".metadata"
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor checkpoint state, beside the shards
TRAINED_STATE = "current_model_state"  # with an EMA: the trained weights (``state_dict`` holds the average)
METADATA_CLASSES = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
    }
)
"""The (module, name) pairs ``.metadata`` may name, besides torch dtypes."""


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint directory that cdlm refuses to read; the message says what is wrong."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (it holds ``.metadata``)."""
    return (Path(path) / METADATA_FILE).is_file()


class MetadataUnpickler(pickle.Unpickler):
    """Builds only ``METADATA_CLASSES`` and torch dtypes; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a class a checkpoint's metadata may hold")


def read_metadata(directory: Path) -> Metadata:
    """The checked ``.metadata`` of a sharded checkpoint ``directory``: allowed classes only, and every file it names a
    plain file name inside ``directory`` that exists."""
    path = directory / METADATA_FILE
    try:
        metadata = MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # pickle raises many types for foreign or truncated files
        raise ShardedCheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(metadata, Metadata):
        raise ShardedCheckpointError(f"{path} does not describe a checkpoint (it holds a {type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        bad = not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name
        if bad or not (directory / name).is_file():
            raise ShardedCheckpointError(
                f"{path} names the data file {name!r}: it must be a plain file name inside {directory} that exists"
            )
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by ``read_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries (optimizer hyper-parameters, counters) weights-only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def dcp_load(state: dict[str, Any], directory: Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` (in place) from ``directory`` through the safe reader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # no_dist: torch warns that it assumes one process, which is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(directory), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as err:  # a BaseException carrying each rank's failure
        failure = next(iter(err.failures.values()))[0]
        if isinstance(failure, ShardedCheckpointError):
            raise failure from None
        if isinstance(failure, pickle.UnpicklingError):
            raise ShardedCheckpointError(
                f"cannot read the sharded checkpoint {directory}: an entry holds Python objects beyond tensors and "
                "plain containers, which cdlm never unpickles (a weights-only load refused them)"
            ) from None
        raise ShardedCheckpointError(
            f"cannot read the sharded checkpoint {directory}: {type(failure).__name__}: {failure}"
        ) from None


def read_meta(directory: Path) -> dict[str, Any]:
    """Lightning's ``meta.pt`` beside the shards, weights-only."""
    path = directory / LIGHTNING_META
    if not path.is_file():
        raise ShardedCheckpointError(f"{directory} has shards but no {LIGHTNING_META} (Lightning's checkpoint state)")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_sharded_ckpt(directory: str | Path) -> dict[str, Any]:
    """A whole sharded checkpoint in this process, in the layout of an ordinary Lightning ``.ckpt``: ``meta.pt``'s
    entries plus ``state_dict`` (full tensors on the CPU). Optimizer states are not read (nothing here needs them)."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    groups = ("state_dict", TRAINED_STATE)  # the weights (with an EMA: the average) and, with an EMA, the trained ones
    state = {
        fqn: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for fqn, entry in metadata.state_dict_metadata.items()
        if fqn.split(".", 1)[0] in groups and isinstance(entry, TensorStorageMetadata)
    }
    dcp_load(state, directory, no_dist=True)
    ckpt = read_meta(directory)
    for group in groups:
        prefix = f"{group}."
        tensors = {fqn.removeprefix(prefix): t for fqn, t in state.items() if fqn.startswith(prefix)}
        if tensors or group == "state_dict":
            ckpt[group] = tensors
    return ckpt


def load_sharded(
    directory: Path, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], strict: bool = True
) -> dict[str, Any]:
    """Restore a sharded ``module`` and its ``optimizers`` from ``directory`` (a collective: every rank calls it), as
    Lightning's sharded load does, through the safe reader; returns ``meta.pt``'s entries (Lightning's checkpoint
    without the weights and optimizer states, which Lightning then restores from)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    module_state = {"state_dict": get_model_state_dict(module)}
    dcp_load(module_state, directory)
    module.load_state_dict(module_state["state_dict"], strict=strict)
    trained = None
    if any(fqn.startswith(f"{TRAINED_STATE}.") for fqn in read_metadata(directory).state_dict_metadata):
        trained = {TRAINED_STATE: {k: v.detach().clone() for k, v in get_model_state_dict(module).items()}}
        dcp_load(trained, directory)  # sharded like the module's weights, for the EMA callback to load
    for idx, optimizer in enumerate(optimizers):
        key = f"optimizer_{idx}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp_load(optim_state, directory)
        set_optimizer_state_dict(
            module, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True)
        )
    ckpt = read_meta(directory)
    if trained is not None:
        ckpt[TRAINED_STATE] = trained[TRAINED_STATE]
    return ckpt

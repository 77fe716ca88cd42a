"""Distributed strategies a run names by string: ``trainer.strategy=fsdp`` is FSDP2 (per-parameter sharding with
``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy`` (docs/runs.md, "Many GPUs").

Each backbone block is one sharding unit (its weights are gathered for its forward and backward, then freed), the
rest of the objective (embeddings, heads, a frozen teacher or VAE) one more. Checkpoints hold the full state, gathered
on the first rank, so they load through cdlm's weights-only reader and resume exactly, like single-process ones; with
``sharded_checkpoints=true`` each rank writes its own shards instead (``cdlm/sharded_checkpoint.py``), the EMA's
among them. The EMA callback averages each rank's shards (``cdlm.ema.ShardedAverage``, through ``local_tensors``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from cdlm.sharded_checkpoint import LIGHTNING_META, TRAINED_STATE, is_sharded_checkpoint, load_sharded

FSDP = "fsdp"


class ShardedStrategyError(ValueError):
    """A setting that the sharded strategy cannot honour; the message says what to change."""


class ShardedDataParallel(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure sharded data parallelism: every process of every node holds one
    shard (a data-parallel mesh of the world size, no tensor parallelism). Checkpoints are gathered whole on rank 0,
    or with ``sharded_checkpoints`` written by every rank as its own shards (``torch.distributed.checkpoint``) and read
    back through cdlm's safe reader (``cdlm.sharded_checkpoint``)."""

    def __init__(self, sharded_checkpoints: bool = False) -> None:
        super().__init__(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoints)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # known once the trainer set the devices
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """Lightning's save; for sharded checkpoints of a run with an EMA, the trained weights (``TRAINED_STATE``,
        sharded like ``state_dict``, which holds the average) go through ``torch.distributed.checkpoint`` with the
        weights and optimizer states, where Lightning would put them into ``meta.pt`` (rank 0's shards only)."""
        trained = checkpoint.pop(TRAINED_STATE, None) if self._save_distributed_checkpoint else None
        if trained is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save

        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        converted = {"state_dict": checkpoint.pop("state_dict"), TRAINED_STATE: trained}
        converted.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(converted, path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / LIGHTNING_META)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """A full checkpoint weights-only, as Lightning reads it; a sharded one through ``load_sharded``."""
        path = Path(self.broadcast(checkpoint_path))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=True)
        strict = self.lightning_module.strict_loading if self.lightning_module is not None else True
        return load_sharded(path, self.model, list(self.optimizers), strict=strict)


def build_strategy(name: str, sharded_checkpoints: bool = False) -> ModelParallelStrategy | str:
    """The strategy object for ``name``: FSDP2 for ``fsdp``, anything else handed to Lightning as it is."""
    return ShardedDataParallel(sharded_checkpoints) if name == FSDP else name


def check_sharded_run(strategy: object, sharded_checkpoints: bool) -> None:
    """Refuse, before anything is written, sharded checkpoints where they cannot be written or hold everything."""
    if sharded_checkpoints and strategy != FSDP:
        raise ShardedStrategyError(
            f"sharded_checkpoints=true needs trainer=fsdp (the weights of trainer.strategy={strategy!r} are not "
            "sharded); pass sharded_checkpoints=false"
        )


def is_sharded(trainer: L.Trainer | None) -> bool:
    """Whether the run's weights are sharded across processes (FSDP2)."""
    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


NETWORK_METHODS = ("loss", "nll", "denoise", "flow_denoise", "next_logits", "decoder_nll", "logits", "sample_blocks")
"""The objective methods that run the network (the contracts of cdlm/types.py): FSDP2 gathers the objective's own
weights around each call, as it does around ``forward``."""


def shard(objective: nn.Module, mesh) -> None:
    """Apply FSDP2 to ``objective`` on the data-parallel ``mesh``: one unit per backbone block, then the rest, whose
    weights stay gathered from the first network call to the end of the backward pass."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in objective.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                fully_shard(block, mesh=mesh)
    fully_shard(objective, mesh=mesh, reshard_after_forward=False)
    for name in NETWORK_METHODS:
        if callable(getattr(objective, name, None)):
            register_fsdp_forward_method(objective, name)


def full_state_dict(module: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the CPU; with ``sharded`` weights a collective every rank must call."""
    if not sharded:
        return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.contiguous() for k, v in get_model_state_dict(module, options=options).items()}


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict, held whole by every rank, into the sharded ``module``: each rank copies
    its own shards out of it; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def local_tensors(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters then buffers as this rank holds them: the local shard of a sharded (DTensor)
    parameter, the tensor itself otherwise. Each is a view of the weights (copying into it writes them); FSDP2 units
    are resharded first, so the parameters are the sharded ones even after a forward that kept them gathered."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    tensors = itertools.chain(module.parameters(), module.buffers())
    return [t.detach().to_local() if isinstance(t, DTensor) else t.detach() for t in tensors]

"""Distributed strategies a run names by string: ``trainer.strategy=fsdp`` is FSDP2 (per-parameter sharding with
``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy`` (docs/runs.md, "Many GPUs").

Each backbone block is one sharding unit (its weights are gathered for its forward and backward, then freed), the
rest of the objective (embeddings, heads, a frozen teacher or VAE) one more. Checkpoints hold the full state, gathered
on the first rank, so they load through cdlm's weights-only reader and resume exactly, like single-process ones.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

FSDP = "fsdp"


class ShardedStrategyError(ValueError):
    """A setting that the sharded strategy cannot honour; the message says what to change."""


class ShardedDataParallel(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure sharded data parallelism: every process of every node holds one
    shard (a data-parallel mesh of the world size, no tensor parallelism); checkpoints gathered whole on rank 0."""

    def __init__(self) -> None:
        super().__init__(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # known once the trainer set the devices
        super().setup_environment()


def build_strategy(name: str) -> ModelParallelStrategy | str:
    """The strategy object for ``name``: FSDP2 for ``fsdp``, anything else handed to Lightning as it is."""
    return ShardedDataParallel() if name == FSDP else name


def check_sharded_run(strategy: object, ema: object) -> None:
    """Refuse what the sharded strategy does not support yet, before anything is written."""
    if strategy == FSDP and ema is not None:
        raise ShardedStrategyError(
            "trainer.strategy=fsdp does not support the EMA callback yet (its averaged copy is not sharded); "
            "pass ema=null, or use trainer=ddp"
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

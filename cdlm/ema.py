"""The EMA callback: Lightning's ``EMAWeightAveraging`` with an exact update, which under ``trainer.strategy=fsdp``
averages each rank's shards of the weights instead of a deep copy of the module (docs/runs.md, "Many GPUs").

Both keep the same schedule, the same update, the same checkpoint layout (``state_dict``: the averaged weights, whole;
``current_model_state``: the trained ones; ``averaging_state``: ``n_averaged``) and put the averaged weights into the
module for validation and at the end of training, so a checkpoint or ``final/`` folder does not say which one wrote it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.distributed.tensor import DTensor

from cdlm.strategies import full_state_dict, is_sharded, load_full_state_dict, local_tensors

AverageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def exact_ema(decay: float) -> AverageFn:
    """``ema + (1 - decay)(p - ema)``: torch's EMA update ``decay ema + (1 - decay) p`` rewritten so that a weight
    that does not change (a frozen module, e.g. the VAE under a latent prior) stays bit-identical instead of drifting
    by rounding at every step."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        return ema + (1 - decay) * (current - ema)

    return update


class ShardedAverage:
    """The running average of a sharded module, kept outside it: one tensor per parameter, then per buffer, holding
    this rank's local shard (``cdlm.strategies.local_tensors``), updated as ``torch.optim.swa_utils.AveragedModel``
    updates its copy (the first update copies the weights, buffers are copied rather than averaged without
    ``use_buffers``), so each element follows the unsharded average exactly. Only ``full_state_dict`` communicates."""

    def __init__(
        self, module: torch.nn.Module, avg_fn: AverageFn, device: torch.device | int | None, use_buffers: bool
    ) -> None:
        current = local_tensors(module)
        self.tensors = [t.to(t.device if device is None else device, copy=True) for t in current]
        self.params = len(list(module.parameters()))
        self.avg_fn, self.use_buffers = avg_fn, use_buffers
        self.n_averaged = torch.tensor(0, dtype=torch.long)

    @torch.no_grad()
    def update_parameters(self, module: torch.nn.Module) -> None:
        """One update from ``module``'s current weights (the name and rule of ``AveragedModel``'s)."""
        current = local_tensors(module)
        first, averaged = bool(self.n_averaged == 0), len(current) if self.use_buffers else self.params
        for i, (mine, theirs) in enumerate(zip(self.tensors, current, strict=True)):
            theirs = theirs.to(mine.device)
            if first or i >= averaged:
                mine.copy_(theirs)
            else:
                mine.copy_(self.avg_fn(mine, theirs, self.n_averaged))
        self.n_averaged += 1

    @torch.no_grad()
    def swap(self, module: torch.nn.Module) -> None:
        """Exchange the averaged values with ``module``'s weights."""
        for mine, theirs in zip(self.tensors, local_tensors(module), strict=True):
            kept = mine.clone()
            mine.copy_(theirs)
            theirs.copy_(kept)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averaged values into ``module``'s weights."""
        for mine, theirs in zip(self.tensors, local_tensors(module), strict=True):
            theirs.copy_(mine)

    @torch.no_grad()
    def copy_from(self, module: torch.nn.Module) -> None:
        """Take ``module``'s weights as the averaged values."""
        for mine, theirs in zip(self.tensors, local_tensors(module), strict=True):
            mine.copy_(theirs)

    def sharded_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights as ``module``'s sharded state dict (each rank's own shards, as DTensors; copies), for
        a sharded checkpoint: swapped into ``module`` for the read, no communication."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.swap(module)
        try:
            return {k: v.detach().clone() for k, v in get_model_state_dict(module).items()}
        finally:
            self.swap(module)

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights as ``module``'s full state dict on the first rank (``{}`` on the others), gathered by
        swapping them into ``module`` for the gather: a collective every rank must call."""
        self.swap(module)
        try:
            return full_state_dict(module, sharded=True)
        finally:
            self.swap(module)


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments, same schedule) with the update of ``exact_ema``; under a
    sharded strategy the average is a ``ShardedAverage`` of each rank's shards, created once the module is sharded.

    The arguments are spelled out, not ``**kwargs``: cdlm's config checks keys against the signature.
    """

    def __init__(
        self,
        decay: float = 0.999,
        use_buffers: bool = True,
        device: torch.device | str | int | None = None,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
    ) -> None:
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
        )
        self._kwargs["avg_fn"] = exact_ema(decay)

    def sharded(self) -> ShardedAverage | None:
        """The sharded average, if this run has one (Lightning's hooks update it through ``update_parameters``)."""
        return self._average_model if isinstance(self._average_model, ShardedAverage) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's setup (a deep copy of the module), without its warning about ``configure_model``: DiffusionLM
        shards only under a sharded strategy, where the average waits for the sharded module (``on_fit_start``)."""
        if is_sharded(trainer):
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*overrides the configure_model callback.*")
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under a sharded strategy, start the average from the sharded module's weights."""
        if is_sharded(trainer):
            self._average_model = ShardedAverage(pl_module, self._kwargs["avg_fn"], self._device, self._use_buffers)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Leave the averaged weights in the module (validated, saved to ``final/`` and sampled from)."""
        if average := self.sharded():
            average.copy_to(pl_module)
        else:
            super().on_train_end(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate the averaged weights: swap them in."""
        if average := self.sharded():
            average.swap(pl_module)
        else:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the trained weights back."""
        if average := self.sharded():
            average.swap(pl_module)
        else:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Lightning's layout (``state_dict`` the average, ``current_model_state`` the trained weights); the sharded
        average is gathered whole on the first rank (a collective: every rank saves), or, for sharded checkpoints,
        kept as each rank's shards (``cdlm.strategies.ShardedDataParallel.save_checkpoint`` writes both)."""
        if average := self.sharded():
            checkpoint["current_model_state"] = checkpoint["state_dict"]
            distributed = getattr(trainer.strategy, "_save_distributed_checkpoint", False)
            state = average.sharded_state_dict if distributed else average.full_state_dict
            checkpoint["state_dict"] = state(pl_module)
            checkpoint["averaging_state"] = {"n_averaged": average.n_averaged.clone()}
        else:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Lightning's restore. Sharded: the strategy has loaded ``state_dict`` (the average) into the module, so the
        average is taken from the module, which then loads ``current_model_state`` (whole, every rank having read the
        file; or this rank's shards, from a sharded checkpoint)."""
        if (average := self.sharded()) is None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        average.copy_from(pl_module)
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            average.n_averaged.copy_(checkpoint["averaging_state"]["n_averaged"])
            trained = checkpoint["current_model_state"]
            if any(isinstance(v, DTensor) for v in trained.values()):
                pl_module.load_state_dict(trained, strict=pl_module.strict_loading)
            else:
                load_full_state_dict(pl_module, trained)

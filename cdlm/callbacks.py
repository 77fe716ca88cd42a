"""Training callbacks: token throughput (Lightning ships none), Lightning's EMA with an exact update, and a checkpoint
when a training that has made progress is interrupted."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


class ThroughputLogger(L.Callback):
    """Logs ``train/tokens_per_s``: real (non-padding) tokens over all ranks per wall second, between logs."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._tokens = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        elapsed = time.perf_counter() - self._start
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0 and elapsed > 0:
            pl_module.log("train/tokens_per_s", self._tokens / elapsed, prog_bar=True)
            self._start, self._tokens = time.perf_counter(), 0


def exact_ema(decay: float):
    """``ema + (1 - decay)(p - ema)``: torch's EMA update ``decay ema + (1 - decay) p`` rewritten so that a weight
    that does not change (a frozen module, e.g. the VAE under a latent prior) stays bit-identical instead of drifting
    by rounding at every step."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        return ema + (1 - decay) * (current - ema)

    return update


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments, same schedule) with the update of ``exact_ema``.

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


class InterruptCheckpoint(L.Callback):
    """Saves ``on_exception.ckpt`` when training stops on an exception (Ctrl-C included) after taking steps.

    Unlike Lightning's ``OnExceptionCheckpoint`` it does not make ``fit(ckpt_path=None)`` resume from the last
    checkpoint behind the user's back, it writes nothing for a run that never trained (a failed start leaves the run
    directory as it was) or that diverged (``NonFiniteLoss``: resuming that state diverges again), and under several
    processes it saves only on Ctrl-C, which reaches every rank (saving waits for all ranks).
    """

    def __init__(self, dirpath: str | Path, filename: str = "on_exception") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from cdlm.module import NonFiniteLoss

        if trainer.global_step == 0 or isinstance(exception, NonFiniteLoss):
            return
        if trainer.world_size > 1 and not isinstance(exception, KeyboardInterrupt):
            return
        trainer.save_checkpoint(self.path)

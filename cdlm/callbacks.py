"""Training callbacks that Lightning does not ship: token throughput."""

from __future__ import annotations

import time

import lightning as L


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

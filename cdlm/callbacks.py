"""Training callbacks: Lightning's ``ThroughputMonitor`` fed with cdlm's batches and model FLOPs, the EMA
(``cdlm/ema.py``, re-exported here: configs name ``cdlm.callbacks.EMA``), and a checkpoint when a training that has
made progress is interrupted."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn

from cdlm.ema import EMA, exact_ema  # noqa: F401  (re-exported: the ``ema`` config's class is cdlm.callbacks.EMA)
from cdlm.models.backbone import Backbone
from cdlm.types import Batch


def batch_rows(batch: Batch) -> int:
    """The rows (sequences) of a batch."""
    return batch["input_ids"].shape[0]


def batch_positions(batch: Batch) -> int:
    """The token positions of a batch, padding included: ``rows x seq_len`` is read from the shape, so counting it
    never waits for the device (summing ``attention_mask`` would, at every step). With ``data.packing=true`` (the
    default) every position but those of a split's last row is a real token."""
    return batch["input_ids"].numel()


def throughput_monitor(log_every_n_steps: int, accumulate_grad_batches: int = 1) -> ThroughputMonitor:
    """Lightning's ``ThroughputMonitor`` counting rows as samples and token positions as items (docs/runs.md, "Logs").

    Its rates are rolling averages over its last ``window_size`` batches and appear only once the window is full;
    the window is one logging interval (at least 2 batches), so every log has them from the first on (from the second
    with ``log_every_n_steps=1``), measured over that interval less its first batch.
    """
    window = max(2, log_every_n_steps * accumulate_grad_batches)
    return ThroughputMonitor(batch_size_fn=batch_rows, length_fn=batch_positions, window_size=window)


class FlopsPerBatch(L.Callback):
    """Sets ``pl_module.flops_per_batch``, which ``ThroughputMonitor`` turns into ``device/flops_per_sec`` and, on
    devices whose peak Lightning knows (not CPUs), ``device/mfu`` (docs/runs.md, "Logs").

    Model FLOPs, as bench/train_throughput.py counts them: ``6 N + 12 depth L width`` per token for a training
    batch (forward and backward), a third of it for a validation batch (forward only); ``N`` is the weights of the
    objective's trainable ``nn.Linear`` layers (embeddings excluded, the head included; a frozen teacher or VAE is
    not counted), ``depth`` and ``width`` the backbone's, ``L`` the batch's sequence length. It is set before every
    batch from the batch's shape (no device sync), so it follows a smaller batch or a validation batch.
    """

    def __init__(self) -> None:
        self.matmul_weights = self.depth = self.width = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        objective = pl_module.objective
        weights = {id(m.weight): m.weight for m in objective.modules() if isinstance(m, nn.Linear)}  # tied: once
        self.matmul_weights = sum(w.numel() for w in weights.values() if w.requires_grad)
        trained = [
            m for m in objective.modules() if isinstance(m, Backbone) and any(p.requires_grad for p in m.parameters())
        ]
        self.depth, self.width = (
            (trained[0].depth, trained[0].width) if trained else (0, 0)
        )  # a student's, not a teacher's

    def flops(self, batch: Batch, backward: bool) -> int:
        """Model FLOPs of ``batch``: forward and backward, or forward only."""
        rows, length = batch["input_ids"].shape
        per_token = 6 * self.matmul_weights + 12 * self.depth * length * self.width
        return rows * length * per_token // (1 if backward else 3)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch, batch_idx: int
    ) -> None:
        pl_module.flops_per_batch = self.flops(batch, backward=True)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        pl_module.flops_per_batch = self.flops(batch, backward=False)


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

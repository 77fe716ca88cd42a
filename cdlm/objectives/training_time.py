"""The training time ``u`` of a batch, read by every objective (docs/math.md §0, "Training times")."""

from __future__ import annotations

import torch

from cdlm.types import Batch


def training_u(batch: Batch) -> torch.Tensor:
    """The training time ``u`` ``[B]`` of a batch: ``batch["u"]`` (the low-discrepancy times of docs/math.md §0, set
    by the training step), or, for a batch without one, i.i.d. ``U(0, 1)`` from the global torch RNG on the device of
    ``input_ids``."""
    if "u" in batch:
        return batch["u"]
    ids = batch["input_ids"]  # [B, L]
    return torch.rand(ids.shape[0], device=ids.device)

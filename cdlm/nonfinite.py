"""The non-finite loss check of a training step (docs/runs.md, "Diverged runs"): every rank stops together, with its
weights finite. On CPUs the check reads the losses at once; with a fused optimizer on an accelerator it reads nothing
back per step (the fused kernel skips the update when ``found_inf`` is set, the mechanism ``GradScaler`` uses) and the
first non-finite step is raised at the next logging step, when the logger reads the device anyway."""

from __future__ import annotations

import torch


class NonFiniteLoss(FloatingPointError):
    """A training loss that is NaN or infinite on some rank; raised on every rank at the same step."""


class NonFiniteGuard:
    """Checks each optimizer step's gathered losses ``[W, micro]`` before the update."""

    def __init__(self) -> None:
        self.pending: tuple[torch.Tensor, ...] | None = None  # on accelerators: (seen, first step, its losses)

    @staticmethod
    def defers(optimizer: torch.optim.Optimizer, device: torch.device, sync_free: bool | None) -> bool:
        """Whether the check runs without a host sync: a fused optimizer on an accelerator; ``sync_free`` (None:
        decided by the device) forces either way, e.g. in tests on CPUs."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        return fused and (device.type != "cpu" if sync_free is None else sync_free)

    def check(self, losses: torch.Tensor, optimizer, step: int, log_every: int, deferred: bool) -> None:
        """Raise ``NonFiniteLoss`` now (``deferred=False``), or skip the update on the device and raise at the next
        logging step (``deferred=True``)."""
        if not deferred:
            if not bool(torch.isfinite(losses).all()):
                raise_nonfinite(losses, step, step)
            return
        bad = (~torch.isfinite(losses)).any()
        optimizer.found_inf = bad.float()
        here = torch.tensor(step, device=losses.device)
        if self.pending is None:
            self.pending = (bad, here, losses)
        else:
            seen, first, first_losses = self.pending
            self.pending = (seen | bad, torch.where(seen, first, here), torch.where(seen, first_losses, losses))
        if (step + 1) % max(1, log_every) == 0 and bool(self.pending[0]):
            _, first, first_losses = self.pending
            raise_nonfinite(first_losses, int(first), step, skipped=True)


def raise_nonfinite(losses: torch.Tensor, step: int, now: int, skipped: bool = False) -> None:
    """Raise ``NonFiniteLoss`` naming the step, rank and micro-batch of the first non-finite loss."""
    losses = losses.reshape(-1, losses.shape[-1])  # [W, micro]
    rank, micro = (int(i) for i in (~torch.isfinite(losses)).nonzero()[0])
    where = (
        f"its update was skipped and training stopped at step {now}, so the weights are finite"
        if skipped
        else "every rank stopped before the update, so the weights are still finite"
    )
    raise NonFiniteLoss(
        f"non-finite training loss ({losses[rank, micro].item()}) at step {step} on rank {rank} "
        f"(micro-batch {micro}); {where} and the last checkpoint is intact. Lower the learning rate, raise "
        "warm-up or clip gradients, then resume with resume=auto."
    )

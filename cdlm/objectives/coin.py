"""A host-side coin for per-batch choices such as self-conditioning (Chen et al. 2023, "Analog Bits"; docs/math.md
§6): drawn from torch's global CPU generator, which the per-step seeding of ``DiffusionLM.seeded`` fixes, so a resumed
run makes the same choices. Reading it never waits for an accelerator."""

from __future__ import annotations

import torch


def coin(p: float) -> bool:
    """True with probability ``p``, from the CPU generator (no host-device sync)."""
    return bool(torch.rand((), device="cpu") < p)

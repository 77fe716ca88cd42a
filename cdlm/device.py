"""What a result was measured on (the device's name, recorded beside every speed figure, docs/math.md §8), and
whether reading a tensor's values costs a host-device synchronisation (docs/runs.md, "Speed")."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels before reading a clock (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_resident(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives in host memory, where reading its values (a boolean index, ``nonzero``) costs no
    synchronisation: code may then take data-dependent shapes that it avoids on an accelerator."""
    return tensor.device.type == "cpu"

"""Peak tensor memory of a function on any device, without CUDA statistics: ``peak_tensor_bytes(fn)``.

A ``TorchDispatchMode`` sees every aten op run while it is active, the autograd engine's backward ops included
(the engine carries the mode to its thread). Each output's storage is counted once, when it first appears, and
uncounted by a ``weakref.finalize`` when torch frees it: torch keeps one Python object per live storage, so the
finalizer fires when the last tensor, view or autograd-saved reference to the storage goes. The peak of that live
sum is the memory the function's tensors held at once. Tensors that existed before the call (parameters, inputs)
are not counted; scratch buffers inside a single kernel are not visible.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of the storages created while active: ``live`` now and ``peak`` since entry."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self.sizes: dict[int, int] = {}  # storage address (StorageImpl pointer) -> bytes counted

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes or storage.device.type == "meta":
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()``; returns the peak bytes of the tensors it created that were alive at once, and its result.

    The result is dropped from the count only after the call, so a returned tensor counts in the peak.
    """
    with LiveTensorBytes() as tracker:
        result = fn()
    return tracker.peak, result

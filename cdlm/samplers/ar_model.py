"""An autoregressive run used inside a masked-diffusion sampler: EDLM's energy, Guided Diffusion's verifier."""

from __future__ import annotations

from functools import lru_cache

import torch

from cdlm.types import AutoregressiveObjective


@lru_cache(maxsize=2)
def _load(path: str) -> torch.nn.Module:
    from cdlm.checkpoint import load

    return load(path).objective.eval()


def autoregressive_run(path: str, vocab_size: int, knob: str) -> torch.nn.Module:
    """The autoregressive objective of the saved run at ``path`` (loaded once per process, with ``cdlm.load``'s
    checks); a ``ValueError`` naming the sampler option ``knob`` when it is not autoregressive or its vocabulary is
    not ``vocab_size``."""
    model = _load(str(path))
    if not isinstance(model, AutoregressiveObjective):
        raise ValueError(f"{knob}={path!r} is a {type(model).__name__} run; it must be an autoregressive run")
    if model.vocab_size != vocab_size:
        raise ValueError(f"{knob}={path!r} has a vocabulary of {model.vocab_size}, the model {vocab_size}")
    return model

"""Autoregressive runs named by a masked-diffusion sampler's options (EDLM's ``energy``, Guided Diffusion's
``guide``), loaded by ``DiffusionLM.generate`` before the sampler runs: the samplers receive the model, and
``cdlm.samplers`` never imports the checkpoint loader (which imports the config, which imports the samplers)."""

from __future__ import annotations

from functools import lru_cache

import torch

from cdlm.checkpoint import load
from cdlm.types import AutoregressiveObjective

RUN_KNOBS = ("energy", "guide")  # sampler options that name an autoregressive run


@lru_cache(maxsize=2)
def _load(path: str) -> torch.nn.Module:
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


def load_run_knobs(knobs: dict, vocab_size: int) -> dict:
    """``knobs`` with every ``RUN_KNOBS`` value that is a path replaced by the autoregressive model it names."""
    return {
        key: autoregressive_run(value, vocab_size, key) if key in RUN_KNOBS and isinstance(value, str) else value
        for key, value in knobs.items()
    }

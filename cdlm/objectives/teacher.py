"""Frozen inputs of objectives: other runs (a distillation teacher, a latent prior's VAE) and encoders.

``load_frozen_with`` is the one loader of a saved run an objective builds on: it reads the run (with ``read``, which
``cdlm.checkpoint.load_frozen`` sets to ``cdlm.load``), checks its class and returns its objective frozen; a missing or
wrong path is one ``ConfigError`` raised while the run is built, before any work. ``frozen_inputs`` lists what the run
builder passes to an objective in place of the paths of its config (``cdlm.components.FROZEN_INPUTS``): the loaded
modules when a run is built to train, None when ``cdlm.load`` rebuilds a saved module, whose weights hold what it
needs. Objectives themselves never read disk.

``FrozenTeacher`` holds such a module outside the student's module tree: it is not in the student's
``parameters()``, ``state_dict``, optimizer, checkpoints or ``save_pretrained`` folders, and EMA's deep copy of the
student shares it instead of copying it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdlm import components
from cdlm.config import ConfigError


class FrozenTeacher:
    """Holds a frozen module (or nothing yet) out of ``nn.Module``'s registry.

    ``copy.deepcopy`` returns the same holder: EMA's ``AveragedModel`` deep-copies the whole module, and a frozen
    teacher needs no second copy.
    """

    def __init__(self, objective: nn.Module | None = None) -> None:
        self.objective: nn.Module | None = None
        if objective is not None:
            self.attach(objective)

    def __deepcopy__(self, memo: dict) -> FrozenTeacher:
        return self

    def attach(self, objective: nn.Module) -> None:
        """Freeze ``objective`` (eval mode, no gradients) and hold it."""
        self.objective = objective.eval().requires_grad_(False)

    def on(self, device: torch.device) -> nn.Module:
        """The teacher on ``device`` (moved there on first use)."""
        if next(self.objective.parameters()).device != device:
            self.objective.to(device)
        return self.objective


ReadRun = Callable[[Path], nn.Module]  # the objective of the saved run at a path (``cdlm.load(path).objective``)


def load_frozen_with(path: str | Path, expected: tuple[type, ...], what: str, read: ReadRun) -> nn.Module:
    """The objective of the run at ``path`` (a ``save_pretrained`` folder or ``.ckpt``, read by ``read``), frozen.

    ``expected``: the classes it may be; ``what``: the config key and what it should name, quoted in the error (e.g.
    ``"objective.teacher (a masked run, e.g. runs/quickstart/final)"``). A missing, unreadable or wrong run is a
    ``ConfigError``. Building the run draws initial weights before they are replaced; the caller's RNG stream is left
    as it was.
    """
    if not Path(path).exists():
        raise ConfigError(f"{what}: there is no run at {str(path)!r}; train it first or give its final/ or a .ckpt")
    try:
        with torch.random.fork_rng(devices=[]):
            objective = read(Path(path))
    except ConfigError:
        raise
    except ValueError as err:  # cdlm.checkpoint.CheckpointError: unreadable, or not a cdlm run
        raise ConfigError(f"{what}: cannot load {str(path)!r}: {err}") from err
    if not isinstance(objective, expected):
        names = " or ".join(cls.__name__ for cls in expected)
        raise ConfigError(f"{what}: {str(path)!r} holds a {type(objective).__name__} run, not a {names} run")
    return objective.eval().requires_grad_(False)


def load_encoder(name_or_path: str, what: str) -> nn.Module:
    """A frozen sentence encoder (``cdlm.models.sentence_encoder``): a packaged name or a local folder."""
    from cdlm.models.sentence_encoder import SentenceEncoder

    try:
        encoder = SentenceEncoder(name_or_path)
    except FileNotFoundError as err:
        raise ConfigError(f"{what}: {err}") from err
    return encoder.eval().requires_grad_(False)


def frozen_inputs(target: str, node: Mapping[str, Any], read: ReadRun | None) -> dict[str, nn.Module | None]:
    """The modules the run builder passes to the objective ``target`` for the paths of its config ``node``.

    ``read``: load them, runs through ``read`` (a run built to train; a path that is required and unset is a
    ``ConfigError``); None: None for each (``cdlm.load``, whose saved weights replace everything the inputs would
    initialise).
    """
    inputs: dict[str, nn.Module | None] = {}
    for key, spec in components.FROZEN_INPUTS.get(target, {}).items():
        path, what = node.get(key), f"objective.{key} ({spec.describes})"
        if read is None or (path is None and not spec.required):
            inputs[spec.argument] = None
        elif path is None:
            raise ConfigError(f"{what} is required to train {target.rpartition('.')[2]}: set it")
        elif spec.kind == components.SENTENCE_ENCODER:
            inputs[spec.argument] = load_encoder(str(path), what)
        else:
            expected = tuple(components.resolve(k) for k in spec.kind.split("|"))
            inputs[spec.argument] = load_frozen_with(str(path), expected, what, read)
    return inputs


def state_differences(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> list[str]:
    """Keys in only one of two state dicts (``"key: only in the student|teacher"``) and shape mismatches."""
    only = [f"{k}: only in the student" for k in sorted(student.keys() - teacher.keys())]
    only += [f"{k}: only in the teacher" for k in sorted(teacher.keys() - student.keys())]
    shapes = [
        f"{k}: teacher {tuple(teacher[k].shape)} vs student {tuple(student[k].shape)}"
        for k in sorted(student.keys() & teacher.keys())
        if student[k].shape != teacher[k].shape
    ]
    return only + shapes

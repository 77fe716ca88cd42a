"""A frozen teacher for distillation objectives (FMLM, CD4LM): held outside the student's module tree.

The teacher is not in the student's ``parameters()``, ``state_dict``, optimizer, checkpoints or ``save_pretrained``
folders; EMA's deep copy of the student shares it instead of copying it; and ``cdlm.load`` never reads it
(``cdlm.checkpoint.LOADING``), so a distilled checkpoint loads and samples without its teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cdlm.checkpoint import load


class FrozenTeacher:
    """Holds a frozen objective (or nothing yet) out of ``nn.Module``'s registry.

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


def load_objective(path: str | Path) -> tuple[nn.Module, dict | None]:
    """The objective of the run at ``path`` (``cdlm.load``: safetensors or weights-only) and its ``model`` config.

    Building it draws initial weights before ``load`` replaces them; the caller's RNG stream is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        module = load(path)
    return module.objective, module.config.get("model")


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

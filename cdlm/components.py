"""The closed list of classes a config may name in ``_target_``, by the slot it fills.

A config (a YAML file, a command line, a checkpoint's stored config) is data: it may name only the classes below,
each only in its own slot, and never a package prefix or a plain function. A prefix such as ``torch.`` would let a
file name any class in torch, and some of those start processes or write files when they are constructed
(docs/security.md). Rebuilding a saved model (``cdlm.load``, ``resume=``) uses the ``MODEL_SLOTS`` only.

To make a new class configurable, add its dotted path here (and a test that builds it).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

OBJECTIVES = (
    "cdlm.objectives.masked.MaskedDiffusion",
    "cdlm.objectives.masked_distill.MaskedDistill",
    "cdlm.objectives.autoregressive.Autoregressive",
    "cdlm.objectives.flow.OneHotFlow",
    "cdlm.objectives.flow_map.FlowMap",
    "cdlm.objectives.embedding_flow.EmbeddingFlow",
    "cdlm.objectives.bitstream.Bitstream",
    "cdlm.objectives.latent.LatentDiffusion",
)

MODEL_SLOTS: dict[str, tuple[str, ...]] = {
    "model": ("cdlm.models.backbone.Backbone",),
    "objective": OBJECTIVES,
    "module": ("cdlm.module.DiffusionLM",),
}
"""What a stored model config may name: everything ``cdlm.load`` builds."""

RUN_SLOTS: dict[str, tuple[str, ...]] = {
    **MODEL_SLOTS,
    "data": ("cdlm.data.datamodule.TextDataModule",),
    "trainer": ("lightning.Trainer", "lightning.pytorch.Trainer"),
    "ema": ("cdlm.callbacks.EMA",),
    "checkpoint": ("lightning.pytorch.callbacks.ModelCheckpoint",),
    "logger": (
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.loggers.WandbLogger",
    ),
}
"""What a training config may name, per top-level slot."""

INJECTED: dict[str, frozenset[str]] = {
    "cdlm.module.DiffusionLM": frozenset({"objective", "tokenizer", "config"}),
    "lightning.Trainer": frozenset({"callbacks", "logger", "default_root_dir", "use_distributed_sampler"}),
    "lightning.pytorch.Trainer": frozenset({"callbacks", "logger", "default_root_dir", "use_distributed_sampler"}),
    "lightning.pytorch.callbacks.ModelCheckpoint": frozenset({"dirpath"}),
    "lightning.pytorch.loggers.CSVLogger": frozenset({"save_dir", "name", "version"}),
    "lightning.pytorch.loggers.TensorBoardLogger": frozenset({"save_dir", "name", "version"}),
    "lightning.pytorch.loggers.WandbLogger": frozenset({"save_dir", "dir", "experiment"}),
}
"""Constructor arguments cdlm fills in itself (besides ``backbone``, ``vocab_size``, ``tokenizer`` of objectives):
a config that sets one is refused, so no config can move checkpoints or logs out of the run directory."""

OBJECTIVE_INJECTED = frozenset({"backbone", "vocab_size", "tokenizer"})

BASE_NAMES: dict[str, frozenset[str]] = {
    "lightning.pytorch.callbacks.ModelCheckpoint": frozenset({"filename"}),
    "lightning.pytorch.loggers.TensorBoardLogger": frozenset({"sub_dir"}),
    "lightning.pytorch.loggers.WandbLogger": frozenset({"version", "id"}),  # the run id names its offline folder
}
"""Arguments that name a file inside the run directory: plain base names only (no ``/``, ``\\``, ``..``)."""

OPTIONAL_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "lightning.pytorch.loggers.TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "lightning.pytorch.loggers.WandbLogger": (("wandb",), "wandb"),
}
"""Classes that need a package cdlm does not install by default: (the modules, any one of which will do; the
``cdlm[extra]`` that installs one, named after the package)."""


def allowed_targets(slots: dict[str, tuple[str, ...]] = RUN_SLOTS) -> tuple[str, ...]:
    """Every dotted class path ``slots`` allow, sorted."""
    return tuple(sorted({t for targets in slots.values() for t in targets}))


def injected(path: str) -> frozenset[str]:
    """The constructor arguments of ``path`` that cdlm sets itself."""
    return OBJECTIVE_INJECTED if path in OBJECTIVES else INJECTED.get(path, frozenset())


def missing_extra(path: str) -> str | None:
    """The ``cdlm[extra]`` that ``path`` needs when none of its optional modules is installed, else None (the
    modules are looked up, not imported)."""
    modules, extra = OPTIONAL_PACKAGES.get(path, ((), ""))
    if not modules or any(importlib.util.find_spec(name) is not None for name in modules):
        return None
    return extra


def resolve(path: str) -> type[Any]:
    """The class at the allowed dotted ``path`` (imported from the fixed list above, never from the caller)."""
    if path not in allowed_targets():
        raise KeyError(path)
    module_name, _, name = path.rpartition(".")
    target = getattr(importlib.import_module(module_name), name)
    if not inspect.isclass(target):  # the list names classes only; guard against an edit that breaks this
        raise TypeError(f"{path} is not a class")
    return target

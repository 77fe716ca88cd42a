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
from dataclasses import dataclass
from typing import Any

OBJECTIVES = (
    "cdlm.objectives.masked.MaskedDiffusion",
    "cdlm.objectives.masked_distill.MaskedDistill",
    "cdlm.objectives.autoregressive.Autoregressive",
    "cdlm.objectives.flow.OneHotFlow",
    "cdlm.objectives.flow_map.FlowMap",
    "cdlm.objectives.embedding_flow.EmbeddingFlow",
    "cdlm.objectives.bitstream.Bitstream",
    "cdlm.objectives.text_vae.TextVAEObjective",
    "cdlm.objectives.latent_prior.LatentFlowPrior",
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

SENTENCE_ENCODER = "sentence_encoder"


@dataclass(frozen=True)
class FrozenInput:
    """A config key whose value is the path of something an objective builds on, loaded by the run builder
    (``cdlm.objectives.teacher.frozen_inputs``) and passed to the constructor as ``argument`` (None inside
    ``cdlm.load``). ``kind``: the objective classes the saved run may hold (``|``-separated paths of ``OBJECTIVES``),
    or ``SENTENCE_ENCODER``; ``required``: training refuses an unset path; ``describes``: what the key should name."""

    argument: str
    kind: str
    required: bool
    describes: str


FROZEN_INPUTS: dict[str, dict[str, FrozenInput]] = {
    "cdlm.objectives.masked_distill.MaskedDistill": {
        "teacher": FrozenInput(
            "teacher_model",
            "cdlm.objectives.masked.MaskedDiffusion|cdlm.objectives.masked_distill.MaskedDistill",
            True,
            "the masked run to distil, e.g. runs/quickstart/final from experiment=quickstart",
        )
    },
    "cdlm.objectives.flow_map.FlowMap": {
        "teacher": FrozenInput(
            "teacher_model",
            "cdlm.objectives.flow.OneHotFlow",
            True,
            "the FLM run to distil, e.g. runs/flow_quickstart/final from experiment=flow_quickstart",
        )
    },
    "cdlm.objectives.latent_prior.LatentFlowPrior": {
        "vae": FrozenInput(
            "vae_model",
            "cdlm.objectives.text_vae.TextVAEObjective",
            True,
            "the text VAE run to build on, e.g. runs/latent_vae/final from experiment=latent_vae",
        )
    },
    "cdlm.objectives.text_vae.TextVAEObjective": {
        "align": FrozenInput("aligner", SENTENCE_ENCODER, False, "the sentence encoder to align to")
    },
}
"""Objective arguments that are loaded modules, keyed by the config key that holds their path. Their ``argument``
is set by cdlm (a config that names it is refused)."""

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
    if path in OBJECTIVES:
        return OBJECTIVE_INJECTED | {spec.argument for spec in FROZEN_INPUTS.get(path, {}).values()}
    return INJECTED.get(path, frozenset())


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

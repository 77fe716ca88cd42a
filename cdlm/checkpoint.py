"""Saving and loading models without arbitrary pickle: YAML + safetensors + tokenizer files.

``save_pretrained(module, dir)`` writes ``config.yaml``, ``model.safetensors`` and ``tokenizer/``;
``load(dir_or_ckpt)`` rebuilds a ``DiffusionLM`` from such a folder or from a Lightning checkpoint, which is
read with ``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import inspect
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file

from cdlm.components import MODEL_SLOTS, RUN_SLOTS
from cdlm.config import ConfigError, apply_attention, instantiate, is_base_name, locate, save_config, validate
from cdlm.objectives.latent_legacy import migrate
from cdlm.objectives.teacher import frozen_inputs, load_frozen_with
from cdlm.sharded_checkpoint import is_sharded_checkpoint, read_sharded_ckpt

if TYPE_CHECKING:
    from cdlm.module import DiffusionLM


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match its config."""


def tokenizer_state(tokenizer: Any) -> dict[str, torch.Tensor]:
    """The tokenizer's saved files as ``{name: uint8 tensor}``, storable in a weights-only checkpoint."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        files = [p for p in Path(tmp).rglob("*") if p.is_file()]
        return {str(p.relative_to(tmp)): torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files}


def tokenizer_from_state(state: dict[str, torch.Tensor]):
    """The tokenizer stored in a checkpoint, written to a temporary folder and loaded from there.

    The file names come from the checkpoint, so each must be a plain base name: an absolute name or ``../x``
    would otherwise write outside the temporary folder.
    """
    from cdlm.data.tokenizers import load_tokenizer

    if not state:
        return None
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's tokenizer is a {type(state).__name__}, not a dict of files")
    for name, data in state.items():
        if not isinstance(name, str) or not is_base_name(name):
            raise CheckpointError(f"the checkpoint's tokenizer names a file {name!r}; only plain file names are valid")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise CheckpointError(f"the checkpoint's tokenizer file {name!r} is not a 1-D uint8 tensor")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in state.items():
            (Path(tmp) / name).write_bytes(data.numpy().tobytes())
        return load_tokenizer(tmp)


def build_module(config: dict, tokenizer: Any, inputs: bool = True, datamodule: Any = None) -> DiffusionLM:
    """Build the module a config describes: backbone -> objective -> ``DiffusionLM``.

    ``inputs``: a run built to train: the objective's frozen inputs (a teacher, a latent prior's VAE, an alignment
    encoder; ``cdlm.components.FROZEN_INPUTS``) are loaded from the paths of its config
    (``cdlm.objectives.teacher.frozen_inputs``), and an objective that normalises by data statistics
    (``fit_statistics``) fits them on rows of the training split (``statistics_batch``; of ``datamodule`` when given,
    else of one built from the config's ``data``). Else (``load``) neither: the saved weights and buffers hold them.
    """
    cfg = OmegaConf.create(config)
    backbone = instantiate(cfg.model, "model")
    target = str(cfg.objective._target_)
    injected = {"backbone": backbone, "vocab_size": tokenizer.vocab_size}
    if "tokenizer" in inspect.signature(locate(target)).parameters:
        injected["tokenizer"] = tokenizer  # objectives that turn ids back into text (a latent VAE's alignment)
    injected.update(frozen_inputs(target, cfg.objective, read_objective if inputs else None))
    objective = instantiate(cfg.objective, "objective", **injected)
    if inputs and callable(getattr(objective, "fit_statistics", None)):
        objective.fit_statistics(statistics_batch(cfg, tokenizer, datamodule))
    return instantiate(cfg.module, "module", objective=objective, tokenizer=tokenizer, config=config)


def read_objective(path: Path) -> torch.nn.Module:
    """The objective of the saved run at ``path`` (``load``)."""
    return load(path).objective


def load_frozen(path: str | Path, expected: tuple[type, ...], what: str) -> torch.nn.Module:
    """The frozen objective of the saved run at ``path``, of one of the ``expected`` classes; a ``ConfigError`` that
    names ``what`` (the config key) for a missing, unreadable or wrong run (``teacher.load_frozen_with``)."""
    return load_frozen_with(path, expected, what, read_objective)


def statistics_batch(cfg: DictConfig, tokenizer: Any, datamodule: Any = None) -> dict[str, torch.Tensor]:
    """``data.batch_size`` rows of the run's training split, evenly spread over it (the first ones of a stream): the
    same rows on every rank, so the statistics fitted on them agree without communication."""
    from torch.utils.data import DataLoader, Subset

    if datamodule is None:
        datamodule = instantiate(cfg.data, "data")
        datamodule.set_tokenizer(tokenizer)
    rows = datamodule.dataset("train")
    size = datamodule.batch_size
    if hasattr(rows, "__len__") and hasattr(rows, "__getitem__"):
        rows = Subset(rows, torch.linspace(0, len(rows) - 1, min(size, len(rows))).long().tolist())
    batch = next(iter(DataLoader(rows, batch_size=size)))
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def save_pretrained(module: DiffusionLM, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.yaml``, ``model.safetensors`` and the tokenizer; ``state`` is a full state dict gathered
    beforehand (sharded weights: ``cdlm.strategies.full_state_dict``), else the module's own."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(module.config, directory / "config.yaml")
    if state is None:
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    module.tokenizer.save(directory / "tokenizer")
    return directory


def load(path: str | Path, device: str | torch.device = "cpu") -> DiffusionLM:
    """Load a ``save_pretrained`` folder or a Lightning ``.ckpt`` (EMA weights when the run used EMA).

    Nothing in the file decides what code runs: the stored config may name only cdlm's model classes
    (``cdlm.components.MODEL_SLOTS``), tensors are read with safetensors or ``torch.load(weights_only=True)``, and
    the tokenizer's file names must be plain base names (docs/security.md).
    """
    path = Path(path)
    config, tokenizer, state = read_checkpoint(path)
    try:
        module = build_module(config, tokenizer, inputs=False)  # the saved weights hold the frozen inputs
    except ConfigError as err:
        raise CheckpointError(f"{path}: its stored config cannot be built: {err}") from err
    load_weights(module, state, path)
    return module.to(device).eval()


def trained_steps(path: str | Path) -> int | None:
    """The optimizer steps behind a checkpoint: a ``.ckpt``'s (or sharded checkpoint's) ``global_step``; for a
    ``save_pretrained`` folder, which a run writes when it ends, its config's ``trainer.max_steps`` (None if unset)."""
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        config, _, _ = read_checkpoint(path)
        return config.get("trainer", {}).get("max_steps")
    return int(read_ckpt(path).get("global_step", 0))


def read_checkpoint(path: Path) -> tuple[dict, Any, dict[str, torch.Tensor]]:
    """``(config, tokenizer, state_dict)`` of a ``save_pretrained`` folder or a ``.ckpt``; config checked."""
    from cdlm.data.tokenizers import load_tokenizer

    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: give a save_pretrained folder or a .ckpt file")
    if path.is_dir() and not is_sharded_checkpoint(path):
        if not (path / "config.yaml").is_file() or not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path} is not a save_pretrained folder (config.yaml + model.safetensors)")
        config = _read(lambda: OmegaConf.load(path / "config.yaml"), path / "config.yaml")
        config, state = migrate(config, _read(lambda: load_file(str(path / "model.safetensors")), path))
        return checked_config(config, path), load_tokenizer(path / "tokenizer"), state
    ckpt = read_ckpt(path)
    config, state = migrate(ckpt["cdlm"]["config"], ckpt["state_dict"])  # a former LatentDiffusion run
    return checked_config(config, path), tokenizer_from_state(ckpt["cdlm"]["tokenizer"]), state


def read_ckpt(path: Path) -> dict:
    """A Lightning checkpoint of a cdlm run (a ``.ckpt`` file or a sharded checkpoint directory,
    ``cdlm.sharded_checkpoint``), read weights-only, its ``cdlm`` section and state dict checked."""
    if is_sharded_checkpoint(path):  # a directory of per-rank shards (trainer=fsdp sharded_checkpoints=true)
        ckpt = _read(lambda: read_sharded_ckpt(path), path)
    else:
        ckpt = _read(lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
    section = ckpt.get("cdlm") if isinstance(ckpt, dict) else None
    if not isinstance(section, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is a torch file but not a cdlm checkpoint (no 'cdlm' config section)")
    if not isinstance(section.get("config"), dict) or not isinstance(section.get("tokenizer", {}), dict):
        raise CheckpointError(f"{path}: its 'cdlm' section must hold a config dict and a tokenizer dict")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise CheckpointError(f"{path}: its state_dict must map names to tensors")
    section.setdefault("tokenizer", {})
    return ckpt


def checked_config(config: Any, source: Path) -> dict:
    """A stored config as a plain dict, validated like a command-line config (allowed classes only, no
    resolvers, typed arguments) and holding the model's three slots."""
    node = OmegaConf.create(config) if isinstance(config, dict) else config
    if not isinstance(node, DictConfig) or any(not isinstance(node.get(s), DictConfig) for s in MODEL_SLOTS):
        raise CheckpointError(f"{source}: its stored config must be a mapping with {list(MODEL_SLOTS)} sections")
    try:
        validate(node, RUN_SLOTS, settings=False)
        apply_attention(node)  # a config saved before the objective's attention was written into model.mask_mode
        return OmegaConf.to_container(node, resolve=True)
    except (ConfigError, OmegaConfBaseException) as err:
        raise CheckpointError(f"{source}: its stored config is refused: {err}") from err


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict`` with a message that says which tensors differ."""
    check_weights(module, state, source)
    module.load_state_dict(state)


def check_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse a state dict whose names or shapes differ from ``module``'s, naming the first differences."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}"
        )


def _read(reader, path: Path):
    """``reader()``, with any failure to read the file as a ``CheckpointError`` that says what kind of file it is."""
    try:
        return reader()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds Python objects beyond tensors and plain containers, which cdlm "
            "never unpickles (a weights-only load refused them); load it only if you trust it, in your own code"
        ) from err
    except Exception as err:  # torch, safetensors and yaml raise many types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {first[:300]}") from err

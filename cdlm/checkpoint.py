"""Saving and loading models without arbitrary pickle: YAML + safetensors + tokenizer files.

``save_pretrained(module, dir)`` writes ``config.yaml``, ``model.safetensors`` and ``tokenizer/``;
``load(dir_or_ckpt)`` rebuilds a ``DiffusionLM`` from such a folder or from a Lightning checkpoint, which is
read with ``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import inspect
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from cdlm.config import instantiate, locate, save_config

if TYPE_CHECKING:
    from cdlm.module import DiffusionLM


LOADING: ContextVar[bool] = ContextVar("cdlm_loading", default=False)
"""True while ``load`` builds a module whose weights it then replaces: a constructor may skip work that only sets
initial weights (a distillation student reading its teacher)."""


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
    from cdlm.data.tokenizers import load_tokenizer

    if not state:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in state.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.numpy().tobytes())
        return load_tokenizer(tmp)


def build_module(config: dict, tokenizer: Any) -> DiffusionLM:
    """Build the module a config describes: backbone -> objective -> ``DiffusionLM``."""
    cfg = OmegaConf.create(config)
    backbone = instantiate(cfg.model)
    injected = {"backbone": backbone, "vocab_size": tokenizer.vocab_size}
    if "tokenizer" in inspect.signature(locate(cfg.objective._target_)).parameters:
        injected["tokenizer"] = tokenizer  # objectives that turn ids back into text (a latent VAE's alignment)
    objective = instantiate(cfg.objective, **injected)
    return instantiate(cfg.module, objective=objective, tokenizer=tokenizer, config=config)


def save_pretrained(module: DiffusionLM, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(module.config, directory / "config.yaml")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    module.tokenizer.save(directory / "tokenizer")
    return directory


def load(path: str | Path, device: str | torch.device = "cpu") -> DiffusionLM:
    """Load a ``save_pretrained`` folder or a Lightning ``.ckpt`` (EMA weights when the run used EMA)."""
    from cdlm.data.tokenizers import load_tokenizer

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: give a save_pretrained folder or a .ckpt file")
    if path.is_dir():
        if not (path / "config.yaml").is_file() or not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path} is not a save_pretrained folder (config.yaml + model.safetensors)")
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        tokenizer = load_tokenizer(path / "tokenizer")
        state = _read(lambda: load_file(str(path / "model.safetensors")), path)
    else:
        ckpt = _read(lambda: torch.load(path, map_location="cpu", weights_only=True), path)
        if "cdlm" not in ckpt or "state_dict" not in ckpt:
            raise CheckpointError(f"{path} is a torch file but not a cdlm checkpoint (no 'cdlm' config section)")
        config, tokenizer = ckpt["cdlm"]["config"], tokenizer_from_state(ckpt["cdlm"]["tokenizer"])
        state = ckpt["state_dict"]
    token = LOADING.set(True)
    try:
        module = build_module(config, tokenizer)
    finally:
        LOADING.reset(token)
    load_weights(module, state, path)
    return module.to(device).eval()


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict`` with a message that says which tensors differ."""
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
    module.load_state_dict(state)


def _read(reader, path: Path):
    try:
        return reader()
    except Exception as err:  # torch and safetensors raise many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err

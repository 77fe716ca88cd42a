"""Configuration: YAML groups + dot-list overrides -> one validated config; safe instantiation.

``configs/config.yaml`` names one file per group in ``defaults``; ``group=name`` picks another file,
``experiment=name`` applies an experiment file (its own ``defaults`` and values), and ``a.b=value`` sets any key.
Every key of a ``_target_`` node must be a parameter of the target's constructor, every other key must exist
in the defaults; a wrong key fails with the list of valid ones. Targets are imported only from an allowlist.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent / "configs"
GROUPS = ("data", "model", "objective", "sampler", "trainer")
ALLOWED_PREFIXES = ("cdlm.", "torch.", "lightning.")
INJECTED = {"backbone", "vocab_size", "objective", "tokenizer"}  # constructor arguments filled in by code


class ConfigError(ValueError):
    """A configuration that cannot be built; the message says what is valid."""


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def load_group(group: str, name: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    path = config_dir / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no {group} config named {name!r}; available: {group_options(group, config_dir)}")
    return OmegaConf.load(path)


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Build the run config from the defaults, an optional experiment, group choices and dot-list overrides."""
    pairs = [_split(o) for o in overrides]
    base = OmegaConf.load(config_dir / "config.yaml")
    choices = dict(base.pop("defaults"))
    experiment = None
    for key, value in pairs:
        if key == "experiment":
            experiment = load_group("experiment", value, config_dir)
            choices.update(experiment.pop("defaults", {}))
    choices.update({k: v for k, v in pairs if k in GROUPS})
    cfg = OmegaConf.merge(base, {g: load_group(g, str(choices[g]), config_dir) for g in GROUPS})
    cfg.choices = choices
    if experiment is not None:
        for key, value in _flatten(experiment):
            _set(cfg, key, value)
    for key, value in pairs:
        if key not in GROUPS and key != "experiment":
            _set(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v)
    return cfg


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(
            f"override {override!r} is not of the form key=value (e.g. model.depth=4, data=shakespeare_bpe)"
        )
    key, value = override.split("=", 1)
    return key.strip(), value


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a config as dotted keys (a ``_target_`` node's children are leaves of their own)."""
    if isinstance(node, DictConfig):
        items = []
        for key in node:
            items += _flatten(node[key], f"{prefix}{key}.")
        return items
    return [(prefix[:-1], node)]


def _set(cfg: DictConfig, dotted: str, value: Any) -> None:
    """Set ``dotted`` after checking that the key exists or is a constructor parameter of its ``_target_``."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, DictConfig) or part not in node:
            where = ".".join(parents[:i]) or "the top level"
            raise ConfigError(f"unknown config key {dotted!r}: {where} has no {part!r}; valid keys: {_keys(node)}")
        node = node[part]
    if leaf not in node and leaf not in valid_keys(node):
        where = ".".join(parents) or "the top level"
        raise ConfigError(f"unknown config key {dotted!r}; valid keys under {where}: {sorted(valid_keys(node))}")
    node[leaf] = value


def _keys(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def valid_keys(node: DictConfig) -> set[str]:
    """Keys a node may hold: its own, plus its target's constructor parameters."""
    keys = set(node.keys())
    if "_target_" in node:
        keys |= set(_parameters(locate(node._target_))) - INJECTED
    return keys


def _parameters(target: Any) -> list[str]:
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def locate(path: str) -> Any:
    """Import ``path`` if it lies in an allowed package and is a class (or any cdlm callable)."""
    if not isinstance(path, str) or not path.startswith(ALLOWED_PREFIXES):
        raise ConfigError(f"_target_ {path!r} is not allowed; targets must live in {list(ALLOWED_PREFIXES)}")
    module_name, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"_target_ {path!r} cannot be imported: {err}") from err
    if not (inspect.isclass(target) or path.startswith("cdlm.")):
        raise ConfigError(f"_target_ {path!r} is not a class; only classes may be built outside cdlm")
    return target


def instantiate(node: DictConfig | dict, **injected: Any) -> Any:
    """Build ``node._target_(**node, **injected)``, recursing into nested ``_target_`` nodes."""
    node = OmegaConf.create(node) if isinstance(node, dict) else node
    target = locate(node._target_)
    unknown = set(node.keys()) - {"_target_"} - set(_parameters(target))
    if unknown:
        raise ConfigError(f"{node._target_} takes no argument(s) {sorted(unknown)}; valid: {_parameters(target)}")
    kwargs = {k: _build(node[k]) for k in node if k != "_target_"}
    return target(**kwargs, **injected)


def _build(value: Any) -> Any:
    if isinstance(value, DictConfig) and "_target_" in value:
        return instantiate(value)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_keys(name: str, given: DictConfig | dict, target: Any, exclude: set[str] = frozenset()) -> None:
    """Fail if ``given`` has a key that is not a parameter of ``target`` (for plain kwargs groups)."""
    valid = set(_parameters(target)) - set(exclude)
    unknown = sorted(set(given.keys()) - valid)
    if unknown:
        raise ConfigError(f"unknown {name} key(s) {unknown}; valid keys: {sorted(valid)}")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig | dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg, path, resolve=True)

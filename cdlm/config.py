"""Configuration: YAML groups + dot-list overrides -> one validated config; safe instantiation.

``configs/config.yaml`` names one file per group in ``defaults``; ``group=name`` picks another file,
``experiment=name`` (or ``experiment=path/to/file.yaml``) applies an experiment file (its own ``defaults`` and
values), and ``a.b=value`` sets any key. Every key of a ``_target_`` node must be a parameter of the target's
constructor and every value must have the parameter's type; every other key must exist in the defaults. A
``_target_`` may only name a class of ``cdlm.components`` in its own slot; resolvers (``${oc.env:...}`` and the like)
are refused. Everything is checked before anything is built (docs/security.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cdlm import components
from cdlm.typecheck import conforms, describe, hints

CONFIG_DIR = Path(__file__).parent / "configs"
GROUPS = ("data", "model", "objective", "sampler", "trainer", "logger")
SINGLE_DEFAULTS = (
    "sampler",
    "objective",
)  # groups whose files may name one other file of the group as ``defaults`` to extend
RESOLVER = re.compile(r"\$\{[^}]*:")  # ${name:...}: a resolver call (oc.env, oc.decode, ...), not a key reference


class ConfigError(ValueError):
    """A configuration that cannot be built; the message says what is valid."""


@dataclass(frozen=True)
class RunSettings:
    """The run's top-level keys: ``seed``, ``run_dir``, ``resume`` (null | auto | a .ckpt path), ``overwrite``,
    ``release_freed_memory`` (``cdlm/allocator.py``), ``tf32`` (float32 matmuls on TF32 tensor cores on CUDA),
    ``sharded_checkpoints`` (``trainer=fsdp``: each rank writes its own shard, ``cdlm/sharded_checkpoint.py``)."""

    seed: int = 0
    run_dir: str = "runs/default"
    resume: str | None = None
    overwrite: bool = False
    release_freed_memory: bool = True
    tf32: bool = True
    sharded_checkpoints: bool = False

    def __post_init__(self) -> None:
        if not self.run_dir.strip():
            raise ConfigError("run_dir must name a directory, got an empty string")
        if self.resume is not None and self.overwrite:
            raise ConfigError(f"resume={self.resume!r} and overwrite=true contradict: resume a run or discard it")


SAMPLE_N = 4
"""Samples drawn by default: ``sample.n`` (printed after training) and ``n`` of ``cdlm sample`` and the API."""
SAMPLE_LENGTH = 256
"""Tokens per sample printed after training (``sample.length``); ``cdlm sample`` takes the run's ``data.seq_len``."""


@dataclass(frozen=True)
class SampleSettings:
    """``sample.n`` samples of ``sample.length`` tokens, printed after training, drawn with ``sample.seed``; these
    defaults fill the ``sample`` section of ``configs/config.yaml``."""

    n: int = SAMPLE_N
    length: int = SAMPLE_LENGTH
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n", "length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sample.{key} must be a positive integer, got {getattr(self, key)}")


# ---- groups and composition ----------------------------------------------------------------------------------
def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def load_group(group: str, name: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The file ``name`` of ``group`` (a name from ``group_options``, never a path; an experiment may be a path)."""
    name = str(name)
    if group == "experiment" and name.endswith((".yaml", ".yml")):
        return load_yaml(Path(name).expanduser(), "experiment file")
    options = group_options(group, config_dir)
    if name not in options:
        hint = " or a path to a .yaml file" if group == "experiment" else ""
        raise ConfigError(f"no {group} config named {name!r}; available: {options}{hint}")
    return inherit(group, load_yaml(config_dir / group / f"{name}.yaml", f"{group} config"), config_dir, (name,))


def inherit(group: str, node: DictConfig, config_dir: Path, chain: tuple[str, ...]) -> DictConfig:
    """``node`` on top of the config of its group that its ``defaults`` key names, if any (a preset states only what
    it changes: ``defaults: parallel`` then ``selector: prophet``); ``chain``: the names read so far (a loop is
    refused)."""
    if "defaults" not in node or group not in SINGLE_DEFAULTS:
        return node
    base = node.pop("defaults")
    if not isinstance(base, str) or base not in group_options(group, config_dir) or base in chain:
        raise ConfigError(f"{group} config {chain[-1]!r}: defaults={base!r} must name another {group} config")
    parent = load_yaml(config_dir / group / f"{base}.yaml", f"{group} config")
    return OmegaConf.merge(inherit(group, parent, config_dir, (*chain, base)), node)


def load_yaml(path: Path, what: str) -> DictConfig:
    """A YAML mapping (omegaconf's loader is yaml's safe loader: no tags, no objects)."""
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found")
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{what} {path} must hold a mapping of keys to values, not a {type(node).__name__}")
    return node


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Build the run config from the defaults, an optional experiment, group choices and dot-list overrides;
    validated (keys, ``_target_`` slots, types, resolvers, sampler options) and with the objective's attention
    written into ``model.mask_mode`` (``apply_attention``) before it is returned."""
    try:
        cfg = _compose(overrides, config_dir)
        validate(cfg)
        apply_attention(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {err}") from err
    return cfg


def _compose(overrides: list[str] | tuple[str, ...], config_dir: Path) -> DictConfig:
    pairs = [_split(o) for o in overrides]
    base = OmegaConf.load(config_dir / "config.yaml")
    base.sample = OmegaConf.merge(dataclasses.asdict(SampleSettings()), base.get("sample") or {})
    choices = dict(base.pop("defaults"))
    experiment = None
    for key, value in pairs:
        if key == "experiment":
            experiment = load_group("experiment", value, config_dir)
            choices.update(experiment.pop("defaults", {}))
    choices.update({k: v for k, v in pairs if k in GROUPS})
    if unknown := sorted(set(choices) - set(GROUPS)):
        raise ConfigError(f"unknown config group(s) {unknown} in defaults; groups are {list(GROUPS)}")
    cfg = OmegaConf.merge(base, {g: load_group(g, str(choices[g]), config_dir) for g in GROUPS})
    cfg.choices = choices
    if experiment is not None:
        for key, value in _flatten(OmegaConf.to_container(experiment, resolve=False)):
            _set(cfg, key, value)
    for key, value in pairs:
        if key not in GROUPS and key != "experiment":
            _set(cfg, key, _parse_value(key, value))
    return cfg


def _split(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(
            f"override {override!r} is not of the form key=value (e.g. model.depth=4, data=shakespeare_bpe)"
        )
    key, value = override.split("=", 1)
    return key.strip(), value


def _parse_value(key: str, value: str) -> Any:
    """A command-line value as YAML would read it (``4`` int, ``1e-3`` float, ``null``, ``[1, 2]``)."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]), resolve=False)["v"]  # unresolved
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the value of {key}={value!r}: {err}") from err


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a config as dotted keys (a ``_target_`` node's children are leaves of their own)."""
    if isinstance(node, dict) and node:
        items = []
        for key, value in node.items():
            items += _flatten(value, f"{prefix}{key}.")
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
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config key {'.'.join(parents)!r} holds a value, not keys; cannot set {dotted!r}")
    if "_target_" in node and leaf in components.injected(str(node._target_)):
        raise ConfigError(f"{dotted} is set by cdlm itself (it keeps checkpoints and logs inside run_dir)")
    if leaf not in node and leaf not in valid_keys(node):
        where = ".".join(parents) or "the top level"
        raise ConfigError(f"unknown config key {dotted!r}; valid keys under {where}: {sorted(valid_keys(node))}")
    node[leaf] = value


def _keys(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def valid_keys(node: DictConfig) -> set[str]:
    """Keys a node may hold: its own, plus its target's constructor parameters (less those cdlm sets)."""
    keys = set(node.keys())
    if "_target_" in node:
        path = str(node._target_)
        keys |= set(_parameters(locate(path))) - components.injected(path)
    return keys


def _parameters(target: Any) -> list[str]:
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# ---- validation ------------------------------------------------------------------------------------------------
def validate(cfg: DictConfig, slots: dict[str, tuple[str, ...]] = components.RUN_SLOTS, settings: bool = True) -> None:
    """Check a composed (or stored) config before anything is built: no resolvers, ``_target_`` only in its slots
    and from the allowed classes, every constructor argument of the right type, the sampler's options and (with
    ``settings``) the top-level run settings in range."""
    check_no_resolvers(cfg)
    values = OmegaConf.to_container(cfg, resolve=True)
    if settings:  # first: a key such as ``seed`` is also read by the sections (``module.seed: ${seed}``)
        run_keys = [f.name for f in dataclasses.fields(RunSettings)]
        build_settings(RunSettings, "", {k: values[k] for k in run_keys if k in values})
        build_settings(SampleSettings, "sample.", values.get("sample") or {})
    check_targets(values, slots)
    for slot in slots:
        if isinstance(values.get(slot), dict):
            check_arguments(slot, values[slot])
    if "sampler" in values:
        check_sampler(values["sampler"])


def apply_attention(cfg: DictConfig) -> None:
    """Write the attention the objective declares into the model config before the backbone is built, so that the
    saved config says what runs: the model settings the objective class's ``attention_for(options)`` returns
    (``causal`` for the autoregressive objective; ``block_causal`` and the block size for a block-causal latent prior).
    A model config that sets another ``mask_mode`` is a ``ConfigError``; objectives without ``attention_for`` (or that
    return no ``mask_mode``) leave the model config alone. Idempotent (stored configs go through it again)."""
    model, objective = cfg.get("model"), cfg.get("objective")
    if not isinstance(model, DictConfig) or not isinstance(objective, DictConfig) or "_target_" not in objective:
        return
    attention_for = getattr(locate(str(objective._target_)), "attention_for", None)
    declared = {} if attention_for is None else attention_for(OmegaConf.to_container(objective, resolve=False))
    mode, given = declared.get("mask_mode"), model.get("mask_mode")
    if mode is None:
        return
    if given is not None and given != mode:
        raise ConfigError(
            f"objective {objective._target_} attends with mask_mode={mode!r}, but model.mask_mode={given!r}: "
            f"remove model.mask_mode or set it to {mode}"
        )
    for key, value in declared.items():
        model[key] = value


def check_no_resolvers(cfg: DictConfig | ListConfig, where: str = "") -> None:
    """Refuse ``${resolver:...}`` anywhere: an environment value would be written, resolved, into ``config.yaml``,
    ``final/`` and every checkpoint (key references such as ``${seed}`` stay allowed)."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if isinstance(value, (dict, list)):
            check_no_resolvers(value, path)
        elif isinstance(value, str) and RESOLVER.search(value):
            raise ConfigError(
                f"{path}={value!r} calls a resolver; cdlm refuses resolvers such as ${{oc.env:...}} (an environment "
                "value would be stored in config.yaml and checkpoints): write the value itself"
            )


def check_targets(values: dict, slots: dict[str, tuple[str, ...]], where: str = "") -> None:
    """``_target_`` only at the root of a slot, naming one of that slot's classes."""
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if not isinstance(value, dict):
            continue
        if "_target_" in value and (where or key not in slots):
            raise ConfigError(f"{path}._target_: only these keys may name a class: {sorted(slots)}")
        if not where and key in slots and value.get("_target_") not in slots[key]:
            raise ConfigError(
                f"{key}._target_={value.get('_target_')!r} is not allowed; {key} may be one of {list(slots[key])}"
            )
        check_targets(value, slots, path)


def check_arguments(path: str, node: dict) -> None:
    """Every key of a ``_target_`` node is a constructor parameter (not one cdlm sets) of the right type."""
    target_path = node["_target_"]
    target = locate(target_path)
    params, types_ = set(_parameters(target)), hints(target)
    for key, value in node.items():
        if key == "_target_":
            continue
        if key in components.injected(target_path):
            raise ConfigError(f"{path}.{key} is set by cdlm itself; remove it from the config")
        if key not in params:
            raise ConfigError(f"{target_path} takes no argument {key!r} ({path}.{key}); valid: {sorted(params)}")
        if key in types_ and not conforms(value, types_[key]):
            raise ConfigError(f"{path}.{key}={value!r} is not valid: expected {describe(types_[key])}")
        if key in components.BASE_NAMES.get(target_path, ()) and value is not None and not is_base_name(value):
            raise ConfigError(f"{path}.{key}={value!r} must be a plain file name (no '/', no backslash, no '..')")


def is_base_name(name: str) -> bool:
    """A plain file name: not empty, no path separators, not ``.`` or ``..``, no NUL."""
    return bool(name) and not any(c in name for c in "/\\\0") and name not in (".", "..") and ".." not in name


def build_settings(cls: type, prefix: str, given: dict) -> Any:
    """``cls(**given)`` for a settings dataclass, with the types checked first and range errors as ConfigError."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(given) - fields):
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; valid: {[prefix + f for f in fields]}")
    types_ = hints(cls)
    for key, value in given.items():
        if not conforms(value, types_[key]):
            raise ConfigError(f"{prefix}{key}={value!r} is not valid: expected {describe(types_[key])}")
    return cls(**given)


def check_sampler(node: Any) -> None:
    """The sampler group: a registered name, a step count and options of the right type and range."""
    from cdlm.samplers import check_knobs, check_steps, get_sampler

    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise ConfigError(f"sampler.name must name a sampler, got {node.get('name')!r}")
    try:
        spec = get_sampler(node["name"])
        check_steps(spec, node.get("steps"))
        check_knobs(spec, sampler_knobs(node))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def sampler_knobs(node: dict | DictConfig) -> dict:
    """A sampler node's options besides ``name`` and ``steps``."""
    return {k: v for k, v in dict(node).items() if k not in ("name", "steps")}


# ---- instantiation ---------------------------------------------------------------------------------------------
def locate(path: str) -> Any:
    """The class ``path`` names, if it is one of ``cdlm.components``' allowed classes."""
    try:
        return components.resolve(path)
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"_target_ {path!r} is not allowed; a config may name only these classes: "
            f"{list(components.allowed_targets())}"
        ) from err


def instantiate(node: DictConfig | dict, where: str | None = None, **injected: Any) -> Any:
    """Build ``node._target_(**node, **injected)`` for an allowed class; a ``ValueError`` of the constructor (an
    argument out of range) or a missing optional package (``components.OPTIONAL_PACKAGES``) becomes a
    ``ConfigError`` that names ``where`` (the config key, e.g. ``model``)."""
    node = OmegaConf.create(node) if isinstance(node, dict) else node
    target = locate(node._target_)
    if extra := components.missing_extra(str(node._target_)):
        raise ConfigError(f"{where or node._target_} needs the {extra} package: pip install 'cdlm[{extra}]'")
    unknown = set(node.keys()) - {"_target_"} - set(_parameters(target))
    if unknown:
        raise ConfigError(f"{node._target_} takes no argument(s) {sorted(unknown)}; valid: {_parameters(target)}")
    kwargs = {k: _plain(node[k]) for k in node if k != "_target_"}
    kwargs.update(injected)  # values cdlm builds from the config's own (e.g. the trainer's strategy object)
    try:
        return target(**kwargs)
    except ConfigError:
        raise
    except (ValueError, MisconfigurationException, TypeError) as err:  # Lightning's "bad argument" errors
        if isinstance(err, TypeError) and target.__module__.startswith("cdlm"):
            raise  # arguments are type-checked before this: a TypeError of cdlm's own code is a bug, with traceback
        raise ConfigError(f"{where or 'config'} ({target.__name__}): {err}") from err


def _plain(value: Any) -> Any:
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

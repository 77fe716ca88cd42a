"""Checking a config value against a constructor's type annotation, before anything is built.

``model.width=abc`` or ``trainer.max_steps=1.5`` would otherwise fail deep inside torch or Lightning with a traceback,
after the run has started. Values come from YAML or the command line, so they are plain Python values or omegaconf
containers; a node with a ``_target_`` stands for the object it will build.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig

NoneType = type(None)


def hints(target: Any) -> dict[str, Any]:
    """The resolved annotations of ``target``'s constructor (empty where they cannot be resolved)."""
    init = target.__init__ if isinstance(target, type) else target
    try:
        return typing.get_type_hints(init)
    except Exception:  # an annotation naming an optional package that is not installed: nothing to check against
        return {}


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a config value) is acceptable for an argument annotated ``hint``."""
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # built later, by its own checked constructor
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return conforms(value, args[0])
    if origin is not None:
        return _conforms_generic(value, origin, args)
    return _conforms_plain(value, hint)


def _conforms_plain(value: Any, hint: Any) -> bool:
    if hint is NoneType or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple, ListConfig))
    if hint in (dict, collections.abc.Mapping):
        return isinstance(value, (dict, DictConfig))
    if isinstance(hint, type):
        return isinstance(value, hint)  # e.g. a Strategy object passed from Python; YAML cannot make one
    return True  # Callable, ForwardRef and other forms a config cannot express: nothing to check


def _conforms_generic(value: Any, origin: Any, args: tuple) -> bool:
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
        return not args or all(conforms(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, (dict, DictConfig))
    if origin is type:
        return False
    return True  # Callable[...] and the like


def describe(hint: Any) -> str:
    """``hint`` as a user reads it: ``int``, ``float | None``, ``one of ['a', 'b']``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if hint is NoneType:
        return "null"
    if isinstance(hint, type) and origin is None:
        return hint.__name__
    return str(hint).replace("typing.", "")

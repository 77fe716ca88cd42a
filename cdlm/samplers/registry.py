"""The sampler registry: a name maps to a function, the objective space it serves and its options' valid values.

A sampler is a plain function ``sample_<name>(objective, x, ts, *, generator, callback, **knobs)`` under
``torch.no_grad()`` (k-diffusion style). Asking for a sampler whose space does not match the objective is an
error raised when the run is built, listing the samplers that do fit; so is one whose ``requires`` protocol (an
interface beyond the space, e.g. a two-time denoiser) the objective lacks.

Options ("knobs") are the keyword-only parameters after ``callback``. Their types come from the annotations
(``bool``, ``int``, ``float``, ``str``, ``X | None``); their valid values are declared next to the sampler, in
``register_sampler(..., knobs={"top_p": Range(0, 1, low_open=True), "final": Choice("argmax", "sample")})``, with
cross-option ``rules`` (``Ordered("t_lo", "t_hi")``) and the valid ``steps`` (default: an integer >= 1).
``check_knobs`` and ``check_steps`` refuse a bad value before any work, naming the option, the value and what is
valid; values from YAML or the command line may be of any type, so types are checked strictly (a bool is not a
number, ``1.5`` is not an integer).
"""

from __future__ import annotations

import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cdlm.types import Space

Grid = Callable[[int, torch.device], torch.Tensor]
# the parameters every sampler takes (``fixed``, a prompt's positions, only those that keep them outside the state:
# masked samplers keep the visible tokens of ``x``); the rest are knobs
SHARED = ("objective", "x", "ts", "generator", "callback", "fixed", "stop_id")


class Constraint(Protocol):
    """The valid values of one option (checked after its type)."""

    def describe(self) -> str:
        """The valid values, e.g. ``in (0, 1]`` or ``one of ['argmax', 'sample']``."""
        ...

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is valid, else what is wrong, e.g. ``is out of range: must lie in (0, 1]``."""
        ...


class Rule(Protocol):
    """A condition relating several options of one sampler."""

    names: tuple[str, ...]

    def describe(self) -> str:
        """The condition, e.g. ``t_lo <= t_hi``."""
        ...

    def problem(self, values: Mapping[str, Any]) -> str | None:
        """None if the options ``values`` (defaults filled in) satisfy the rule, else what is wrong."""
        ...


def _num(value: float) -> str:
    """``0``, ``1``, ``0.5``: a bound as a person writes it."""
    return f"{value:g}"


@dataclass(frozen=True)
class Range:
    """A finite number in ``[low, high]``; ``low_open`` / ``high_open`` exclude an end, None leaves it unbounded.

    ``note`` (e.g. ``0 = greedy``) is shown with the range in messages and ``describe``.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def bounds(self) -> str:
        """``in (0, 1]``, ``>= 0``, ``< 5`` or ``finite``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"

    def describe(self) -> str:
        return self.bounds() + (f" ({self.note})" if self.note else "")

    def contains(self, value: float) -> bool:
        """Whether ``value`` (a number) is finite and within the bounds."""
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def problem(self, value: float) -> str | None:
        if self.contains(value):
            return None
        verb = "lie" if self.bounds().startswith("in ") else "be"
        return f"is out of range: must {verb} {self.describe()}"


@dataclass(frozen=True, init=False)
class Choice:
    """One of a fixed set of values, e.g. ``Choice("argmax", "sample")``."""

    values: tuple
    note: str = ""

    def __init__(self, *values: object, note: str = "") -> None:
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "note", note)

    def describe(self) -> str:
        return f"one of {sorted(self.values, key=str)}" + (f" ({self.note})" if self.note else "")

    def problem(self, value: object) -> str | None:
        return None if value in self.values else f"is not valid: choose {self.describe()}"


@dataclass(frozen=True)
class Ordered:
    """``values[low] <= values[high]`` for two numeric options, e.g. the ends of a window."""

    low: str
    high: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.low, self.high)

    def describe(self) -> str:
        return f"{self.low} <= {self.high}"

    def problem(self, values: Mapping[str, Any]) -> str | None:
        low, high = values[self.low], values[self.high]
        if low <= high:
            return None
        return f"options {self.low}={low!r}, {self.high}={high!r} are not valid: need {self.describe()}"


STEPS = Range(1)  # the default valid ``steps``: an integer >= 1 (every grid refuses fewer)


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    space: Space
    grid: Grid
    requires: type | None = None  # a runtime-checkable Protocol the objective must satisfy beyond its space
    constraints: Mapping[str, Constraint] = field(default_factory=dict, hash=False)  # knob -> its valid values
    rules: tuple[Rule, ...] = ()  # conditions across knobs
    steps: Range = STEPS  # the valid number of steps

    def fits(self, objective: object) -> bool:
        """Whether ``objective`` has this sampler's space and, if any, its ``requires`` protocol."""
        space_ok = getattr(objective, "space", None) == self.space
        return space_ok and (self.requires is None or isinstance(objective, self.requires))

    @property
    def takes_fixed(self) -> bool:
        """Whether the sampler takes a prompt as ``fixed=`` (``cdlm.prompts``); the others keep the visible tokens
        of their starting state."""
        return "fixed" in inspect.signature(self.fn).parameters

    @property
    def takes_stop(self) -> bool:
        """Whether the sampler ends early once every row has drawn ``stop_id`` (``generate(stop_at_eos=True)``
        passes the EOS id); the others draw the whole length and the result is cut after."""
        return "stop_id" in inspect.signature(self.fn).parameters

    def knobs(self) -> list[str]:
        """The keyword arguments the sampler accepts beyond the shared signature."""
        return [p for p in inspect.signature(self.fn).parameters if p not in SHARED]

    def knob_defaults(self) -> dict[str, object]:
        """Each knob's default value, from the sampler's signature (knobs without one are left out)."""
        params = inspect.signature(self.fn).parameters
        return {k: params[k].default for k in self.knobs() if params[k].default is not inspect.Parameter.empty}

    def knob_types(self) -> dict[str, object]:
        """Each knob's annotated type (``typing.Any`` where there is none), evaluated from the signature."""
        hints = typing.get_type_hints(self.fn)
        return {k: hints.get(k, Any) for k in self.knobs()}

    def valid(self, knob: str) -> str:
        """What ``knob`` accepts, e.g. ``a number in (0, 1]`` or ``None or an integer >= 1``."""
        return _valid(self.knob_types()[knob], self.constraints.get(knob))

    def describe(self) -> str:
        """The options for ``--help``, unindented: ``steps``, then one line per knob (name=default: valid values),
        then the rules across knobs."""
        defaults, types_ = self.knob_defaults(), self.knob_types()
        lines = [f"steps: {_valid(int, self.steps)}"]
        for knob in self.knobs():
            default = f"={defaults[knob]!r}" if knob in defaults else " (required)"
            lines.append(f"{knob}{default}: {_valid(types_[knob], self.constraints.get(knob))}")
        lines += [f"and {rule.describe()}" for rule in self.rules]
        return "\n".join(lines)


def _union_args(tp: object) -> tuple | None:
    """The members of a union type (``X | Y`` or ``Optional[X]``), None for any other type."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else None


def _coerce(tp: object, value: object) -> tuple[bool, object]:
    """Whether ``value`` is of type ``tp``, and the value to use (an integral float given for an ``int`` -> int).

    Strict, as values come from YAML and the command line: a bool is only a bool (never a number), an ``int``
    takes integers and integral floats, a ``float`` takes any real number, None only ``X | None``.
    """
    members = _union_args(tp)
    if members is not None:
        return next(((True, v) for ok, v in (_coerce(m, value) for m in members) if ok), (False, value))
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp in (int, float) and isinstance(value, bool):
        return False, value
    if tp is int:
        if isinstance(value, numbers.Integral):
            return True, int(value)
        return (True, int(value)) if isinstance(value, float) and value.is_integer() else (False, value)
    if tp is float:
        return isinstance(value, numbers.Real), value
    return (isinstance(value, tp), value) if isinstance(tp, type) else (True, value)


def _valid(tp: object, constraint: Constraint | None) -> str:
    """What type ``tp`` under ``constraint`` accepts, in words: ``a number in (0, 1]``, ``True or False``, ..."""
    members = _union_args(tp)
    if members is not None:
        words = [_valid(m, constraint) for m in members if m is not type(None)]
        return " or ".join((["None"] if type(None) in members else []) + words)
    if isinstance(constraint, Choice):
        return constraint.describe()
    noun = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(tp)
    noun = noun or ("anything" if tp is Any else f"a {getattr(tp, '__name__', tp)}")
    return noun + (f" {constraint.describe()}" if constraint is not None else "")


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(
    name: str,
    space: Space,
    grid: Grid,
    requires: type | None = None,
    *,
    knobs: Mapping[str, Constraint] | None = None,
    rules: tuple[Rule, ...] = (),
    steps: Range = STEPS,
) -> Callable:
    """Decorator: register ``fn`` under ``name`` for objectives of ``space`` with its default time ``grid``.

    ``requires``: a runtime-checkable Protocol the objective must also satisfy (None = the space is enough).
    ``knobs``: the valid values of some of its options beyond their annotated type (``Range``, ``Choice``);
    ``rules``: conditions across options (``Ordered``); ``steps``: the valid numbers of steps (default >= 1).
    """

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        spec = SamplerSpec(name, fn, space, grid, requires, dict(knobs or {}), tuple(rules), steps)
        named = set(spec.constraints) | {n for rule in spec.rules for n in rule.names}
        if not named <= set(spec.knobs()):
            raise ValueError(f"sampler {name!r} constrains {sorted(named - set(spec.knobs()))}, not its options")
        SAMPLERS[name] = spec
        return fn

    return wrap


def get_sampler(name: str, objective: object | None = None) -> SamplerSpec:
    """Look a sampler up; if ``objective`` is given, refuse one that does not fit its ``space`` or ``requires``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered samplers: {sorted(SAMPLERS)}")
    spec = SAMPLERS[name]
    space = getattr(objective, "space", None)
    if objective is not None and spec.space != space:
        fitting = sorted(n for n, s in SAMPLERS.items() if s.space == space)
        raise ValueError(
            f"sampler {name!r} works on {spec.space} objectives, but {type(objective).__name__} is {space}; "
            f"samplers for {space} objectives: {fitting}"
        )
    if objective is not None and not spec.fits(objective):
        raise ValueError(unfit_message(spec, objective))
    return spec


def unfit_message(spec: SamplerSpec, objective: object) -> str:
    """Why ``objective`` lacks ``spec.requires``, what it would need, and the samplers that do fit it."""
    need = (spec.requires.__doc__ or spec.requires.__name__).strip().splitlines()[0]
    fitting = sorted(n for n, s in SAMPLERS.items() if s.fits(objective))
    return (
        f"sampler {spec.name!r} needs {spec.requires.__name__}: {need} {type(objective).__name__} has none; "
        f"samplers that fit {type(objective).__name__}: {fitting}"
    )


def _check_value(spec: SamplerSpec, name: str, value: object, tp: object, constraint: Constraint | None) -> object:
    """``value`` for option ``name`` of type ``tp`` (coerced, see ``_coerce``), or a ValueError naming what is valid."""
    ok, coerced = _coerce(tp, value)
    head = f"sampler {spec.name!r} option {name}={value!r}"
    if not ok:
        raise ValueError(f"{head} is not valid: must be {_valid(tp, constraint)}")
    problem = None if coerced is None or constraint is None else constraint.problem(coerced)
    if problem is not None:
        raise ValueError(f"{head} {problem}")
    return coerced


def check_knobs(spec: SamplerSpec, knobs: Mapping[str, object]) -> dict[str, object]:
    """Fail fast (ValueError) on a sampler option the sampler does not take, or a value it does not accept.

    A value is refused for its type, its range or choices (``register_sampler``'s ``knobs``), or a rule across
    options (checked with the defaults filled in). Returns the options to pass on: ``knobs`` with integral floats
    given for integer options turned into ints (``top_k=4.0`` -> ``4``).
    """
    unknown = sorted(set(knobs) - set(spec.knobs()))
    if unknown:
        raise ValueError(f"sampler {spec.name!r} has no option(s) {unknown}; valid options: {spec.knobs()}")
    types_ = spec.knob_types()
    checked = {k: _check_value(spec, k, v, types_[k], spec.constraints.get(k)) for k, v in knobs.items()}
    values = {**spec.knob_defaults(), **checked}
    for rule in spec.rules:
        problem = rule.problem(values)
        if problem is not None:
            raise ValueError(f"sampler {spec.name!r} {problem}")
    return checked


def check_steps(spec: SamplerSpec, steps: object) -> int:
    """Fail fast (ValueError) on a number of steps the sampler does not take: not an integer, or outside
    ``spec.steps`` (>= 1; flowmap: at most its ``MAX_JUMPS``). Returns ``steps`` as an int."""
    return typing.cast(int, _check_value(spec, "steps", steps, int, spec.steps))

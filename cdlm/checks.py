"""Range and choice checks of constructor arguments.

Each check raises ``ArgumentError`` (a ``ValueError``, which the CLI reports as ``cdlm: error: ...``) naming the
argument, its value and what is valid, e.g. ``depth must be an integer >= 1, got -1``. A value of the wrong kind (a
string for a width, a bool for a rate) fails the same way, never deep inside torch.
"""

from __future__ import annotations

import math
import numbers


class ArgumentError(ValueError):
    """A constructor argument outside its valid range or choices; the message names it and what is valid."""


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a finite real number (int or float, Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: int, **values: object) -> None:
    """Each keyword value an integer ``>= low``."""
    for name, value in values.items():
        if not (is_int(value) and value >= low):
            raise ArgumentError(f"{name} must be an integer >= {low}, got {value!r}")


def positive_ints(**values: object) -> None:
    """Each keyword value an integer ``>= 1``."""
    at_least(1, **values)


def positive(**values: object) -> None:
    """Each keyword value a finite number ``> 0``."""
    for name, value in values.items():
        if not (is_real(value) and value > 0):
            raise ArgumentError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative(**values: object) -> None:
    """Each keyword value a finite number ``>= 0``."""
    for name, value in values.items():
        if not (is_real(value) and value >= 0):
            raise ArgumentError(f"{name} must be a finite number >= 0, got {value!r}")


def booleans(**values: object) -> None:
    """Each keyword value ``True`` or ``False``."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ArgumentError(f"{name} must be true or false, got {value!r}")


def one_of(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name}={value!r} is not one of {choices}")


def finite(**values: object) -> None:
    """Each keyword value a finite number."""
    for name, value in values.items():
        if not is_real(value):
            raise ArgumentError(f"{name} must be a finite number, got {value!r}")


def in_interval(
    name: str, value: object, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    """``value`` a number in the interval from ``low`` to ``high``, each end closed unless ``*_open``."""
    above = is_real(value) and (value > low if low_open else value >= low)
    below = is_real(value) and (value < high if high_open else value <= high)
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ArgumentError(f"{name} must be in {interval}, got {value!r}")


def adamw_settings(
    lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int, min_lr_ratio: float
) -> None:
    """AdamW and its schedule's settings in range (``ArgumentError`` naming the argument)."""
    positive(lr=lr)
    non_negative(weight_decay=weight_decay)
    for i, beta in enumerate(betas):
        in_interval(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
    at_least(0, warmup_steps=warmup_steps)
    in_interval("min_lr_ratio", min_lr_ratio, 0.0, 1.0)

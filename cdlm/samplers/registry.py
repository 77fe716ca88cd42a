"""The sampler registry: a name maps to a function and the objective space it serves.

A sampler is a plain function ``sample_<name>(objective, x, ts, *, generator, callback, **knobs)`` under
``torch.no_grad()`` (k-diffusion style). Asking for a sampler whose space does not match the objective is an
error raised when the run is built, listing the samplers that do fit; so is one whose ``requires`` protocol (an
interface beyond the space, e.g. a two-time denoiser) the objective lacks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdlm.types import Space

Grid = Callable[[int, torch.device], torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    space: Space
    grid: Grid
    requires: type | None = None  # a runtime-checkable Protocol the objective must satisfy beyond its space

    def fits(self, objective: object) -> bool:
        """Whether ``objective`` has this sampler's space and, if any, its ``requires`` protocol."""
        space_ok = getattr(objective, "space", None) == self.space
        return space_ok and (self.requires is None or isinstance(objective, self.requires))

    def knobs(self) -> list[str]:
        """The keyword arguments the sampler accepts beyond the shared signature."""
        shared = {"objective", "x", "ts", "generator", "callback"}
        return [p for p in inspect.signature(self.fn).parameters if p not in shared]


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(name: str, space: Space, grid: Grid, requires: type | None = None) -> Callable:
    """Decorator: register ``fn`` under ``name`` for objectives of ``space`` with its default time ``grid``.

    ``requires``: a runtime-checkable Protocol the objective must also satisfy (None = the space is enough).
    """

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        SAMPLERS[name] = SamplerSpec(name, fn, space, grid, requires)
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


def check_knobs(spec: SamplerSpec, knobs: dict) -> None:
    """Fail fast on a sampler option the sampler does not take."""
    unknown = sorted(set(knobs) - set(spec.knobs()))
    if unknown:
        raise ValueError(f"sampler {spec.name!r} has no option(s) {unknown}; valid options: {spec.knobs()}")

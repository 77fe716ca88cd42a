"""Samplers: plain functions registered by name with the objective space they serve."""

from cdlm.samplers import autoregressive  # noqa: F401, I001  (registers the autoregressive sampler)
from cdlm.samplers import continuous  # noqa: F401  (registers the continuous samplers)
from cdlm.samplers import discrete  # noqa: F401  (registers the discrete samplers)
from cdlm.samplers import energy  # noqa: F401  (registers EDLM)
from cdlm.samplers import flow_map  # noqa: F401  (registers the flow-map sampler)
from cdlm.samplers import parallel  # noqa: F401  (registers the parallel-decoding sampler)
from cdlm.samplers.registry import (
    SAMPLERS,
    Choice,
    Ordered,
    Range,
    SamplerSpec,
    check_knobs,
    check_steps,
    get_sampler,
    register_sampler,
)

__all__ = [
    "SAMPLERS",
    "Choice",
    "Ordered",
    "Range",
    "SamplerSpec",
    "check_knobs",
    "check_steps",
    "get_sampler",
    "register_sampler",
]

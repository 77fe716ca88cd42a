"""Sampler option ("knob") values: a bad value is refused before any work, naming the option, the value and what is
valid (``cdlm.samplers.registry``: ``check_knobs``, ``check_steps``, ``SamplerSpec.describe``)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from cdlm.config import group_options, load_group
from cdlm.samplers import SAMPLERS, Range, check_knobs, check_steps, get_sampler, register_sampler
from cdlm.samplers.flow_map import MAX_JUMPS
from cdlm.samplers.grids import linear_grid

# (sampler, option, bad value, words the message must hold besides the option and the value)
BAD = [
    ("ancestral", "top_p", 5, "out of range: must lie in (0, 1]"),
    ("ancestral", "top_p", 0.0, "(0, 1]"),
    ("ancestral", "top_p", "abc", "must be a number in (0, 1]"),
    ("ancestral", "top_p", True, "a number in (0, 1]"),
    ("ancestral", "top_p", None, "a number in (0, 1]"),
    ("ancestral", "top_p", math.nan, "(0, 1]"),
    ("ancestral", "cache", 1.5, "True or False"),
    ("ancestral", "cache", 1, "True or False"),
    ("ancestral", "cache", "yes", "True or False"),
    ("ancestral", "final", "greedy", "choose one of ['argmax', 'sample']"),
    ("ancestral", "final", 0, "one of ['argmax', 'sample']"),
    ("ancestral", "remask_eta", 1.5, "[0, 1]"),
    ("ancestral", "remask_eta", -0.1, "[0, 1]"),
    ("parallel", "selector", "bogus", "choose one of ['ccd', 'ete', 'guided', 'prophet', 'rcr', 'threshold', 'topk']"),
    ("parallel", "selector", None, "one of ['ccd', 'ete', 'guided', 'prophet', 'rcr', 'threshold', 'topk']"),
    ("parallel", "kv_cache", "suffix", "choose one of ['delayed', 'dual', 'none', 'prefix', 'window']"),
    ("parallel", "kv_refresh", 0, ">= 1"),
    ("parallel", "guide", 5, "a string"),
    ("parallel", "ete_budget", -1, ">= 0"),
    ("parallel", "ccd_decay", 1.0, "[0, 1)"),
    ("parallel", "repulsion", -0.5, ">= 0"),
    ("parallel", "lookahead", -2, ">= 0"),
    ("parallel", "kv_window", 0, ">= 1"),
    ("edlm", "candidates", 0, ">= 1"),
    ("edlm", "window", 0.0, "(0, 1]"),
    ("edlm", "energy", 3, "a string"),
    ("parallel", "tau", 0, "(0, 1]"),
    ("parallel", "tau", 1.01, "(0, 1]"),
    ("parallel", "block_length", 0, "must be >= 1"),
    ("parallel", "block_length", 1.5, "None or an integer >= 1"),
    ("parallel", "block_length", "32", "None or an integer >= 1"),
    ("parallel", "block_length", True, "None or an integer >= 1"),
    ("parallel", "remask_eta", 2, "[0, 1]"),
    ("parallel", "temperature", -0.5, ">= 0"),
    ("parallel", "temperature", math.inf, ">= 0"),
    ("parallel", "top_p", 1.5, "(0, 1]"),
    ("parallel", "cache", "false", "True or False"),
    ("autoregressive", "temperature", -1, ">= 0"),
    ("autoregressive", "top_p", -0.2, "(0, 1]"),
    ("autoregressive", "top_k", -1, ">= 0"),
    ("autoregressive", "top_k", 2.5, "an integer >= 0"),
    ("autoregressive", "top_k", False, "an integer >= 0"),
    ("autoregressive", "cache", None, "True or False"),
    ("euler", "self_cond", 1.5, "True or False"),
    ("heun", "self_cond", "true", "True or False"),
    ("churn", "gamma", -0.1, ">= 0"),
    ("churn", "t_lo", -0.1, "[0, 1]"),
    ("churn", "t_hi", 1.5, "[0, 1]"),
    ("churn", "s_noise", 0, "> 0"),
    ("churn", "heun", 0, "True or False"),
    ("churn", "self_cond", None, "True or False"),
    ("flowmap", "gamma", 1.5, "[0, 1]"),
    ("flowmap", "gamma", "0.5", "a number in [0, 1]"),
]

# good values that are not the defaults (an int for a float option, an integral float for an int option, ...)
GOOD = [
    ("ancestral", {"top_p": 0.9, "cache": False, "final": "sample", "remask_eta": 1}),
    ("ancestral", {"top_p": 1, "remask_eta": 0.02}),
    ("parallel", {"selector": "threshold", "tau": 1, "block_length": 32, "remask_eta": 0.5}),
    ("parallel", {"block_length": 8, "kv_cache": "dual"}),
    ("parallel", {"kv_cache": "delayed", "kv_refresh": 4, "guide": "runs/ar_quickstart/final"}),
    ("edlm", {"energy": "runs/ar_quickstart/final", "candidates": 4, "window": 0.5}),
    ("parallel", {"selector": "ete", "ete_budget": 0.5, "ccd_decay": 0.9, "repulsion": 2.0, "lookahead": 16}),
    ("parallel", {"kv_cache": "window", "kv_window": 8, "block_length": 8}),
    ("parallel", {"selector": "prophet", "block_length": None, "temperature": 0, "top_p": 0.5, "cache": False}),
    ("autoregressive", {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "cache": False}),
    ("autoregressive", {"temperature": 2}),
    ("euler", {"self_cond": False}),
    ("heun", {"self_cond": False}),
    ("churn", {"gamma": 0, "t_lo": 0.5, "t_hi": 0.5, "s_noise": 1, "heun": True, "self_cond": False}),
    ("churn", {"gamma": 5.0, "t_lo": 0, "t_hi": 1}),
    ("flowmap", {"gamma": 1}),
]


@pytest.mark.parametrize(("sampler", "option", "value", "valid"), BAD, ids=lambda v: repr(v)[:24])
def test_a_bad_value_is_refused_naming_the_option_the_value_and_what_is_valid(sampler, option, value, valid) -> None:
    spec = get_sampler(sampler)
    with pytest.raises(ValueError) as err:
        check_knobs(spec, {option: value})
    message = str(err.value)
    assert message.startswith(f"sampler {sampler!r} option {option}={value!r} is ")
    assert valid in message


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_registered_samplers_defaults_pass_and_describe_names_every_option(sampler: str) -> None:
    spec = SAMPLERS[sampler]
    defaults = spec.knob_defaults()
    assert set(defaults) == set(spec.knobs())  # every option has a default
    assert check_knobs(spec, defaults) == defaults and check_knobs(spec, {}) == {}
    assert set(spec.constraints) <= set(spec.knobs())
    lines = spec.describe().splitlines()
    assert lines[0].startswith("steps: an integer")
    for knob in spec.knobs():
        line = next(line for line in lines if line.startswith(f"{knob}="))
        assert repr(defaults[knob]) in line and spec.valid(knob) in line
    assert check_steps(spec, 1) == 1


@pytest.mark.parametrize(("sampler", "knobs"), GOOD, ids=lambda v: str(v)[:40])
def test_good_values_that_are_not_the_defaults_pass(sampler: str, knobs: dict) -> None:
    assert check_knobs(get_sampler(sampler), knobs) == knobs


def test_every_option_is_covered_by_a_bad_and_a_good_case() -> None:
    for name, spec in SAMPLERS.items():
        if name not in {s for s, *_ in BAD}:
            continue  # a sampler registered after these tests were written: covered by the generated tests above
        bad = {option for s, option, *_ in BAD if s == name}
        good = {option for s, knobs in GOOD if s == name for option in knobs}
        assert bad == set(spec.knobs()) == good, name


def test_unknown_options_are_still_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=re.escape("has no option(s) ['temperature']; valid options: ['top_p'")):
        check_knobs(get_sampler("ancestral"), {"temperature": 0.7})


def test_an_integral_float_for_an_integer_option_comes_back_as_an_int() -> None:
    checked = check_knobs(get_sampler("parallel"), {"block_length": 32.0, "tau": 1})
    assert checked == {"block_length": 32, "tau": 1} and type(checked["block_length"]) is int
    assert type(check_knobs(get_sampler("autoregressive"), {"top_k": 4.0})["top_k"]) is int


def test_the_churn_window_must_be_ordered_with_the_defaults_filled_in() -> None:
    spec = get_sampler("churn")
    with pytest.raises(ValueError, match=re.escape("options t_lo=0.8, t_hi=0.2 are not valid: need t_lo <= t_hi")):
        check_knobs(spec, {"t_lo": 0.8, "t_hi": 0.2})
    with pytest.raises(ValueError, match=re.escape("t_lo=0.95, t_hi=0.9")):  # t_hi's default is 0.9
        check_knobs(spec, {"t_lo": 0.95})
    assert "t_lo <= t_hi" in spec.describe()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [0, -3, 2.5, "8", True, None])
def test_bad_steps_are_refused(sampler: str, steps: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"sampler {sampler!r} option steps={steps!r} is ")) as err:
        check_steps(SAMPLERS[sampler], steps)
    assert re.search(rf">= 1|\[1, {MAX_JUMPS}\]", str(err.value))


def test_steps_limits_and_coercion() -> None:
    assert check_steps(get_sampler("euler"), 4096) == 4096 and type(check_steps(get_sampler("euler"), 8.0)) is int
    flowmap = get_sampler("flowmap")
    assert check_steps(flowmap, MAX_JUMPS) == MAX_JUMPS
    with pytest.raises(ValueError, match=re.escape(f"steps={MAX_JUMPS + 1} is out of range: must lie in [1, 32]")):
        check_steps(flowmap, MAX_JUMPS + 1)
    first = flowmap.describe().splitlines()[0]
    assert first == f"steps: an integer in [1, {MAX_JUMPS}] (for more steps use euler or heun)"


@pytest.mark.parametrize("steps", [0, -1])
def test_the_registry_steps_check_agrees_with_the_grids(steps: int) -> None:
    for spec in SAMPLERS.values():
        with pytest.raises(ValueError):
            spec.grid(steps, torch.device("cpu"))
        with pytest.raises(ValueError):
            check_steps(spec, steps)


@pytest.mark.parametrize("preset", group_options("sampler"))
def test_every_sampler_config_passes(preset: str) -> None:
    node = OmegaConf.to_container(load_group("sampler", preset))
    spec = get_sampler(node.pop("name"))
    check_steps(spec, node.pop("steps"))
    assert check_knobs(spec, node) == node


def test_command_line_values_are_checked_as_omegaconf_parses_them() -> None:
    node = OmegaConf.from_dotlist(["top_p=abc", "tau=1", "block_length=null", "cache=true", "selector=bogus"])
    values = {k: node[k] for k in node}
    spec = get_sampler("parallel")
    assert check_knobs(spec, {k: values[k] for k in ("tau", "block_length", "cache")}) == {
        "tau": 1,
        "block_length": None,
        "cache": True,
    }
    with pytest.raises(ValueError, match=re.escape("top_p='abc' is not valid: must be a number in (0, 1]")):
        check_knobs(spec, {"top_p": values["top_p"]})
    with pytest.raises(ValueError, match=re.escape("selector='bogus' is not valid: choose one of")):
        check_knobs(spec, {"selector": values["selector"]})


def test_register_sampler_refuses_constraints_on_options_the_sampler_does_not_take() -> None:
    def sample_toy(objective, x, ts, *, generator=None, callback=None, eta: float = 0.0):  # pragma: no cover
        return x

    with pytest.raises(ValueError, match=re.escape("constrains ['etaa']")):
        register_sampler("toy-options", space="discrete", grid=linear_grid, knobs={"etaa": Range(0, 1)})(sample_toy)
    assert "toy-options" not in SAMPLERS


def test_range_and_its_words() -> None:
    assert Range(0, 1, low_open=True).describe() == "in (0, 1]" and Range(0).describe() == ">= 0"
    assert Range(high=2, high_open=True).describe() == "< 2" and Range().describe() == "finite"
    assert Range(0, 1).problem(0.5) is None and Range(0).problem(math.inf) == "is out of range: must be >= 0"

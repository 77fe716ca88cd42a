"""Out-of-range constructor arguments fail at once with a ValueError naming the argument, its value and the range."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from cdlm.checks import ArgumentError, in_interval, positive_ints
from cdlm.models.backbone import Backbone
from cdlm.objectives.autoregressive import Autoregressive
from cdlm.objectives.bitstream import Bitstream
from cdlm.objectives.embedding_flow import EmbeddingFlow
from cdlm.objectives.entropy_rate import EntropyRateSchedule
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.flow_map import FlowMap
from cdlm.objectives.latent_prior import LatentFlowPrior
from cdlm.objectives.masked import MaskedDiffusion
from cdlm.objectives.masked_distill import MaskedDistill
from cdlm.objectives.schedules import build_schedule
from cdlm.objectives.text_vae import TextVAEObjective
from tests.conftest import tiny_backbone

V = 11
VAE = dict(compression=2, latent_dim=8, vae_width=32, vae_depth=1, vae_heads=2)
SIZES = dict(width=32, depth=2, heads=2, max_len=64, cond_width=16)


def objective(cls: type, **defaults: object) -> Callable[..., object]:
    """A builder of ``cls`` on a tiny backbone with vocabulary ``V`` (both overridable) and ``defaults``."""

    def build(**kwargs: object) -> object:
        args = {"vocab_size": V, **defaults, **kwargs}
        return cls(tiny_backbone(), **args)

    return build


def backbone(**kwargs: object) -> Backbone:
    return Backbone(**{**SIZES, **kwargs})


BUILDERS: dict[str, Callable[..., object]] = {
    "backbone": backbone,
    "masked": objective(MaskedDiffusion),
    "ar": objective(Autoregressive),
    "flow": objective(OneHotFlow),
    "flow_map": objective(FlowMap),
    "langflow": objective(EmbeddingFlow),
    "bitstream": objective(Bitstream),
    "latent_vae": objective(TextVAEObjective, **VAE),
    "latent_prior": objective(LatentFlowPrior, **VAE),
    "distill": objective(MaskedDistill),
    "entropy_rate": EntropyRateSchedule,
    "schedule": build_schedule,
}

CASES = [
    # the backbone: sizes, dropout, mask mode
    ("backbone", {"depth": -1}, r"depth must be an integer >= 1, got -1"),
    ("backbone", {"depth": 0}, r"depth must be an integer >= 1, got 0"),
    ("backbone", {"width": "abc"}, r"width must be an integer >= 1, got 'abc'"),
    ("backbone", {"width": 0}, r"width must be an integer >= 1, got 0"),
    ("backbone", {"heads": 0}, r"heads must be an integer >= 1, got 0"),
    ("backbone", {"width": 30, "heads": 4}, r"width=30 must be divisible by heads=4"),
    ("backbone", {"width": 24, "heads": 8}, r"head width width / heads = 24 / 8 = 3 must be even"),
    ("backbone", {"mlp_ratio": 0}, r"mlp_ratio must be an integer >= 1, got 0"),
    ("backbone", {"mlp_ratio": 1.5}, r"mlp_ratio must be an integer >= 1, got 1.5"),
    ("backbone", {"dropout": 1.0}, r"dropout must be in \[0.0, 1.0\), got 1.0"),
    ("backbone", {"dropout": -0.1}, r"dropout must be in \[0.0, 1.0\), got -0.1"),
    ("backbone", {"dropout": math.nan}, r"dropout must be in \[0.0, 1.0\), got nan"),
    ("backbone", {"max_len": 0}, r"max_len must be an integer >= 1, got 0"),
    ("backbone", {"cond_width": -4}, r"cond_width must be an integer >= 1, got -4"),
    ("backbone", {"mask_mode": "sideways"}, r"mask_mode='sideways' is not one of \('bidirectional'"),
    ("backbone", {"mask_mode": "block_causal", "block_size": 0}, r"block_size must be an integer >= 1, got 0"),
    # masked diffusion and its schedules
    ("masked", {"schedule": "linear"}, r"unknown schedule 'linear'; valid schedules: \['cosine', 'loglinear'\]"),
    ("masked", {"eps": 1.0}, r"eps must be in \[0.0, 1.0\), got 1.0"),
    ("masked", {"eps": -1e-3}, r"eps must be in \[0.0, 1.0\), got -0.001"),
    ("masked", {"t_min": 1.0}, r"t_min must be in \[0.0, 1.0\), got 1.0"),
    ("masked", {"vocab_size": 0}, r"vocab_size must be an integer >= 1, got 0"),
    ("schedule", {"name": "cosine", "eps": 2.0}, r"eps must be in \[0.0, 1.0\), got 2.0"),
    ("ar", {"vocab_size": -1}, r"vocab_size must be an integer >= 1, got -1"),
    # one-hot flow and its flow map
    ("flow", {"t_min": 0.5, "t_max": 0.5}, r"need 0 < t_min < t_max < 1 .*got 0.5, 0.5"),
    ("flow", {"t_max": 1.0}, r"need 0 < t_min < t_max < 1 .*got 1e-05, 1.0"),
    ("flow", {"t_min": 0.0}, r"need 0 < t_min < t_max < 1 .*got 0.0, "),
    ("flow", {"t_min": math.nan}, r"t_min must be a finite number, got nan"),
    ("flow", {"ode_steps": 0}, r"ode_steps must be an integer >= 1, got 0"),
    ("flow", {"soft_cap": -1.0}, r"soft_cap must be positive or None, got -1.0"),
    ("flow", {"vocab_size": 1}, r"vocab_size must be an integer >= 2, got 1"),
    ("flow_map", {"diagonal_fraction": -0.1}, r"diagonal_fraction, boundary_fraction >= 0 .*got -0.1 and"),
    ("flow_map", {"boundary_fraction": 0.6}, r"diagonal_fraction, boundary_fraction >= 0 with a sum <= 1.*0.6"),
    ("flow_map", {"ode_steps": -3}, r"ode_steps must be an integer >= 1, got -3"),
    # embedding flow (LangFlow)
    ("langflow", {"self_condition": 1.5}, r"self_condition is a probability in \[0, 1\], got 1.5"),
    ("langflow", {"scale": 0.0}, r"scale must be a finite number > 0, got 0.0"),
    ("langflow", {"loc": math.inf}, r"loc must be a finite number, got inf"),
    ("langflow", {"embed_dim": 0}, r"embed_dim must be an integer >= 1, got 0"),
    ("langflow", {"ode_steps": 0}, r"ode_steps must be an integer >= 1, got 0"),
    # bitstream and its entropy-rate schedule
    ("bitstream", {"sigma_data": 0.0}, r"sigma_data must be a finite number > 0, got 0.0"),
    ("bitstream", {"clip": -30.0}, r"clip must be a finite number > 0, got -30.0"),
    ("bitstream", {"self_condition": -0.5}, r"self_condition is a probability in \[0, 1\], got -0.5"),
    ("bitstream", {"vocab_size": 1}, r"vocab_size must be an integer >= 2, got 1"),
    ("bitstream", {"schedule": {"binz": 64}}, r"schedule has unknown keys \['binz'\]; valid keys: \['sigma_min'"),
    ("bitstream", {"schedule": {"bins": 1}}, r"need bins >= 2, .*got bins=1"),
    ("bitstream", {"schedule": {"sigma_min": 1.0, "sigma_max": 0.5}}, r"need 0 < sigma_min < sigma_max, got 1.0, 0.5"),
    ("entropy_rate", {"warmup_std": 0.0}, r"warmup_std must be a finite number > 0, got 0.0"),
    ("entropy_rate", {"g_sigma": -0.1}, r"g_sigma must be a finite number > 0, got -0.1"),
    ("entropy_rate", {"g_power": -3.0}, r"g_power must be a finite number >= 0, got -3.0"),
    ("entropy_rate", {"fifo_size": 10}, r"fifo_size >= bins.*got bins=128, fifo_size=10"),
    # latent diffusion
    ("latent_vae", {"compression": 0}, r"compression must be an integer >= 1, got 0"),
    ("latent_vae", {"latent_dim": -8}, r"latent_dim must be an integer >= 1, got -8"),
    ("latent_vae", {"vae_depth": 0}, r"vae_depth must be an integer >= 1, got 0"),
    ("latent_vae", {"vae_width": 30, "vae_heads": 4}, r"vae_width=30 must be divisible by vae_heads=4"),
    ("latent_vae", {"mask_prob": 1.0}, r"need 0 <= mask_prob < 1, .*got 1.0"),
    ("latent_vae", {"beta": -0.01}, r"beta >= 0; got .*-0.01"),
    ("latent_vae", {"t_min": 0.0}, r"need 0 < t_min < t_max < 1 .*got 0.0, 0.999"),
    ("latent_vae", {"align_weight": -1.0}, r"align_weight must be a finite number >= 0, got -1.0"),
    ("latent_prior", {"latent_dim": -8}, r"latent_dim must be an integer >= 1, got -8"),
    ("latent_prior", {"vae_width": 30, "vae_heads": 4}, r"vae_width=30 must be divisible by vae_heads=4"),
    ("latent_prior", {"t_min": 0.0}, r"need 0 < t_min < t_max < 1 .*got 0.0, 0.999"),
    ("latent_prior", {"prior_block": 0}, r"prior_block must be a positive number of latents or null, got 0"),
    ("latent_prior", {"time_std": 0.0}, r"time_std must be a finite number > 0, got 0.0"),
    ("latent_prior", {"ode_steps": 0}, r"ode_steps must be an integer >= 1, got 0"),
    # masked distillation
    ("distill", {"kl_weight": 1.5}, r"kl_weight \(lambda\) must be in \[0, 1\], got 1.5"),
    ("distill", {"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
    ("distill", {"temperature": math.nan}, r"temperature must be > 0, got nan"),
    ("distill", {"student_ratio": (0.9, 0.4)}, r"student_ratio must be \(lo, hi\) with 0 <= lo <= hi <= 1, got \[0.9"),
    ("distill", {"teacher_keep": [0.1, 0.2, 0.3]}, r"teacher_keep must be \(lo, hi\) .*got \[0.1, 0.2, 0.3\]"),
    ("distill", {"teacher_keep": 0.5}, r"teacher_keep must be \(lo, hi\) .*got 0.5"),
    ("distill", {"eps": 2.0}, r"eps must be in \[0.0, 1.0\), got 2.0"),
    ("distill", {"schedule": "geometric"}, r"unknown schedule 'geometric'; valid schedules"),
]


@pytest.mark.parametrize(("target", "kwargs", "match"), CASES, ids=[f"{t}-{'-'.join(k)}" for t, k, _ in CASES])
def test_bad_argument_is_a_value_error_naming_it(target: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        BUILDERS[target](**kwargs)
    names = [key for key, value in kwargs.items() for key in (value if isinstance(value, dict) else [key])]
    assert any(name in str(info.value) for name in names)  # the message names the argument (or the nested key)


@pytest.mark.parametrize(
    ("target", "kwargs"),
    [
        ("backbone", {"dropout": 0.0, "mask_mode": "causal", "block_size": 0}),  # block_size: only for block_causal
        ("backbone", {"mask_mode": "block_causal", "block_size": 4, "mlp_ratio": 1}),
        ("masked", {"eps": 0.0, "t_min": 0.0, "schedule": "cosine"}),
        ("flow", {"soft_cap": 30.0, "vocab_size": 2}),
        ("flow_map", {"diagonal_fraction": 1.0, "boundary_fraction": 0.0}),
        ("langflow", {"loc": -2.0, "embed_dim": 8, "self_condition": 0.0}),
        ("bitstream", {"vocab_size": 2, "schedule": {"bins": 8, "fifo_size": 16, "warmup_batches": 0}}),
        ("distill", {"student_ratio": [0.5, 0.5], "teacher_keep": (0.0, 1.0), "kl_weight": 1.0}),
        ("latent_vae", {"beta": 0.0, "latent_noise": 0.0, "mask_prob": 0.0, "align_weight": 0.0}),
        ("latent_prior", {"prior_block": 2, "time_mean": -1.0}),
    ],
)
def test_edge_values_stay_valid(target: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    assert BUILDERS[target](**kwargs) is not None


def test_argument_error_helpers() -> None:
    assert issubclass(ArgumentError, ValueError)
    positive_ints(a=1, b=2**40)
    with pytest.raises(ArgumentError, match=r"b must be an integer >= 1, got True"):
        positive_ints(a=1, b=True)  # a bool is not a size
    in_interval("p", 1.0, 0.0, 1.0)
    with pytest.raises(ArgumentError, match=r"p must be in \(0, 1\], got 0"):
        in_interval("p", 0, 0, 1, low_open=True)

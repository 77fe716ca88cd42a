"""Shared fixtures: tiny objectives that run in milliseconds."""

from __future__ import annotations

import pytest
import torch

from cdlm.models.backbone import Backbone
from cdlm.objectives.masked import MaskedDiffusion


def tiny_backbone(**kwargs) -> Backbone:
    return Backbone(width=32, depth=2, heads=2, max_len=256, cond_width=16, **kwargs)


@pytest.fixture
def masked_objective() -> MaskedDiffusion:
    torch.manual_seed(0)
    return MaskedDiffusion(tiny_backbone(), vocab_size=11).eval()

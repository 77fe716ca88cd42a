"""Shared fixtures: tiny objectives that run in milliseconds."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from cdlm.models.backbone import Backbone
from cdlm.objectives.masked import MaskedDiffusion

# Tokenizers and token caches of the test session go to a temporary folder (subprocesses inherit it), not ~/.cache.
os.environ.setdefault("CDLM_CACHE", tempfile.mkdtemp(prefix="cdlm-test-cache-"))


def tiny_backbone(**kwargs) -> Backbone:
    return Backbone(width=32, depth=2, heads=2, max_len=256, cond_width=16, **kwargs)


@pytest.fixture
def masked_objective() -> MaskedDiffusion:
    torch.manual_seed(0)
    return MaskedDiffusion(tiny_backbone(), vocab_size=11).eval()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A masked model trained for 8 steps through the real config path; ``(run_dir, module)``, ``final/`` saved."""
    from tests.runs import fit

    run_dir = tmp_path_factory.mktemp("tiny_run")
    module, _, _ = fit(run_dir, "trainer.max_steps=8")
    module.save_pretrained(run_dir / "final")
    return run_dir, module

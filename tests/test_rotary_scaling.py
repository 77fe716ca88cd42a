"""NTK-aware rotary scaling (LongLLaDA; cdlm/models/rotary.py): the lowest frequency is divided by the scale
exactly and the highest kept, so a position ``scale`` times further gets the angle the trained one had; nothing
saved changes; ``sample.py rope_scale=`` samples beyond the trained length and refuses a scale below 1."""

from __future__ import annotations

import json

import pytest
import torch

from cdlm.checks import ArgumentError
from cdlm.models.backbone import Backbone
from cdlm.models.rotary import Rotary


def test_ntk_scaling_keeps_the_fastest_rotation_and_stretches_the_slowest_by_the_scale():
    plain, scaled = Rotary(32, 4096), Rotary(32, 4096, scale=4.0)
    assert scaled.inv_freq[0] == plain.inv_freq[0] == 1.0
    assert float(plain.inv_freq[-1] / scaled.inv_freq[-1]) == pytest.approx(4.0, rel=1e-6)
    cos_p, sin_p = plain(257, torch.device("cpu"))
    cos_s, sin_s = scaled(1025, torch.device("cpu"))
    # the slowest pair: position 1024 scaled = position 256 as trained
    assert float(cos_s[1024, 15]) == pytest.approx(float(cos_p[256, 15]), abs=1e-4)
    assert float(sin_s[1024, 15]) == pytest.approx(float(sin_p[256, 15]), abs=1e-4)
    scaled.rescale(1)
    assert torch.equal(scaled.inv_freq, plain.inv_freq)
    with pytest.raises(ValueError, match="rope_scale must be a number >= 1"):
        scaled.rescale(0.5)
    with pytest.raises(ArgumentError, match="rope_scale"):
        Backbone(width=32, depth=1, heads=2, rope_scale=0.5)
    assert "rotary.inv_freq" not in Backbone(width=32, depth=1, heads=2, rope_scale=2.0).state_dict()


def test_sample_beyond_the_trained_length_with_rope_scale(tiny_run, tmp_path, capsys):
    from cdlm.cli import main
    from tests.runs import refused

    run_dir, module = tiny_run
    seq_len = module.config["data"]["seq_len"]
    out = tmp_path / "long.jsonl"
    final = f"path={run_dir / 'final'}"
    main(["sample", final, f"length={4 * seq_len}", "rope_scale=4", "n=2", "sampler.steps=4", f"out={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(row["ids"]) == 4 * seq_len for row in rows)
    assert "rope_scale must be >= 1" in refused(["sample", final, "rope_scale=0.5"], capsys)
    module.rescale_rotary(2)
    assert all(m.scale == 2 for m in module.modules() if isinstance(m, Rotary))
    module.rescale_rotary(1)

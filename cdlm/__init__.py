"""cdlm: diffusion language models under one Lightning module and one config system.

import cdlm
model = cdlm.load("runs/quickstart/final")        # or a .ckpt file
ids, texts = model.generate(4, 256, sampler="ancestral", steps=128, seed=0)
"""

from cdlm.checkpoint import load
from cdlm.module import DiffusionLM
from cdlm.samplers import SAMPLERS, get_sampler, register_sampler

__all__ = ["SAMPLERS", "DiffusionLM", "get_sampler", "load", "register_sampler"]
__version__ = "0.1.0"

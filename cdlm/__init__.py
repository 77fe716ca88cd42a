"""cdlm: diffusion language models under one Lightning module and one config system.

import cdlm
model = cdlm.load("runs/quickstart/final")        # or a .ckpt file
ids, texts = model.generate(4, 256, sampler="ancestral", steps=128, seed=0)
samples = cdlm.api.sample("runs/quickstart/final", n=4, length=256)   # the commands as typed functions
"""

from cdlm import api
from cdlm.checkpoint import load
from cdlm.module import DiffusionLM
from cdlm.samplers import SAMPLERS, get_sampler, register_sampler
from cdlm.version import __version__

__all__ = ["SAMPLERS", "DiffusionLM", "__version__", "api", "get_sampler", "load", "register_sampler"]

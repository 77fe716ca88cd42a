"""torchmetrics metrics for likelihood and generation quality, and the Gen PPL judges (docs/math.md §8)."""

from cdlm.metrics.generative import DistinctN, GenPPL, UnigramEntropy
from cdlm.metrics.judges import CdlmJudge, HFJudge, Judge, build_judge
from cdlm.metrics.likelihood import LikelihoodMetric
from cdlm.metrics.unigram import UnigramModel, unigram_bound

__all__ = [
    "CdlmJudge",
    "DistinctN",
    "GenPPL",
    "HFJudge",
    "Judge",
    "LikelihoodMetric",
    "UnigramEntropy",
    "UnigramModel",
    "build_judge",
    "unigram_bound",
]

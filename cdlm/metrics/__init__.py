"""torchmetrics metrics for likelihood and generation quality."""

from cdlm.metrics.likelihood import LikelihoodMetric

__all__ = ["LikelihoodMetric"]

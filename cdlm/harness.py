"""cdlm models in EleutherAI's lm-evaluation-harness (docs/evaluation.md, "lm-evaluation-harness").

Importing this module registers the model type ``cdlm`` with lm-eval (``pip install "cdlm[harness]"``);
``python -m cdlm.harness`` is lm-eval's own command line with it registered::

    python -m cdlm.harness --model cdlm --model_args path=runs/quickstart/final,mc_samples=32 \\
        --tasks my_task --include_path my_tasks/

The three request types, on the bounds and samplers the rest of cdlm uses:

- ``loglikelihood(context, continuation)``: minus the model's bound on ``-log p(continuation | context)``, from the
  objective's ``conditional_nll`` with the context's positions fixed (exact for the autoregressive objective; the
  mean of ``mc_samples`` one-sample NELBOs for masked diffusion, docs/math.md §1 "Conditional bound"; the ODE bound
  for a continuous objective trained with ``condition_rate > 0``). ``is_greedy``: whether every continuation token is
  the argmax of the model's prediction there (autoregressive: given the tokens before it; masked: with the whole
  continuation masked, one step); False for the other objectives, which have no single-step prediction. Every
  request's bound draws its noise from ``seed``, so the choices of a question are compared on common noise.
- ``loglikelihood_rolling(text)``: minus the bound of the whole text (no prompt), in consecutive windows of
  ``max_length`` tokens, each bounded on its own (a window does not see the previous one).
- ``generate_until(context, {"until": [...], "max_gen_toks": N})``: ``N`` tokens drawn after the context with the
  run's sampler (or ``sampler=``, ``steps=``), ending at the first EOS, cut before the first ``until`` string.

Contexts that do not fit are cut from the left to leave room for the continuation.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own model types first: its registry reads them only when empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import cdlm
from cdlm.api import sampler_config
from cdlm.config import sampler_knobs
from cdlm.objectives.autoregressive import Autoregressive
from cdlm.options import check_device, resolve_device
from cdlm.types import AbsorbingObjective

log = logging.getLogger(__name__)

DEFAULT_MC_SAMPLES = 16
"""One-sample NELBO draws averaged per request for objectives whose bound is stochastic (masked diffusion)."""
DEFAULT_MAX_GEN_TOKS = 128


@register_model("cdlm")
class CdlmLM(LM):
    """A cdlm checkpoint (``path``: a ``save_pretrained`` folder or ``.ckpt``) as an lm-eval model.

    ``mc_samples``: bound draws averaged per request (masked diffusion); ``max_length``: tokens per window (default:
    the run's ``data.seq_len``); ``sampler`` / ``steps``: generation (default: the run's sampler); ``seed``: the
    draws' seed; ``device``: where the model runs (``auto``: cuda where there is one; lm-eval's default ``cuda`` /
    ``cuda:0`` means ``auto`` on a machine without one, with a warning). lm-eval's ``batch_size`` is accepted and
    not used: requests run one at a time, each request's ``mc_samples`` draws as one batch.
    """

    def __init__(
        self,
        path: str,
        mc_samples: int = DEFAULT_MC_SAMPLES,
        max_length: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        device: str | None = "auto",
        batch_size: Any = None,
        max_batch_size: Any = None,
    ) -> None:
        super().__init__()
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if device in (None, "cuda", "cuda:0") and not torch.cuda.is_available():  # lm-eval's default
            log.warning("cdlm: device %r asked for on a machine without CUDA: running on the CPU", device)
            device = "auto"
        check_device(device)
        self.module = cdlm.load(path, resolve_device(device))
        if self.module.tokenizer is None:
            raise ValueError(f"{path}: lm-eval passes text, and this run has no tokenizer")
        self.tokenizer = self.module.tokenizer
        self.mc_samples = int(mc_samples)
        self.max_length = int(max_length or self.module.config["data"]["seq_len"])
        self.seed = int(seed)
        node = sampler_config(self.module, sampler, None if steps is None else {"steps": int(steps)})
        self.sampling = dict(sampler=node.name, steps=node.steps, **sampler_knobs(node))

    # ---- lm-eval's three request types -----------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            result = self.conditional(self.encode(context), self.encode(continuation))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            ids = self.encode(request.args[0])
            total = 0.0
            for start in range(0, len(ids), self.max_length):
                total += self.conditional([], ids[start : start + self.max_length])[0]
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for index, request in enumerate(requests):
            context, options = request.args
            options = dict(options or {})
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(options.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            budget = max(1, min(budget, self.max_length - 1))
            prompt = self.encode(context)[-(self.max_length - budget) :] if self.max_length > budget else []
            ids, _ = self.module.generate(
                1,
                len(prompt) + budget,
                prompt=[prompt] if prompt else None,
                seed=self.seed + index,
                stop_at_eos=True,
                **self.sampling,
            )
            text = self.module.decode(ids[:, len(prompt) :], stop_at_eos=True)[0]
            for stop in until:
                text = text.split(stop, 1)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    # ---- the bound ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    @torch.no_grad()
    def conditional(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """``(log-likelihood bound, is_greedy)`` of ``continuation`` given ``context`` (token ids; the context cut
        from the left to fit ``max_length``)."""
        if not continuation:
            return 0.0, True
        continuation = continuation[-self.max_length :]
        context = context[len(context) - (self.max_length - len(continuation)) :] if context else []
        ids = torch.tensor([context + continuation], device=self.module.device)  # [1, L]
        fixed = torch.zeros_like(ids, dtype=torch.bool)
        fixed[:, : len(context)] = True
        objective = self.module.objective
        draws = self.mc_samples if isinstance(objective, AbsorbingObjective) else 1  # the others: one pass or ODE
        batch = {
            "input_ids": ids.expand(draws, -1),
            "attention_mask": torch.ones(draws, ids.shape[1], dtype=torch.bool, device=ids.device),
            "u": (torch.arange(draws, dtype=torch.float64, device=ids.device) + 0.5) / draws,  # stratified times
        }
        bound = objective.nll if not context else getattr(objective, "conditional_nll", None)
        if bound is None:
            raise ValueError(
                f"{type(objective).__name__} has no conditional bound yet: loglikelihood needs a masked, "
                "autoregressive or continuous run trained with clean spans (objective.condition_rate > 0)"
            )
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # the same draws for every request: choices compared on common noise
            result = bound(batch) if not context else bound(batch, fixed.expand(draws, -1))
        nll = float(result.nll.double().sum(1).mean())  # nats: the mean over the draws of each draw's bound
        return -nll, self.greedy(ids, fixed)

    def greedy(self, ids: torch.Tensor, fixed: torch.Tensor) -> bool:
        """Whether every free token of ``ids`` ``[1, L]`` is the model's argmax there (see the module docstring)."""
        objective = self.module.objective
        free = ~fixed  # [1, L]
        if isinstance(objective, Autoregressive):
            padding = torch.ones_like(ids, dtype=torch.bool)
            best = objective.logits(ids, padding).argmax(-1)  # [1, L]: position i predicts token i
        elif isinstance(objective, AbsorbingObjective):
            z = torch.where(free, objective.mask_id, ids)
            best = objective.denoise(z, torch.ones(1, device=ids.device)).argmax(-1)  # [1, L]
        else:
            return False
        return bool((best == ids)[free].all())


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (``lm_eval ...``) with the ``cdlm`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()

"""DiffusionLM: the one LightningModule. It holds an objective and knows nothing of which one it is."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from cdlm import checks
from cdlm.ar_runs import load_run_knobs
from cdlm.checkpoint import save_pretrained, tokenizer_state
from cdlm.draws import row_draws
from cdlm.metrics import LikelihoodMetric
from cdlm.models.rotary import Rotary
from cdlm.nonfinite import NonFiniteGuard, NonFiniteLoss  # noqa: F401  (NonFiniteLoss: re-exported)
from cdlm.optim import FUSED_ADAMW, adamw, warmup_cosine
from cdlm.prompt_canvas import canvas, keepable
from cdlm.prompts import (
    Prompt,
    after_eos,
    cut_at_eos,
    given,
    stops,
)
from cdlm.samplers import SamplerSpec, check_knobs, check_steps, get_sampler
from cdlm.samplers.blocks import BlockRunner
from cdlm.samplers.coordinates import initial_state
from cdlm.strategies import is_sharded, shard
from cdlm.types import Batch, BlockwiseObjective


class DiffusionLM(L.LightningModule):
    """Train, validate and sample any cdlm objective.

    Args:
        objective: an ``nn.Module`` with ``loss``, ``nll`` and a sampling view (``cdlm.types``).
        tokenizer: the run's tokenizer (saved with every checkpoint), used by ``generate`` to decode.
        lr, weight_decay, betas: AdamW; no decay on biases, norms and embeddings of rank < 2.
        warmup_steps: linear warm-up; then cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``.
        seed: base of the per-step seeds: the randomness of step ``k`` (times, masks, noise, dropout) is a
            function of ``(seed, k, rank)``, so a resumed run replays the uninterrupted one.
        config: the resolved run config (plain dict), stored in checkpoints so ``cdlm.load`` can rebuild.
    """

    def __init__(
        self,
        objective: torch.nn.Module,
        tokenizer=None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        checks.adamw_settings(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.objective, self.tokenizer, self.config = objective, tokenizer, config or {}
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio, self.seed = warmup_steps, min_lr_ratio, seed
        self.val_metric = LikelihoodMetric()
        self.val_logs: dict[str, MeanMetric] = {}  # the objective's nll logs (e.g. a VAE's reconstruction accuracy)
        self.step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, checked before the update
        self.guard = NonFiniteGuard()  # cdlm/nonfinite.py
        self.sync_free_checks: bool | None = None  # None: the non-finite check reads the device only on CPUs

    # ---- randomness -------------------------------------------------------------------------------------------
    @contextmanager
    def seeded(self, *keys: int):
        """Run the block with the global RNGs seeded from ``(seed, *keys, rank)``, restoring them afterwards."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(hash((self.seed, *keys, self.global_rank)) % 2**62)
            yield

    def global_rows(self, n_local: int, micro: int) -> list[int]:
        """This rank's rows' indices in the step's global batch, ``[n_local]``: rank ``r`` of ``W`` reads every
        ``W``-th row of the one-process batch (``cdlm.data.sampler``, docs/runs.md "Exact resume"), so its row ``i``
        of micro-batch ``m`` is row ``(m n_local + i) W + r`` of the one-process rows of the step."""
        world, rank = (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)
        return [(micro * n_local + i) * world + rank for i in range(n_local)]

    def stratified_u(self, n_local: int, step: int, micro: int) -> torch.Tensor:
        """Low-discrepancy ``u_j = (u + j / n) mod 1`` over the ``n`` rows ``j`` of the global batch; this rank's rows
        (``global_rows``) ``[n_local]``, so a row gets the time it gets in one process."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        n = n_local * self.trainer.world_size * accumulate if self._trainer is not None else n_local
        g = torch.Generator().manual_seed(hash((self.seed, step, 7919)) % 2**62)
        u0 = torch.rand((), generator=g, dtype=torch.float64)
        i = torch.tensor(self.global_rows(n_local, micro), dtype=torch.float64)
        return ((u0 + i / n) % 1.0).float().to(self.device)

    # ---- sharding -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under ``trainer.strategy=fsdp``, shard the objective with FSDP2 (``cdlm.strategies``); else nothing."""
        if is_sharded(self._trainer) and not getattr(self, "sharded", False):
            shard(self.objective, self.device_mesh["data_parallel"])
            self.sharded = True

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        step, micro = self.global_step, batch_idx % self.trainer.accumulate_grad_batches
        rows = batch["input_ids"].shape[0]
        with self.seeded(step, micro), row_draws(self.seed, step, micro, self.global_rows(rows, micro), self.device):
            batch = {**batch, "u": self.stratified_u(rows, step, micro)}
            out = self.objective.loss(batch)
        self.step_losses.append(out.loss.detach())
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop every rank together, before the update, if any rank's loss of this step is not finite.

        The micro-batch losses of all ranks are gathered (one small collective per optimizer step, after the
        gradients' all-reduce), so all ranks raise at the same step and none waits for the others forever.
        """
        losses = self.all_gather(torch.stack(self.step_losses))  # [W, micro] ([micro] with one process)
        self.step_losses = []
        deferred = self.guard.defers(optimizer, self.device, self.sync_free_checks)
        self.guard.check(losses, optimizer, self.global_step, self.trainer.log_every_n_steps, deferred)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        with self.seeded(-1, batch_idx):  # the same noise at every evaluation: comparable numbers
            out = self.objective.nll(batch)
        self.val_metric.update(out.nll, out.mask, batch["n_chars"], out.logs.get("nll_se"))
        for name, value in out.logs.items():
            if name == "nll_se":  # combined across batches by val_metric, in quadrature
                continue
            if name not in self.val_logs:
                self.val_logs[name] = MeanMetric().to(self.device)
            self.val_logs[name].update(value.detach().float(), weight=out.mask.sum())

    def on_validation_epoch_end(self) -> None:
        values = self.val_metric.compute()
        self.log_dict({f"val/{k}": v.float() for k, v in values.items()}, prog_bar=True, sync_dist=False)
        self.val_metric.reset()
        for name, metric in self.val_logs.items():  # token-weighted means over the validation split
            values[name] = metric.compute()
            self.log(f"val/{name}", values[name].float(), sync_dist=False)
            metric.reset()
        if not self.trainer.sanity_checking:
            self.validated_at = {k: float(v) for k, v in values.items()}, self.global_step

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Clip by the global norm here when no gradient is scaled (float32, bf16): Lightning's mixed-precision
        plugin refuses to clip for a fused optimizer (which cdlm uses) even in bf16, where nothing is
        scaled. With a gradient scaler (``16-mixed``) or clipping by value, Lightning clips as usual."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not gradient_clip_val or scaler is not None or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        fused = self.device.type in FUSED_ADAMW and scaler is None  # a scaler unscales before clipping: not fused then
        optimizer = adamw(self.parameters(), self.lr, self.weight_decay, self.betas, fused)
        total = max(self.trainer.max_steps, 1) if self._trainer is not None else 1
        multiplier = lambda s: warmup_cosine(s, self.warmup_steps, total, self.min_lr_ratio)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cdlm"] = {"config": self.config, "tokenizer": tokenizer_state(self.tokenizer)}

    # ---- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        n: int,
        length: int,
        sampler: str = "ancestral",
        steps: int = 128,
        seed: int = 0,
        batch_size: int | None = None,
        dtype: torch.dtype | None = torch.bfloat16,
        callback=None,
        prompt: Prompt | str | list[str] | list[list[int]] | None = None,
        stop_at_eos: bool | None = None,
        template: str | list[str] | None = None,
        suffix: str | list[int] | None = None,
        **knobs,
    ) -> tuple[torch.Tensor, list[str]]:
        """Draw ``n`` sequences of ``length`` tokens; returns ids ``[n, length]`` and decoded texts.

        ``dtype`` is the autocast dtype of the network (None = full precision); categorical draws are float64.
        ``prompt``: tokens every sample keeps (docs/sampling.md, "Prompts"): a text or a list of token ids for every
        row, ``n`` of them (one per row, of any lengths), or a ``cdlm.prompts.Prompt`` of ``[n, length]`` for fixed
        positions anywhere. ``suffix`` (a text or token ids): every row ends with it, the positions between prompt and
        suffix generated. ``template``: an infilling template for every row, or ``n`` of them: text kept exactly with
        ``[MASK:k]`` spans of ``k`` positions to generate (``"KING [MASK:8] of France"``; positions after the
        template are generated too; ``cdlm.prompts.parse_template``). The returned ids hold the prompt's tokens
        exactly at its positions. ``stop_at_eos`` (None: True when the run has a tokenizer): a row ends at its
        first generated EOS; the positions after it hold the tokenizer's padding and the text stops there
        (``cdlm.prompts.cut_at_eos``; ``stops`` says where).
        """
        stop_at_eos = self.tokenizer is not None if stop_at_eos is None else stop_at_eos
        checks.positive_ints(n=n, length=length, **({"batch_size": batch_size} if batch_size is not None else {}))
        spec = get_sampler(sampler, self.objective)
        steps, knobs = check_steps(spec, steps), check_knobs(spec, knobs)
        knobs = load_run_knobs(knobs, self.objective.vocab_size)  # energy= / guide= paths -> models
        prompt = keepable(self.objective, canvas(self.tokens, prompt, template, suffix, n, length), n, length, spec)
        was_training, generator = self.training, torch.Generator(self.device).manual_seed(seed)
        self.eval()
        chunks, batch_size = [], batch_size or n
        ts = spec.grid(steps, self.device)
        stop_id = self.tokenizer.eos_id if stop_at_eos and self.tokenizer is not None else None
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for start in range(0, n, batch_size):
                rows = min(batch_size, n - start)
                x = initial_state(self.objective, spec.space, rows, length, self.device, generator)
                fixed = None if prompt is None else prompt.rows(start, start + rows, self.device)
                chunks.append(self.draw_rows(spec, x, ts, generator, callback, knobs, fixed, stop_id))
        self.train(was_training)
        ids = torch.cat(chunks)
        if stop_at_eos:
            if self.tokenizer is None:
                raise ValueError("stop_at_eos needs the run's tokenizer (its EOS and padding ids)")
            fixed = None if prompt is None else prompt.fixed.to(ids.device)
            ids = cut_at_eos(ids, self.tokenizer.eos_id, self.tokenizer.pad_id, fixed)
        return ids, self.decode(ids, stop_at_eos, None if prompt is None else prompt.fixed)

    def draw_rows(
        self,
        spec: SamplerSpec,
        x: torch.Tensor,
        ts: torch.Tensor,
        generator: torch.Generator,
        callback,
        knobs: dict,
        fixed: Prompt | None,
        stop_id: int | None,
    ) -> torch.Tensor:
        """One chunk of ``generate``: ids ``[rows, L]`` from the starting state ``x`` on the sampler grid ``ts``.

        A blockwise objective samples block by block (``BlockRunner``); otherwise the sampler gets the prompt as
        ``fixed`` where it takes one, else the masked state keeps the prompt's tokens visible; ``stop_id``: the EOS
        id for samplers that stop a row there (the rows after it are padded by ``generate``).
        """
        if isinstance(self.objective, BlockwiseObjective) and self.objective.blockwise:
            return self.objective.sample_blocks(BlockRunner(spec, ts, generator, callback, knobs), x, fixed)
        extra = dict(knobs)
        if fixed is not None and spec.takes_fixed:
            extra["fixed"] = fixed
        elif fixed is not None:  # masked samplers keep the visible tokens of their starting state
            x = fixed.apply(x)
        if stop_id is not None and spec.takes_stop:
            extra["stop_id"] = stop_id
        with given(fixed):  # an objective trained with clean spans reads the prompt clean
            return spec.fn(self.objective, x, ts, generator=generator, callback=callback, **extra)

    def decode(self, ids: torch.Tensor, stop_at_eos: bool = False, fixed: torch.Tensor | None = None) -> list[str]:
        """Texts of ``ids`` ``[n, L]`` (none without a tokenizer); with ``stop_at_eos`` each ends at its first
        generated EOS, save for the prompt's ``fixed`` positions after it (a suffix stays; an EOS at a fixed position
        does not end the row)."""
        if self.tokenizer is None:
            return []
        if not stop_at_eos:
            return [self.tokenizer.decode(row.tolist()) for row in ids]
        keep = ~after_eos(ids, self.tokenizer.eos_id, None if fixed is None else fixed.to(ids.device))  # [n, L]
        return [self.tokenizer.decode(row[k].tolist()) for row, k in zip(ids, keep)]

    def stops(self, ids: torch.Tensor, fixed: torch.Tensor | None = None) -> list[int | None]:
        """Each row's position of its first generated EOS in ``ids`` ``[n, L]`` (None: the row ran to its length, or
        the run has no tokenizer); an EOS at a ``fixed`` prompt position does not count."""
        if self.tokenizer is None:
            return [None] * ids.shape[0]
        return stops(ids, self.tokenizer.eos_id, None if fixed is None else fixed.to(ids.device))

    def rescale_rotary(self, scale: float) -> None:
        """NTK-aware rotary scaling by ``scale`` in every backbone of the model (LongLLaDA: sample ``scale`` times
        the trained length; ``cdlm.models.rotary.ntk_base``); 1 restores the trained positions. Weights unchanged."""
        rotaries = [m for m in self.modules() if isinstance(m, Rotary)]
        for rotary in rotaries:
            rotary.rescale(scale)

    def tokens(self, text: str | list[int]) -> list[int]:
        """Token ids of a text through the run's tokenizer (without EOS), or the ids given."""
        if not isinstance(text, str):
            return [int(t) for t in text]
        if self.tokenizer is None:
            raise ValueError("a text prompt needs the run's tokenizer; pass token ids instead")
        return self.tokenizer.encode(text)

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.yaml``, ``model.safetensors`` and the tokenizer into ``directory`` (``state``: a full state
        dict gathered beforehand from sharded weights)."""
        return save_pretrained(self, directory, state)

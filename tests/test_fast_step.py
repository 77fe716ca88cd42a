"""The training step's fast paths: no read-back from the device, attention without a mask for packed rows, activation
checkpointing and ``torch.compile`` that change nothing but speed and memory, gradient clipping with a fused
optimizer, and the non-finite check that skips a step on the device instead of reading it back (docs/runs.md)."""

import traceback
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cdlm.config import compose, instantiate
from cdlm.models.backbone import Backbone, all_real, dense_padding
from tests.runs import TINY

# aten ops that make the host wait for an accelerator: a scalar read (.item(), bool(), int()), and ops whose output
# shape depends on the values (boolean indexing goes through nonzero)
READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::item"}
HOST_SIDE = ("cdlm/draws.py",)  # draws from the CPU generator: no device is read


class DeviceReads(TorchDispatchMode):
    """Records the ops that would read an accelerator back, with the cdlm lines that called them."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, list[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        boolean_index = name.startswith("aten::index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else None) or []
        )
        if name in READS or boolean_index:
            where = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "/cdlm/" in f.filename]
            if not any(h in w for w in where for h in HOST_SIDE):
                self.reads.append((name, where[-3:]))
        return func(*args, **(kwargs or {}))


def tiny_objective(name: str) -> torch.nn.Module:
    cfg = compose([*TINY, f"objective={name}"])
    return instantiate(cfg.objective, "objective", backbone=instantiate(cfg.model, "model"), vocab_size=64)


def packed_batch(rows: int = 2, length: int = 32) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": dense_padding(ids.shape, ids.device), "u": torch.rand(rows)}


def test_the_read_detector_sees_scalar_reads_and_boolean_indexing():
    x = torch.randn(4)
    with DeviceReads() as seen:
        x.sum().item()
        x[x > 0]
    assert [name for name, _ in seen.reads][:1] == ["aten::_local_scalar_dense"] and len(seen.reads) >= 2


@pytest.mark.parametrize("name", ["masked", "flow", "langflow", "bitstream", "autoregressive"])
def test_a_training_step_reads_nothing_back_from_the_device(name, monkeypatch):
    """Forward and backward of the objective's training loss on a packed batch as on an accelerator: static shapes,
    no scalar read (the self-conditioning coin comes from the CPU generator)."""
    import cdlm.objectives.masked

    monkeypatch.setattr(cdlm.objectives.masked, "host_resident", lambda tensor: False)
    objective = tiny_objective(name).train()
    torch.manual_seed(0)
    with DeviceReads() as seen:
        objective.loss(packed_batch()).loss.backward()
    assert seen.reads == []


def test_the_masked_loss_in_host_memory_takes_the_head_on_masked_rows_only_with_the_same_losses(monkeypatch):
    """The CPU path (the head on the masked rows, gathered) and the accelerator path (the head everywhere, times the
    mask) give the same per-token NELBO terms and the same gradients."""
    import cdlm.objectives.masked

    objective = tiny_objective("masked").train()
    batch = packed_batch(rows=3)
    results = []
    for resident in (True, False):
        monkeypatch.setattr(cdlm.objectives.masked, "host_resident", lambda tensor, r=resident: r)
        objective.zero_grad()
        torch.manual_seed(1)
        out = objective.loss(batch)
        out.loss.backward()
        results.append((out.nll.detach(), objective.head.weight.grad.clone()))
    (gathered, grad_gathered), (static, grad_static) = results
    assert (gathered > 0).any() and (gathered == 0).any()
    torch.testing.assert_close(gathered, static, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_gathered, grad_static, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_packed_rows_attend_without_a_mask(monkeypatch, kernel):
    import cdlm.models.attend as attend_module

    masks = []
    owner, name = (
        (attend_module, "matmul_attention") if kernel == "matmul" else (attend_module.F, "scaled_dot_product_attention")
    )
    kernel_fn = getattr(owner, name)

    def record(*args, **kwargs):  # the mask is the fourth argument of matmul_attention, attn_mask= of SDPA
        masks.append(args[3] if kernel == "matmul" else kwargs["attn_mask"])
        return kernel_fn(*args, **kwargs)

    monkeypatch.setattr(owner, name, record)
    backbone = Backbone(width=32, depth=1, heads=2, max_len=64, attention=kernel).eval()
    h = torch.randn(2, 8, 32)
    padded = torch.ones(2, 8, dtype=torch.bool)
    padded[1, 6:] = False
    dense = dense_padding((2, 8), torch.device("cpu"))
    out = {key: backbone(h, None, padding) for key, padding in (("none", None), ("dense", dense))}
    backbone(h, None, padded)
    assert masks[:2] == [None, None] and masks[2] is not None
    assert torch.equal(out["none"], out["dense"])
    assert all_real(dense_padding((3, 5), "cpu")) and all_real(torch.ones(2, 3, dtype=torch.bool))
    assert not all_real(padded)


def test_the_data_module_hands_packed_batches_over_with_a_broadcast_mask():
    from cdlm.data.datamodule import TextDataModule

    dm = TextDataModule.__new__(TextDataModule)
    packed = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.bool)}
    moved = dm.on_after_batch_transfer(dm.on_before_batch_transfer(packed, 0), 0)
    assert set(moved) == {"input_ids", "attention_mask"} and moved["attention_mask"].stride() == (0, 0)
    assert bool(moved["attention_mask"].all())
    padded = {**packed, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)}
    kept = dm.on_after_batch_transfer(dm.on_before_batch_transfer(padded, 0), 0)
    assert torch.equal(kept["attention_mask"], padded["attention_mask"]) and "packed" not in kept


def gradients(backbone: Backbone, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    backbone.zero_grad()
    out = backbone(h, c)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in backbone.parameters()]


def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = Backbone(width=32, depth=2, heads=2, max_len=64, cond_width=16).train()
    checkpointed = Backbone(width=32, depth=2, heads=2, max_len=64, cond_width=16, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    for module in (plain, checkpointed):  # adaLN starts at zero: give the modulation something to do
        torch.manual_seed(1)
        for p in module.parameters():
            p.data.add_(0.02 * torch.randn_like(p))
    h, c = torch.randn(2, 8, 32), torch.randn(2, 16)
    a, b = gradients(plain, h, c), gradients(checkpointed.train(), h, c)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_a_compiled_backbone_matches_the_eager_one_with_the_same_weight_names():
    torch.manual_seed(0)
    eager = Backbone(width=32, depth=2, heads=2, max_len=64, cond_width=16).train()
    compiled = Backbone(width=32, depth=2, heads=2, max_len=64, cond_width=16, compile=True).train()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    h, c = torch.randn(2, 8, 32), torch.randn(2, 16)
    a, b = gradients(eager, h, c), gradients(compiled, h, c)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_gradient_clipping_works_with_a_fused_optimizer_under_bf16_mixed(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for fused optimizers (cdlm's AdamW is fused on CPUs and
    GPUs); DiffusionLM clips itself."""
    from tests.runs import fit

    module, trainer, _ = fit(tmp_path, "trainer.precision=bf16-mixed", "trainer.max_steps=2", "ema=null")
    assert trainer.global_step == 2 and trainer.optimizers[0].defaults["fused"]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_the_device_side_check_skips_a_non_finite_step_and_stops_at_the_next_log(tmp_path, monkeypatch):
    """A fused optimizer skips the update of a non-finite step on the device (``found_inf``); the run stops at the
    next logging step naming the step, and the weights stay finite."""
    import lightning as L

    from cdlm.config import compose
    from cdlm.module import NonFiniteLoss
    from cdlm.training import prepare

    run = prepare(compose([*TINY, f"run_dir={tmp_path}", "trainer.log_every_n_steps=4", "ema=null"]))
    run.module.sync_free_checks = True
    objective_loss = run.module.objective.loss

    class NaNAtStep5(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.objective.loss = objective_loss
            if trainer.global_step == 5:
                pl_module.objective.loss = lambda b: (lambda out: replace(out, loss=out.loss * float("nan")))(
                    objective_loss(b)
                )

    run.trainer.callbacks.append(NaNAtStep5())
    with pytest.raises(NonFiniteLoss, match=r"at step 5 .*its update was skipped and training stopped at step 7"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert all(torch.isfinite(p).all() for p in run.module.parameters())
    state = run.trainer.optimizers[0].state
    assert {int(s["step"]) for s in state.values()} == {6}  # steps 0-6 less the skipped 5 (7 raised before its update)


def test_the_compiled_gelu_form_is_the_tanh_gelu_and_is_what_a_compiled_block_runs():
    import torch.nn.functional as F

    from cdlm.models.activations import GeluTanh, gelu_tanh_sigmoid

    x = torch.linspace(-12, 12, 100_001, dtype=torch.float64).float()
    torch.testing.assert_close(gelu_tanh_sigmoid(x), F.gelu(x, approximate="tanh"), rtol=0, atol=2e-6)
    assert gelu_tanh_sigmoid(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(GeluTanh()(x), F.gelu(x, approximate="tanh"))  # eager: the fused kernel itself
    seen = []
    compiled = torch.compile(lambda t: GeluTanh()(t), backend=lambda gm, _: seen.append(str(gm.code)) or gm)
    compiled(x)
    assert "sigmoid" in seen[0] and "gelu" not in seen[0]

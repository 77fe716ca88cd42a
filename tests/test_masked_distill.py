"""CD4LM consistency distillation of a masked checkpoint: nested masks, the loss, the frozen teacher, checkpoints."""

import math
import shutil

import pytest
import torch

import cdlm
from cdlm.checkpoint import build_module, load_frozen
from cdlm.config import ConfigError, compose, instantiate, to_dict
from cdlm.objectives.flow import OneHotFlow
from cdlm.objectives.masked import MaskedDiffusion
from cdlm.objectives.masked_distill import MaskedDistill, nested_masks
from cdlm.samplers import get_sampler
from cdlm.types import DiscreteObjective
from tests.runs import TINY, LossRecorder, fit


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """An (untrained) masked model of the tiny test config saved with ``save_pretrained``."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = compose([*TINY, f"run_dir={run_dir}"])
    tokenizer = instantiate(cfg.data).prepare_tokenizer()
    torch.manual_seed(0)
    module = build_module(to_dict(cfg), tokenizer)
    return module.save_pretrained(run_dir / "final")


def distill(teacher_dir, **kwargs) -> MaskedDistill:
    """A student of the tiny config's shape distilling from ``teacher_dir``."""
    cfg = compose(TINY)
    teacher = load_frozen(teacher_dir, (MaskedDiffusion,), "objective.teacher")
    return MaskedDistill(
        instantiate(cfg.model), teacher.vocab_size, teacher=str(teacher_dir), teacher_model=teacher, **kwargs
    )


def batch_of(vocab_size: int, rows: int = 4, length: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (rows, length), generator=g)
    padding = torch.ones_like(x, dtype=torch.bool)
    padding[1, 30:] = False
    u = (torch.arange(rows) + 0.5) / rows
    return {"input_ids": x, "attention_mask": padding, "u": u}


@torch.no_grad()
def test_student_starts_as_the_teacher(teacher_dir):
    student, teacher = distill(teacher_dir), cdlm.load(teacher_dir).objective
    z = torch.randint(0, teacher.vocab_size, (2, 24))
    z[:, ::3] = teacher.mask_id
    t = torch.tensor([0.3, 0.8])
    torch.testing.assert_close(student.denoise(z, t), teacher.denoise(z, t))
    assert isinstance(student, DiscreteObjective) and student.mask_id == teacher.mask_id
    for name in ("ancestral", "parallel"):  # the samplers see the teacher's model through the student's view
        spec = get_sampler(name, student)
        ts = spec.grid(4, torch.device("cpu"))
        draws = [
            spec.fn(o, o.prior(2, 16, z.device), ts, generator=torch.Generator().manual_seed(0))
            for o in (student, teacher)
        ]
        assert torch.equal(*draws)


def test_nested_masks_are_nested_with_the_drawn_ratios():
    torch.manual_seed(0)
    rows = 512
    padding = torch.zeros(rows, 100, dtype=torch.bool)
    n_valid = torch.tensor([100, 50, 20, 10]).repeat(rows // 4)  # multiples of 10: r n is exact at 0.4 and 0.9
    padding[torch.arange(100) < n_valid[:, None]] = True
    ratio, keep = torch.empty(rows).uniform_(0.4, 0.9), torch.empty(rows).uniform_(0.3, 0.7)
    student, teacher = nested_masks(padding, ratio, keep)
    assert not (teacher & ~student).any() and not (student & ~padding).any()  # teacher ⊆ student ⊆ valid
    n_student, n_teacher = student.sum(-1), teacher.sum(-1)
    achieved = n_student / n_valid
    assert achieved.min() >= 0.4 and achieved.max() <= 0.9
    assert torch.equal(n_student, torch.round(ratio * n_valid).long())
    assert torch.equal(n_teacher, torch.floor(keep * n_student).long()) and (n_teacher < n_student).all()
    assert student[:, :10].float().mean().item() == pytest.approx(0.65, abs=0.05)  # positions drawn uniformly


def test_loss_is_the_ce_term_when_the_teacher_sees_the_student_state(teacher_dir):
    same = distill(teacher_dir, teacher_keep=(1.0, 1.0), kl_weight=0.3)  # teacher masks = student masks
    batch = batch_of(same.vocab_size)
    torch.manual_seed(1)
    out = same.loss(batch)
    assert out.logs["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.7 * out.logs["ce"].item(), rel=1e-5)
    ratio = out.logs["student_ratio"].item()
    assert 0.4 <= ratio <= 0.9 and out.logs["teacher_ratio"].item() == pytest.approx(ratio)
    torch.manual_seed(1)
    nested = distill(teacher_dir, kl_weight=0.3).loss(batch)  # the teacher sees more: a non-zero target
    assert nested.logs["kl"].item() > 1e-4 and nested.logs["teacher_ratio"] < nested.logs["student_ratio"]


def test_gradients_reach_the_student_only(teacher_dir):
    obj = distill(teacher_dir)
    teacher = obj.teacher.objective
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(k.startswith("student.") for k in obj.state_dict())  # the teacher is never saved
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in obj.parameters()}
    optimizer = torch.optim.AdamW(obj.parameters(), lr=1e-2)
    start = obj.student.head.weight.detach().clone()
    obj.loss(batch_of(obj.vocab_size)).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in obj.student.head.parameters())
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(obj.student.head.weight, start)


def test_padding_is_ignored(teacher_dir):
    obj = distill(teacher_dir)
    batch = batch_of(obj.vocab_size)
    torch.manual_seed(2)
    out = obj.loss(batch)
    assert not (out.mask & ~batch["attention_mask"]).any() and (out.nll[1, 30:] == 0).all()
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 30:] = (other["input_ids"][1, 30:] + 1) % obj.vocab_size  # change only padded tokens
    torch.manual_seed(2)
    torch.testing.assert_close(obj.loss(other).loss, out.loss)


def test_missing_teacher_and_mismatched_student_are_clear(teacher_dir, tmp_path):
    cfg = compose(TINY)
    orphan = MaskedDistill(instantiate(cfg.model), 11, teacher=str(tmp_path / "gone"))  # as cdlm.load builds it ...
    with pytest.raises(ConfigError, match="no teacher"):
        orphan.loss(batch_of(11))  # ... it cannot train
    with pytest.raises(ConfigError, match=r"objective.teacher .*there is no run at .*gone"):
        load_frozen(tmp_path / "gone", (MaskedDiffusion,), "objective.teacher (a masked run)")
    with pytest.raises(ConfigError, match="holds a MaskedDiffusion run, not a OneHotFlow run"):
        load_frozen(teacher_dir, (OneHotFlow,), "objective.teacher")
    teacher = load_frozen(teacher_dir, (MaskedDiffusion,), "objective.teacher")
    wide = compose([*TINY, "model.width=32"])
    with pytest.raises(ConfigError, match="model group"):
        MaskedDistill(instantiate(wide.model), teacher.vocab_size, teacher=str(teacher_dir), teacher_model=teacher)


def test_a_missing_teacher_fails_when_the_run_is_built(tmp_path):
    """Building the run to train loads the teacher: a missing path (or none) is a ConfigError before any work."""
    for value in (str(tmp_path / "gone"), "null"):
        cfg = compose([*TINY, "objective=masked_distill", f"objective.teacher={value}"])
        tokenizer = instantiate(cfg.data).prepare_tokenizer()
        with pytest.raises(ConfigError, match=r"objective.teacher \(the masked run to distil"):
            build_module(to_dict(cfg), tokenizer)


def test_distillation_run_then_the_student_loads_and_samples_without_the_teacher(teacher_dir, tmp_path):
    teacher = shutil.copytree(teacher_dir, tmp_path / "teacher")
    recorder = LossRecorder()
    overrides = ("objective=masked_distill", f"objective.teacher={teacher}", "module.lr=1e-2")  # 12 steps
    module, _, _ = fit(tmp_path / "run", *overrides, callbacks=(recorder,))
    losses = [recorder.losses[s] for s in sorted(recorder.losses)]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    final = module.save_pretrained(tmp_path / "run" / "final")
    assert cdlm.load(final).objective.teacher is None  # cdlm.load never reads the teacher, even where it exists
    shutil.rmtree(teacher)
    for path in (final, tmp_path / "run" / "checkpoints" / "last.ckpt"):
        student = cdlm.load(path)
        assert isinstance(student.objective, MaskedDistill) and student.objective.teacher is None
        for sampler in ("ancestral", "parallel"):
            ids, texts = student.generate(2, 24, sampler=sampler, steps=4, seed=0)
            assert ids.shape == (2, 24) and len(texts) == 2
            assert ((ids >= 0) & (ids < student.objective.vocab_size)).all()  # no [MASK] left
    saved = cdlm.load(final).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


def test_experiment_config():
    cfg = compose(["experiment=masked_distill"])
    assert cfg.objective._target_ == "cdlm.objectives.masked_distill.MaskedDistill"
    assert cfg.objective.teacher == "runs/quickstart/final" and cfg.choices.model == "mini"
    assert cfg.sampler.name == "parallel" and cfg.sampler.steps == 8
    assert 200 <= cfg.trainer.max_steps <= 300

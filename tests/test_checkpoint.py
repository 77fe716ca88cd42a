"""save_pretrained / load round trips, weights-only loading, and clear errors for bad checkpoints."""

import pickle
import shutil

import pytest
import torch
import yaml

import cdlm
from cdlm.checkpoint import CheckpointError
from cdlm.rundir import RunDirError, plan


@pytest.fixture
def trained(tiny_run):
    return tiny_run


def generate(model):
    return model.generate(2, 24, "ancestral", steps=8, seed=3)


def test_save_pretrained_round_trip(trained):
    run_dir, module = trained
    loaded = cdlm.load(run_dir / "final")
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.cpu())
    assert loaded.tokenizer.encode("To be, or not") == module.tokenizer.encode("To be, or not")
    ids_a, texts_a = generate(module)
    ids_b, texts_b = generate(loaded)
    assert torch.equal(ids_a, ids_b) and texts_a == texts_b and len(texts_a[0]) > 0


def test_load_lightning_checkpoint_with_tokenizer(trained):
    run_dir, module = trained
    loaded = cdlm.load(run_dir / "checkpoints" / "last.ckpt")
    assert loaded.tokenizer.vocab_size == module.tokenizer.vocab_size
    assert type(loaded.objective) is type(module.objective)


def test_trained_steps_reads_the_checkpoint_step_and_the_final_folder_budget(trained, tmp_path):
    from cdlm.checkpoint import trained_steps

    run_dir, _ = trained
    assert trained_steps(run_dir / "checkpoints" / "epoch=0-step=8.ckpt") == 8
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**ckpt, "global_step": 4}, tmp_path / "early.ckpt")  # as a run's step-4 checkpoint holds
    assert trained_steps(tmp_path / "early.ckpt") == 4
    assert trained_steps(run_dir / "final") == 8  # the run's trainer.max_steps


def test_corrupt_checkpoint_is_refused(trained, tmp_path):
    run_dir, _ = trained
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        cdlm.load(bad)
    folder = tmp_path / "bad_folder"
    shutil.copytree(run_dir / "final", folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        cdlm.load(folder)


def test_mismatched_checkpoint_is_refused(trained, tmp_path):
    run_dir, _ = trained
    folder = tmp_path / "mismatch"
    shutil.copytree(run_dir / "final", folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model"]["width"] = 96
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="does not match its config"):
        cdlm.load(folder)


class Exploit:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickle_payload_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Exploit(), "cdlm": {}}))
    with pytest.raises(CheckpointError):
        cdlm.load(path)
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        cdlm.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a save_pretrained folder"):
        cdlm.load(tmp_path)
    with pytest.raises(RunDirError, match="no such checkpoint file"):
        plan(tmp_path, str(tmp_path / "x.ckpt"), overwrite=False)
    assert plan(tmp_path, "auto", overwrite=False).ckpt is None

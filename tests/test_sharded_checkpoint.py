"""Sharded checkpoints (cdlm/sharded_checkpoint.py) are read as data: what torch.distributed.checkpoint wrote reads
back whole in one process, and a directory whose metadata would run code or name a file outside it is refused."""

import pickle
import warnings

import pytest
import torch

from cdlm.sharded_checkpoint import (
    METADATA_FILE,
    ShardedCheckpointError,
    is_sharded_checkpoint,
    read_metadata,
    read_sharded_ckpt,
)


def write_sharded(directory, state_dict, optimizer_state=None):
    """A directory as Lightning's sharded save writes it (one writer): shards, ``.metadata``, ``meta.pt``."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": state_dict}
    if optimizer_state is not None:
        state["optimizer_0"] = optimizer_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save({"global_step": 7, "cdlm": {"config": {}, "tokenizer": {}}}, directory / "meta.pt")


def test_a_sharded_checkpoint_reads_back_whole_with_its_lightning_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    write_sharded(tmp_path, model.state_dict(), optimizer.state_dict())
    assert is_sharded_checkpoint(tmp_path) and not is_sharded_checkpoint(tmp_path / "meta.pt")
    ckpt = read_sharded_ckpt(tmp_path)
    assert ckpt["global_step"] == 7 and ckpt["state_dict"].keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][name], value), name


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('ran code')",))


def test_metadata_that_would_run_code_is_refused_before_anything_runs(tmp_path):
    write_sharded(tmp_path, {"w": torch.ones(2)})
    (tmp_path / METADATA_FILE).write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ShardedCheckpointError, match=r"builtins\.exec is not a class a checkpoint's metadata may hold"):
        read_sharded_ckpt(tmp_path)


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/passwd", ".hidden", "missing.distcp"])
def test_metadata_naming_a_file_outside_the_directory_or_missing_is_refused(tmp_path, name):
    write_sharded(tmp_path, {"w": torch.ones(2)})
    metadata = read_metadata(tmp_path)
    for info in metadata.storage_data.values():
        info.relative_path = name
    (tmp_path / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(ShardedCheckpointError, match="must be a plain file name inside"):
        read_sharded_ckpt(tmp_path)


def test_a_non_tensor_entry_holding_an_object_is_refused(tmp_path):
    """Optimizer hyper-parameters travel as pickled bytes; they are read weights-only."""
    write_sharded(tmp_path, {"w": torch.ones(2)}, {"param_groups": [{"lr": Boom()}], "state": {}})
    from cdlm.sharded_checkpoint import dcp_load

    with pytest.raises(ShardedCheckpointError, match="holds Python objects beyond tensors and plain containers"):
        dcp_load({"optimizer_0": {"param_groups": [{"lr": 0.0}], "state": {}}}, tmp_path, no_dist=True)

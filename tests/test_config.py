"""Config composition, validation and safe instantiation."""

import pytest
from omegaconf import OmegaConf

from cdlm.config import ConfigError, compose, instantiate, locate


def test_defaults_and_experiment_compose():
    cfg = compose([])
    assert cfg.objective._target_.endswith("MaskedDiffusion") and cfg.choices.model == "small-cpu"
    quick = compose(["experiment=quickstart"])
    assert quick.choices.data == "shakespeare_bpe" and quick.run_dir == "runs/quickstart"


def test_group_choice_and_dotlist_override():
    cfg = compose(["model=tiny", "model.depth=3", "trainer.max_steps=7", "objective.schedule=cosine"])
    assert cfg.model.width == 64 and cfg.model.depth == 3 and cfg.trainer.max_steps == 7
    assert cfg.objective.schedule == "cosine"


def test_constructor_parameter_not_in_yaml_is_accepted():
    cfg = compose(["model.dropout=0.1", "trainer.accumulate_grad_batches=2"])
    assert cfg.model.dropout == 0.1 and cfg.trainer.accumulate_grad_batches == 2


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.dept=3", "valid keys under model"),
        ("trainer.max_stepz=3", "valid keys under trainer"),
        ("learning_rate=3", "valid keys under the top level"),
        ("sampler.temprature=0.5", "valid keys under sampler"),
        ("model=enormous", "available"),
        ("experiment=nope", "available"),
        ("depth", "key=value"),
    ],
)
def test_bad_overrides_fail_listing_valid_choices(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        compose([override])


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.run", "torch.load", "torch.hub.load"])
def test_instantiation_refuses_targets_outside_allowlist(target):
    with pytest.raises(ConfigError, match="not"):
        instantiate(OmegaConf.create({"_target_": target, "command": "echo pwned"}))


def test_instantiate_builds_allowed_target_and_rejects_unknown_argument():
    backbone = instantiate(compose(["model=tiny"]).model)
    assert backbone.depth == 2
    with pytest.raises(ConfigError, match="takes no argument"):
        instantiate({"_target_": "cdlm.models.backbone.Backbone", "widht": 3})
    assert locate("lightning.pytorch.callbacks.ModelCheckpoint").__name__ == "ModelCheckpoint"
    with pytest.raises(ConfigError, match="not allowed"):
        locate("torch.nn.Linear")  # a class, but not one a config may name


def test_sampler_presets_extend_their_base_and_a_bad_defaults_is_refused(tmp_path):
    """A preset states only what it changes (``defaults: parallel``); the rest comes from the base file."""
    from cdlm.config import load_group

    prophet, parallel = load_group("sampler", "prophet"), load_group("sampler", "parallel")
    assert "defaults" not in prophet and prophet.selector == "prophet"
    assert {k: v for k, v in prophet.items() if k != "selector"} == {
        k: v for k, v in parallel.items() if k != "selector"
    }
    assert load_group("sampler", "remdm").remask_eta == 0.02 and load_group("sampler", "remdm").name == "ancestral"

    (tmp_path / "sampler").mkdir()
    (tmp_path / "sampler" / "a.yaml").write_text("defaults: b\nname: euler\n")
    (tmp_path / "sampler" / "b.yaml").write_text("defaults: a\nsteps: 4\n")
    (tmp_path / "sampler" / "c.yaml").write_text("defaults: ../x\n")
    for name in ("a", "c"):
        with pytest.raises(ConfigError, match="must name another sampler config"):
            load_group("sampler", name, tmp_path)

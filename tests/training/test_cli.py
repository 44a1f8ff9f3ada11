"""train.py's front end (radd_fast/training/cli.py): the model presets as Hydra options, the arguments each rank gets."""
import dataclasses

import pytest
from hydra import compose, initialize_config_dir

from radd_fast.config import PRESETS, ConfigError
from radd_fast.training import cli as train_cli


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_group_options_are_the_presets_on_the_auto_backend(name):
    with initialize_config_dir(version_base=None, config_dir=str(train_cli.CONFIG_DIR)):
        cfg = compose(config_name=train_cli.CONFIG_NAME, overrides=[f"model={name}"])
    assert dict(cfg.model) == {**dataclasses.asdict(PRESETS[name]), "backend": "auto"}


def test_presets_are_written_once():
    """No YAML copy of a preset beside radd_fast.PRESETS (two copies drifted apart once)."""
    assert not (train_cli.CONFIG_DIR / "model").exists()


def test_an_unknown_preset_lists_the_presets():
    with initialize_config_dir(version_base=None, config_dir=str(train_cli.CONFIG_DIR)):
        with pytest.raises(Exception, match="(?s)Could not find 'model/huge'.*medium.*small.*tiny"):
            compose(config_name=train_cli.CONFIG_NAME, overrides=["model=huge"])


# -- the arguments each rank gets, and the override pre-check -------------------------------------------------------
def test_train_cli_arguments_per_rank():
    """Ranks > 0 add Hydra's own quiet overrides (no .hydra, no run folder of their own); the
    pre-check sees only the key=value overrides, not Hydra's flags or their values."""
    argv = ["model=tiny", "--cfg", "job", "optim.lr=1e-3"]
    assert train_cli.hydra_arguments(argv, 0) == argv
    assert train_cli.hydra_arguments(argv, 3) == [*argv, "hydra.output_subdir=null", "hydra.run.dir=."]
    assert train_cli.task_overrides(argv) == ["model=tiny", "optim.lr=1e-3"]
    with pytest.raises(ConfigError, match="Could not find 'model/huge'; Available options in 'model': medium"):
        train_cli.check_overrides(["model=huge"])

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


# -- a refused run leaves no folder ---------------------------------------------------------------------------------
def test_the_run_folder_is_pinned_for_hydra_quoted_for_its_grammar(tmp_path):
    """Hydra is told the folder resolved before it starts (its ${now:...} resolved once), replacing the
    user's, in quotes: a comma, a space or a quote in the path stays one path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    folder = tmp_path / "a b,c" / "it's"
    argv = train_cli.pin_run_dir(["model=tiny", "hydra.run.dir=elsewhere", "optim.lr=1e-3"], folder)
    assert argv[:2] == ["model=tiny", "optim.lr=1e-3"] and argv[2].startswith("hydra.run.dir='")
    assert OverridesParser.create().parse_override(argv[2]).value() == str(folder)


def test_first_missing_folder_is_the_outermost_one_a_run_creates(tmp_path):
    assert train_cli.first_missing_folder(tmp_path) is None
    assert train_cli.first_missing_folder(tmp_path / "a" / "b" / "c") == tmp_path / "a"
    (tmp_path / "a").mkdir()
    assert train_cli.first_missing_folder(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b"


def test_only_a_run_that_saved_nothing_is_removed(tmp_path):
    """The folder goes when it holds only what is written before the first step (.hydra, an empty log,
    the lock); a run that logged a step or saved a checkpoint keeps it (its error says how to resume)."""
    made = tmp_path / "date"
    run = made / "time"
    (run / ".hydra").mkdir(parents=True)
    (run / "logs").write_text("")
    train_cli.remove_if_unstarted(made, run)
    assert not made.exists()
    for kept in ("metrics.jsonl", "checkpoints-meta"):
        (run / ".hydra").mkdir(parents=True, exist_ok=True)
        (run / kept).mkdir() if kept.startswith("checkpoints") else (run / kept).write_text("{}\n")
        train_cli.remove_if_unstarted(made, run)
        assert (run / kept).exists()

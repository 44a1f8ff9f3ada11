"""RunConfig (radd_fast/training/config.py): a bad number is refused naming its key; the shipped defaults pass."""
import math

import pytest

from radd_fast.config import ConfigError
from radd_fast.training.config import RunConfig
from tests.support.runs import tiny_config


@pytest.mark.parametrize("section,key,value,message", [
    ("optim", "lr", math.nan, "optim.lr must be finite"),
    ("optim", "lr", math.inf, "optim.lr must be finite"),
    ("optim", "lr", -1e-3, "optim.lr must be in (0"),
    ("optim", "lr", "fast", "optim.lr must be a number"),
    ("optim", "beta2", 1.0, "optim.beta2 must be in [0"),
    ("optim", "eps", 0.0, "optim.eps must be in (0"),
    ("optim", "weight_decay", -0.1, "optim.weight_decay"),
    ("optim", "grad_clip", math.nan, "optim.grad_clip must be finite"),
    ("training", "ema", 1.5, "training.ema must be in [0"),
    ("training", "batch_size", 2.5, "training.batch_size must be a whole number"),
    ("training", "n_iters", -1, "training.n_iters must be in [0"),
    ("training", "sampling_eps", 0.0, "training.sampling_eps"),
    ("sampling", "steps", 0, "sampling.steps"),
    ("sampling", "predictor", "ddim", "unknown sampling method 'ddim'"),
    ("sampling", "strategy", "beam", "unknown sampling strategy 'beam'"),
    ("eval", "batch_size", 0, "eval.batch_size"),
    ("data", "train", "/nonexistent/corpus.txt", "data.train=/nonexistent/corpus.txt: no such file"),
])
def test_run_config_rejects_bad_numbers_naming_the_key(tmp_path, section, key, value, message):
    cfg = tiny_config(tmp_path, **{section: {key: value}})
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(cfg)
    assert message in str(e.value)

def test_run_config_accepts_the_shipped_defaults(tmp_path):
    RunConfig.from_dict(tiny_config(tmp_path))

"""RADDConfig (radd_fast/config.py): validation, unknown keys recorded, the round trip, on the published config."""
import pytest

from radd_fast import ConfigError, NoiseConfig, RADDConfig
from tests.support.published_model import published_config

TOKENS, D, H, BLOCKS, LENGTH = 37, 48, 3, 2, 64


@pytest.mark.parametrize("section, bad, match", [
    ("model", {"hidden_size": 50, "n_heads": 3}, "not divisible"),
    ("model", {"hidden_size": 30, "n_heads": 2}, "odd"),
    ("model", {"dtype": "float8"}, "unknown dtype"),
    ("model", {"backend": "cuda-magic"}, "unknown model.backend"),
    ("noise", {"type": "cosine"}, "unknown noise.type"),
])
def test_config_validation(section, bad, match):
    cfg = published_config(TOKENS, D, H, BLOCKS, LENGTH)
    cfg[section].update(bad)
    with pytest.raises(ConfigError, match=match):
        RADDConfig.from_dict(cfg)


def test_config_ignores_and_records_unknown_keys_and_round_trips():
    cfg = RADDConfig.from_dict(published_config(TOKENS, D, H, BLOCKS, LENGTH))
    assert "model.cond_dim" in cfg.ignored_keys
    assert cfg.vocab_size == TOKENS + 1 and cfg.mask_id == TOKENS
    again = RADDConfig.from_dict(cfg.to_dict())
    assert again.model == cfg.model and again.noise == cfg.noise and again.extra["training"]["loss_type"] == "t_DCE"
    with pytest.raises(ConfigError, match="tokens"):
        RADDConfig.from_dict({"model": {}})
    assert NoiseConfig().type == "loglinear"

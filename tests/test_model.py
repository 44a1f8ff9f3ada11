"""The reference model against an independent implementation of the published math."""
import pytest
import torch

from radd_fast import RADD, ConfigError, ModelConfig, NoiseConfig, RADDConfig
from radd_fast.model.ops import resolve_backend
from tests.helpers import assert_close
from tests.independent_radd import published_config, published_log_probs, published_logits, published_state_dict

TOKENS, D, H, BLOCKS, LENGTH = 37, 48, 3, 2, 64


def _model_and_state(seed=0):
    state = published_state_dict(TOKENS + 1, D, H, BLOCKS, seed=seed)
    model = RADD(published_config(TOKENS, D, H, BLOCKS, LENGTH)).eval()
    model.load_state_dict(state, strict=True)
    return model, state


@pytest.mark.parametrize("T", [1, 7, 64])
def test_forward_and_logits_match_independent_implementation(T):
    model, state = _model_and_state()
    x = torch.randint(0, TOKENS + 1, (3, T))
    with torch.no_grad():
        assert_close(model.logits(x), published_logits(state, H, x), atol=1e-5, rtol=1e-5, name="logits")
        assert_close(model(x), published_log_probs(state, H, x), atol=1e-5, rtol=1e-5, name="forward")


def test_forward_layout_normalises_real_tokens_and_keeps_mask_column_raw():
    model, _ = _model_and_state(seed=1)
    x = torch.randint(0, TOKENS + 1, (2, 9))
    with torch.no_grad():
        out, logits = model(x), model.logits(x)
    assert_close(out[..., :-1].exp().sum(-1), torch.ones(2, 9), atol=1e-5, name="sum p")
    assert_close(out[..., -1], logits[..., -1], atol=0, rtol=0, name="mask column")


def test_hidden_head_and_selected_rows_agree_with_logits():
    model, _ = _model_and_state(seed=2)
    x = torch.randint(0, TOKENS + 1, (2, 11))
    with torch.no_grad():
        h = model.hidden(x)
        assert_close(model.head(h), model.logits(x), atol=1e-6, name="head(hidden)")
        rows = h.reshape(-1, D)[[0, 5, 13]]
        assert_close(model.log_probs_at(rows), model(x).reshape(-1, TOKENS + 1)[[0, 5, 13], :-1], atol=1e-6)
        targets = torch.tensor([3, 0, TOKENS - 1])
        assert_close(model.target_log_probs(rows, targets), model.log_probs_at(rows).gather(-1, targets[:, None])[:, 0])


def test_fresh_model_has_published_init():
    model = RADD(RADDConfig(tokens=TOKENS, model=ModelConfig(hidden_size=D, n_heads=H, n_blocks=1, length=16)))
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(model.blocks[0].norm1.bias == 1)
    assert torch.all(model.output_layer.linear.weight == 0) and torch.all(model.output_layer.linear.bias == 0)
    assert model.vocab_embed.embedding.shape == (TOKENS + 1, D)
    assert model.rotary_emb.inv_freq.shape == (D // H // 2,)


def test_dropout_only_in_training_and_checkpointing_matches():
    cfg = published_config(TOKENS, D, H, BLOCKS, LENGTH)
    cfg["model"]["dropout"] = 0.5
    model = RADD(cfg)
    x = torch.randint(0, TOKENS + 1, (2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.logits(x), model.logits(x))
    model.train()
    torch.manual_seed(3)
    a = model.hidden(x)
    model.use_checkpoint = True
    torch.manual_seed(3)
    b = model.hidden(x)
    assert_close(a, b, atol=1e-6, name="activation checkpointing")
    b.sum().backward()
    assert model.blocks[0].attn_qkv.weight.grad is not None


def test_input_errors_are_clear():
    model, _ = _model_and_state()
    with pytest.raises(ValueError, match="exceeds the model's length"):
        model(torch.zeros(1, LENGTH + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab"):
        model(torch.full((1, 4), TOKENS + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(4))


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


def test_auto_backend_follows_the_device():
    assert resolve_backend("auto", torch.device("cuda")) == "fast"
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("fast", torch.device("cpu")) == "fast"
    with pytest.raises(ValueError, match="unknown backend 'turbo'"):
        resolve_backend("turbo", torch.device("cpu"))
    cfg = RADDConfig(tokens=TOKENS, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=8, name="auto",
                                                      backend="auto"))
    model = RADD(cfg)
    assert model.backend == "reference" and model.to(torch.float32).backend == "reference"  # .to re-decides
    assert model.set_backend("fast").to("cpu").backend == "fast"  # an explicit backend stays

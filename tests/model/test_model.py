"""The RADD model (radd_fast/model/model.py): the reference backend against an independent
implementation of the published math, the forward's layout, hidden / head / selected rows, the
published init, dropout and activation checkpointing, input errors, the backend it picks, and
last-block pruning (the body computed at selected rows only equals the full forward at those rows).
"""
import pytest
import torch

from radd_fast import RADD, ModelConfig, RADDConfig
from radd_fast.model.ops import resolve_backend
from tests.support.compare import assert_close
from tests.support.published_model import published_config, published_log_probs, published_logits, published_state_dict

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
        assert_close(model.vocab_log_probs(rows), model(x).reshape(-1, TOKENS + 1)[[0, 5, 13], :-1], atol=1e-6)
        targets = torch.tensor([3, 0, TOKENS - 1])
        assert_close(model.target_log_probs(rows, targets), model.vocab_log_probs(rows).gather(-1, targets[:, None])[:, 0])


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


# -------------------------------------------- last-block pruning: model.hidden(rows=...)
def _model(n_blocks: int, length: int, backend: str) -> RADD:
    torch.manual_seed(1)
    cfg = RADDConfig(tokens=37, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=n_blocks, length=length,
                                                  dropout=0.0, name="prune"))
    model = RADD(cfg, backend=backend).eval()
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("B,T,n_blocks", [(1, 1, 1), (3, 13, 2), (2, 31, 3), (5, 7, 1)])
def test_pruned_rows_equal_the_full_forward(backend, B, T, n_blocks):
    model = _model(n_blocks, T, backend)
    x = torch.randint(0, model.vocab_size, (B, T))
    rows = torch.randint(0, B * T, (max(1, (B * T) // 3) + 2,))  # duplicates and any order are allowed
    with torch.no_grad():
        full = model.hidden(x).reshape(B * T, -1)
        pruned = model.hidden(x, rows=rows)
        assert pruned.shape == (rows.numel(), full.shape[1])
        assert_close(pruned, full[rows], atol=1e-5, rtol=1e-5, name="hidden rows")
        assert_close(model.head(pruned), model.head(full)[rows], atol=1e-5, rtol=1e-5, name="logits at rows")


def test_pruned_last_block_gradients_match():
    model = _model(2, 9, "reference").train()
    x = torch.randint(0, model.vocab_size, (2, 9))
    rows = torch.tensor([0, 4, 11, 17])
    model.hidden(x, rows=rows).square().sum().backward()
    pruned = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.hidden(x).reshape(18, -1)[rows].square().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(pruned[name], p.grad, atol=1e-5, rtol=1e-5, name=name)

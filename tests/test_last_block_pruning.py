"""Last-block pruning: the body computed at selected rows only equals the full forward at those rows."""
import pytest
import torch

from radd_fast import RADD, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.sampling import SamplerConfig, generate

from .helpers import assert_close
from .test_sampling_utils import tiny_model


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


@pytest.mark.parametrize("strategy,para", [("direct", None), ("top_k", 3)])
def test_engine_samples_do_not_change_with_pruning(strategy, para):
    model = tiny_model(tokens=8, length=10)
    cfg = SamplerConfig(steps=6, strategy=strategy, strategy_para=para, use_kernels=False, rows_in_flight=4)
    a, sa = generate(model, LogLinearNoise(), 24, config=cfg, seed=2, progress=False)
    b, sb = generate(model, LogLinearNoise(), 24, config=cfg.replace(prune_last_block=False), seed=2, progress=False)
    assert torch.equal(a, b) and torch.equal(sa.enfe, sb.enfe)

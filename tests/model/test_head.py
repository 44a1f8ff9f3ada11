"""The output head (radd_fast/model/head.py): its PyTorch Gumbel noise is standard Gumbel
(Kolmogorov-Smirnov against the CDF) and fresh between draws and positions; its two log-probs at
selected rows, every real token's ([N, V-1]) and the targets' ([N]), under their own names."""
from __future__ import annotations

import pytest
import torch

from radd_fast.model.head import gumbel
from tests.support.stats import ks_critical, ks_gumbel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_gumbel_is_standard_gumbel_and_fresh(dtype):
    gen = torch.Generator().manual_seed(0)
    x = gumbel((100, 200), dtype, "cpu", gen)
    assert x.dtype == dtype and x.shape == (100, 200) and bool(torch.isfinite(x).all())
    assert ks_gumbel(x) < ks_critical(x.numel())
    y = gumbel((100, 200), dtype, "cpu", gen)  # the next draw from the same generator
    assert ks_gumbel(torch.cat([x, y])) < ks_critical(2 * x.numel())
    assert abs(float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]).double())[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([x[:, 1:].flatten(), x[:, :-1].flatten()]).double())[0, 1])) < 0.03


def test_vocab_and_target_log_probs_say_what_they_return(tiny_model):
    """``vocab_log_probs(h) -> [N, V-1]`` and ``target_log_probs(h, targets) -> [N]``, the same names
    on the model and on its head (the head's were ``log_probs`` / ``log_probs_at``, the model's
    ``log_probs_at``: one name for both shapes)."""
    torch.manual_seed(0)
    head, V = tiny_model.output_head(), tiny_model.vocab_size
    h = tiny_model.hidden(torch.randint(0, V - 1, (2, 16))).reshape(-1, tiny_model.config.model.hidden_size)[:5]
    targets = torch.tensor([0, 3, 7, 1, 2])
    every = head.vocab_log_probs(h)
    assert every.shape == (5, V - 1) and every.dtype == torch.float32
    assert torch.allclose(every.exp().sum(-1), torch.ones(5), atol=1e-5)  # normalised over the real tokens
    assert torch.equal(tiny_model.vocab_log_probs(h), every)
    chosen = head.target_log_probs(h, targets)
    assert chosen.shape == (5,) and torch.equal(chosen, every.gather(-1, targets[:, None])[:, 0])
    assert torch.equal(tiny_model.target_log_probs(h, targets), chosen)
    for old in ("log_probs", "log_probs_at"):
        assert not hasattr(head, old) and not hasattr(tiny_model, old)

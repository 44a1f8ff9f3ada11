"""The output head (radd_fast/model/head.py): its PyTorch Gumbel noise is standard Gumbel
(Kolmogorov-Smirnov against the CDF) and fresh between draws and positions."""
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

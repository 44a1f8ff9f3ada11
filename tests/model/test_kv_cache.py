"""The approximate sampler's key/value cache (radd_fast/model/kv_cache.py): filling is the model's forward,
cached rows equal the full forward where nothing changed (and exactly on one block), its size per row."""
from types import SimpleNamespace

import pytest
import torch

from radd_fast import ModelConfig, RADDConfig
from radd_fast.model.kv_cache import KVCache, hidden_cached, hidden_filling
from tests.support.compare import assert_close
from tests.support.models import normal_head_model, random_head_model


def _fill(model, x, slots=None):
    B, L = x.shape
    cache = KVCache.allocate(model, slots=B + 1, length=L)
    slots = torch.arange(B) if slots is None else slots
    with torch.no_grad():
        full = hidden_filling(model, x, cache, slots)
    return cache, slots, full


def _positions(L: int):
    """Per row: the pushed positions, the first repeated as padding (valid False), S = 4."""
    positions = torch.tensor([[1, 4, 6, 1], [0, 0, 0, 0], [2, 3, 5, 7]])
    valid = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    return positions, valid


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_filling_is_the_model_forward_and_caches_keys(backend):
    model = normal_head_model(n_blocks=3, length=9, backend=backend)
    x = torch.randint(0, model.vocab_size, (3, 9))
    cache, slots, full = _fill(model, x, slots=torch.tensor([2, 0, 3]))  # any slots, in any order
    with torch.no_grad():
        assert torch.equal(full, model.hidden(x))
        rows = torch.tensor([0, 5, 13, 26, 5])
        assert torch.equal(hidden_filling(model, x, cache, slots, rows=rows), model.hidden(x, rows=rows))
    assert cache.k[:, slots].abs().sum() > 0 and cache.k[:, 1].abs().sum() == 0  # slot 1 unused: untouched


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_cached_rows_equal_the_full_forward_when_nothing_changed(backend):
    model = normal_head_model(n_blocks=3, length=9, backend=backend)
    x = torch.randint(0, model.vocab_size, (3, 9))
    cache, slots, full = _fill(model, x)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    positions, valid = _positions(9)
    write = cache.write_index(slots, torch.where(valid, positions, torch.full_like(positions, cache.length)))
    with torch.no_grad():
        h = hidden_cached(model, x.gather(1, positions), positions, write, cache)  # [3, 4, d]
    want = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    assert_close(h, want, atol=1e-5, rtol=1e-5, name="cached hidden rows")
    # Pushed entries rewritten with (nearly) the same values; the padding queries only touched the dump.
    assert_close(cache.k[:, :, :cache.length], before_k[:, :, :cache.length], atol=1e-5, rtol=1e-5, name="keys")
    assert_close(cache.v[:, :, :cache.length], before_v[:, :, :cache.length], atol=1e-5, rtol=1e-5, name="values")


def test_one_block_cached_rows_are_exact_after_changes():
    """With one block the keys and values depend on a position's own token only: caching is exact
    as long as every changed position is pushed, which checks the overwrite-then-attend order."""
    model = normal_head_model(n_blocks=1, length=9)
    x = torch.randint(0, model.vocab_size, (3, 9))
    cache, slots, _ = _fill(model, x)
    positions, valid = _positions(9)
    x_new = x.clone()
    x_new[0, 4], x_new[2, 7], x_new[2, 2] = (x[0, 4] + 1) % 11, (x[2, 7] + 3) % 11, (x[2, 2] + 1) % 11
    write = cache.write_index(slots, torch.where(valid, positions, torch.full_like(positions, cache.length)))
    with torch.no_grad():
        h = hidden_cached(model, x_new.gather(1, positions), positions, write, cache)
        full = model.hidden(x_new)
    want = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    assert_close(h[valid], want[valid], atol=1e-5, rtol=1e-5, name="one-block cached rows")


def test_cache_bytes_per_row():
    model = random_head_model(tokens=8, length=12)
    assert KVCache.bytes_per_row(model, 12) == 1 * 2 * 12 * 32 * 4  # blocks x (k, v) x L x d x fp32
    small = RADDConfig(tokens=50257, model=ModelConfig(hidden_size=768, n_heads=12, n_blocks=12, length=1024, name="s"))
    assert KVCache.bytes_per_row(SimpleNamespace(config=small), 1024, torch.bfloat16) == 12 * 2 * 1024 * 768 * 2

"""radd_fast/philox.py: Philox4x32-10 in PyTorch, against the published known answers and Triton's
own tl.philox, and the keyed uniforms the sampler draws (each row keyed by its id alone)."""
import math

import pytest
import torch

from radd_fast.philox import keyed_gumbel, keyed_uniforms, open_uniform, philox
from tests.support.kernel_paths import needs_triton_on_cpu
from tests.support.stats import ks_critical, ks_gumbel

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output words.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,words", KNOWN_ANSWERS)
def test_philox_gives_the_published_known_answers(counter, key, words):
    c = [torch.tensor([v]) for v in counter]
    out = philox(key[0] | (key[1] << 32), *c)
    assert [int(w) for w in out] == list(words)


@needs_triton_on_cpu
def test_philox_is_tritons_tl_philox_bit_for_bit():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, key, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = (i * 7919).to(tl.uint32)
        c1 = (i * 104729 + 3).to(tl.uint32)
        c2 = (i ^ 0x5555).to(tl.uint32)
        c3 = (i * 0).to(tl.uint32) + 0xFFFFFFF0
        r0, r1, r2, r3 = tl.philox(key, c0, c1, c2, c3)
        for j, r in enumerate((r0, r1, r2, r3)):
            tl.store(out_ptr + i * 4 + j, r.to(tl.int64) & 0xFFFFFFFF)

    N, key = 64, 0x123456789ABCDEF
    got = torch.zeros(N * 4, dtype=torch.int64)
    kernel[(1,)](got, key, N=N)
    i = torch.arange(N, dtype=torch.int64)
    words = philox(key, (i * 7919) & 0xFFFFFFFF, (i * 104729 + 3) & 0xFFFFFFFF, i ^ 0x5555,
                   torch.tensor(0xFFFFFFF0))
    assert torch.equal(got.view(N, 4), torch.stack(words, dim=1))


def test_a_row_depends_on_its_id_alone():
    ids = torch.tensor([3, 2**40 + 1, 0, 3])
    u = keyed_uniforms(11, ids, 50)
    assert u.shape == (4, 50) and u.dtype == torch.float64
    assert torch.equal(u[0], u[3]) and not torch.equal(u[0], u[2])
    assert torch.equal(keyed_uniforms(11, ids[1:2], 50)[0], u[1])  # alone or in a batch: the same row
    assert torch.equal(keyed_uniforms(11, ids, 20), u[:, :20])  # a narrower row is a prefix
    assert not torch.equal(keyed_uniforms(12, ids, 50), u)  # another key, other numbers


def test_uniforms_are_open_and_uniform_and_chunking_changes_nothing(monkeypatch):
    u = keyed_uniforms(5, torch.arange(400), 250)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    import radd_fast.philox as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1000)  # many passes of a few rows
    assert torch.equal(keyed_uniforms(5, torch.arange(400), 250), u)


def test_open_uniform_ends_and_dtypes():
    top = torch.tensor([0xFFFFFFFF])
    zero = torch.tensor([0])
    assert float(open_uniform(zero, zero, torch.float64)) == 0.5 * 2.0**-53
    assert float(open_uniform(top, top, torch.float64)) == 1 - 0.5 * 2.0**-53
    assert float(open_uniform(top, top, torch.float32)) < 1.0
    assert open_uniform(top, top, torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="open_uniform draws float32 or float64, got torch.float16"):
        open_uniform(top, top, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keyed_gumbel_is_standard_gumbel(dtype):
    g = keyed_gumbel(8, torch.arange(128), 300, dtype)
    assert g.dtype == dtype and bool(torch.isfinite(g).all())
    assert ks_gumbel(g) < ks_critical(g.numel())
    assert abs(float(g.double().mean()) - 0.5772156649) < 0.01 and abs(float(g.double().var()) - math.pi**2 / 6) < 0.03

"""The kernels' shared helpers (radd_fast/kernels/utils.py): the card table, the card of a device,
and the shared-memory copies a software pipeline keeps."""
from types import SimpleNamespace

import torch

from radd_fast.kernels import utils


# ----------------------------------------------------------------------------- the card table
def test_card_limits_are_the_documented_numbers():
    # CUDA programming guide, maximum shared memory per block (opt-in), in bytes
    assert utils.smem_limit_of((8, 0)) == 166912  # A100: 163 KB
    assert utils.smem_limit_of((8, 9)) == 101376  # L4 / L40S / RTX 4090: 99 KB
    assert utils.smem_limit_of((9, 0)) == 232448  # H100 / H200: 227 KB
    assert utils.smem_limit_of((8, 8)) == 101376  # unknown minor: the smallest of its major
    assert utils.smem_limit_of((7, 5)) == 101376  # unknown major: 99 KB


def test_card_of_prefers_the_drivers_number(monkeypatch):
    props = {0: SimpleNamespace(major=8, minor=0, shared_memory_per_block_optin=150000),
             1: SimpleNamespace(major=8, minor=9)}  # an older torch without the field
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    utils._card_of_cuda.cache_clear()
    try:
        assert utils.card_of(torch.device("cuda", 0)) == ((8, 0), 150000)
        assert utils.card_of(torch.device("cuda", 1)) == ((8, 9), 101376)
    finally:
        utils._card_of_cuda.cache_clear()


def test_pipeline_buffers_by_card():
    assert utils.pipeline_buffers((9, 0), torch.bfloat16, 3) == 3  # wgmma keeps every stage
    assert utils.pipeline_buffers((9, 0), torch.float32, 3) == 2  # IEEE fp32 dots: cp.async
    assert utils.pipeline_buffers((8, 0), torch.float16, 3) == 2
    assert utils.pipeline_buffers((8, 9), torch.bfloat16, 1) == 1  # no pipelining: one copy

"""The Triton attention launchers (radd_fast/kernels/flash_attention.py) against exact expectations:
every element of the outputs written (poisoned buffers) and equal to the reference, every launcher
message word for word, which tiles a launch on a card asks for, the tuned tiles, the shared memory
each configuration is estimated to need (closed form), the flags the launchers derive, how many
programs each kernel launches, and the buffers' dtypes and layouts.

The numerics through the dispatcher (the registered op, autograd, torch.compile, bf16 / fp16 on
CUDA) are in test_attention.py; every card's tiles in test_card_configs.py.
"""
import pytest
import torch

from radd_fast.kernels import attention as att
from radd_fast.kernels import flash_attention as fa
from radd_fast.kernels.attention import attention_ref
from radd_fast.kernels.rotary import apply_rotary_qkv_ref
from radd_fast.kernels.utils import pipeline_buffers
from tests.support.attention import grads, qkv_of, rotary_tables
from tests.support.compare import DEVICE, assert_close, poison_like
from tests.support.kernel_inputs import make_qkv
from tests.support.kernel_paths import needs_triton_on_cpu
from tests.support.launches import LaunchRecorder
from tests.support.messages import error_of


def tables(T, hd):
    return torch.ones(T, hd // 2), torch.zeros(T, hd // 2)


# ---------------------------- the launchers against the reference, every element written
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_launchers_write_every_element(rotary):
    # Poisoned (NaN) outputs: any element the kernels skip fails the comparison.
    B, T, h, hd = 1, 23, 2, 32
    qkv = make_qkv(B, T, h, hd)
    cos, sin = rotary_tables(T, hd) if rotary else (None, None)
    out = poison_like(torch.empty(B, T, h, hd, device=DEVICE))
    out_, lse = fa.flash_attention_forward(qkv, cos, sin, out=out)
    assert out_ is out
    assert_close(out, attention_ref(qkv, cos, sin), atol=1e-4, rtol=1e-4, name="out")
    # lse is in log2 units of the scaled scores
    q, k, _ = (apply_rotary_qkv_ref(qkv, cos, sin) if rotary else qkv).unbind(2)
    lse_ref = torch.einsum("bthd,bshd->bhts", q, k).div(hd**0.5).logsumexp(-1) / torch.log(torch.tensor(2.0))
    assert_close(lse, lse_ref, atol=1e-4, rtol=1e-4, name="lse")

    dout = torch.randn_like(out)
    dqkv = fa.flash_attention_backward(dout, qkv, out, lse, cos, sin, dqkv=poison_like(qkv))
    _, dref = grads(lambda x: attention_ref(x, cos, sin), qkv, dout)
    assert_close(dqkv, dref, atol=1e-4, rtol=1e-4, name="dqkv")


# ----------------------------------------------------------------- the launchers' checks
def test_head_dim_and_rotary_table_messages():
    assert error_of(fa.check_head_dim, 24) == (
        "triton attention supports head dims that are multiples of 16 in [32, 128]; got head_dim=24")
    for hd in (16, 144, 40):
        assert error_of(fa.check_head_dim, hd).endswith(f"got head_dim={hd}")
    for hd in (32, 48, 128):
        fa.check_head_dim(hd)  # both ends of the range are supported
    qkv = qkv_of(T=4, hd=32)
    cos, sin = tables(4, 32)
    assert error_of(fa.check_rotary_tables, qkv, cos, None) == "pass both cos and sin, or neither"
    assert error_of(fa.check_rotary_tables, qkv, None, sin) == "pass both cos and sin, or neither"
    assert error_of(fa.check_rotary_tables, qkv, cos[:3], sin) == "cos must be [T, hd/2] = [4, 16]; got (3, 16)"
    assert error_of(fa.check_rotary_tables, qkv, cos, sin[:, :8]) == "sin must be [T, hd/2] = [4, 16]; got (4, 8)"
    assert error_of(fa.check_rotary_tables, qkv, cos.double(), sin) == "cos must be float32; got torch.float64"
    assert error_of(fa.check_rotary_tables, qkv, cos, sin.half()) == "sin must be float32; got torch.float16"
    assert error_of(fa.check_rotary_tables, qkv, cos, sin.to("meta")) == "sin is on meta, qkv on cpu"


def test_launcher_input_messages(monkeypatch):
    monkeypatch.setattr(fa, "triton_runs_on", lambda t: True)  # every check before the last one
    check = fa.check_inputs
    assert error_of(check, torch.zeros(1, 4, 2, 2, 32), None, None) == (
        "qkv must be [B, T, 3, h, hd]; got shape (1, 4, 2, 2, 32)")
    assert error_of(check, torch.zeros(1, 4, 3, 32), None, None) == "qkv must be [B, T, 3, h, hd]; got shape (1, 4, 3, 32)"
    assert error_of(check, qkv_of(dtype=torch.float64), None, None) == (
        f"triton attention supports {fa.DTYPES}; got torch.float64")
    strided = torch.zeros(1, 4, 3, 2, 64)[..., ::2]
    assert error_of(check, strided, None, None) == (
        f"qkv must have unit stride on the head dim; got strides {strided.stride()}")
    assert error_of(check, torch.zeros(0, 4, 3, 2, 32), None, None) == "empty qkv (0, 4, 3, 2, 32)"
    assert error_of(check, torch.zeros(1, 4, 3, 0, 32), None, None) == "empty qkv (1, 4, 3, 0, 32)"
    assert error_of(check, torch.zeros(1, 0, 3, 2, 32), None, None) == "empty qkv (1, 0, 3, 2, 32)"
    huge = torch.empty_strided((1, 4, 3, 2, 32), (0, 2**29, 32, 16, 1), device="meta")  # 4 x 2**29 elements
    assert error_of(check, huge, None, None) == "one sequence of qkv must span fewer than 2**31 elements"
    qkv = qkv_of(T=4, hd=32)
    cos, sin = tables(4, 32)
    wide = torch.ones(4, 32)
    assert error_of(check, qkv, wide[:, ::2], sin) == "cos must have unit stride on its last dim"
    assert error_of(check, qkv, cos, torch.ones(16, 4).t()) == (
        "sin must have unit stride on its last dim")
    assert error_of(check, qkv, wide[:, :16], sin) == "cos and sin must share their row stride"
    monkeypatch.setattr(fa, "triton_runs_on", lambda t: False)
    assert error_of(check, qkv, None, None) == (
        "triton attention cannot run on cpu (needs CUDA, or the CPU with TRITON_INTERPRET=1 set before triton "
        "is imported)")


def test_a_sequence_just_under_2_to_the_31_passes_the_size_check(monkeypatch):
    monkeypatch.setattr(fa, "triton_runs_on", lambda t: True)
    qkv = torch.empty_strided((1, 4, 3, 2, 32), (0, 2**29 - 1, 32, 16, 1), device="meta")
    fa.check_inputs(qkv, None, None)  # 4 * (2**29 - 1) < 2**31


@needs_triton_on_cpu
def test_forward_out_and_backward_buffer_messages():
    qkv = qkv_of(T=5, hd=32)
    out, lse = fa.flash_attention_forward(qkv)
    assert error_of(fa.flash_attention_forward, qkv, out=out.double()) == (
        "out must be [B, T, h, hd] torch.float32 with unit last stride; got (1, 5, 2, 32) torch.float64")
    assert error_of(fa.flash_attention_forward, qkv, out=out[:, :4]) == (
        "out must be [B, T, h, hd] torch.float32 with unit last stride; got (1, 4, 2, 32) torch.float32")
    dout = torch.randn_like(out)
    back = fa.flash_attention_backward
    assert error_of(back, dout[:, :4], qkv, out, lse) == (
        "dout must be [B, T, h, hd] torch.float32 with unit last stride; got (1, 4, 2, 32) torch.float32")
    assert error_of(back, dout, qkv, out.double(), lse) == (
        "out must be [B, T, h, hd] torch.float32 with unit last stride; got (1, 5, 2, 32) torch.float64")
    assert error_of(back, dout, qkv, out, lse[..., :4]) == (
        "lse must be contiguous float32 [B, h, T]; got (1, 2, 4) torch.float32")
    assert error_of(back, dout, qkv, out, lse.double()) == "lse must be contiguous float32 [B, h, T]; got (1, 2, 5) torch.float64"
    assert error_of(back, dout, qkv, out, lse.transpose(1, 2).contiguous().transpose(1, 2)) == (
        "lse must be contiguous float32 [B, h, T]; got (1, 2, 5) torch.float32")
    assert error_of(back, dout, qkv, out, lse, dqkv=torch.empty_like(qkv).double()) == (
        "dqkv must be (1, 5, 3, 2, 32) torch.float32 with unit last stride")


# ------------------------------------------------------------- tiles, flags and programs
def test_default_configs_ask_the_card(monkeypatch):
    asked, cards = [], []
    monkeypatch.setattr(fa, "card_of", lambda device: cards.append(device) or ((8, 0), 166912))
    monkeypatch.setattr(fa, "fwd_config_for", lambda *a: asked.append(("fwd", *a)) or "fwd tiles")
    monkeypatch.setattr(fa, "bwd_config_for", lambda *a: asked.append(("bwd", *a)) or "bwd tiles")
    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert fa.default_fwd_config(64, torch.bfloat16, cuda, rotary=True) == "fwd tiles"
    assert fa.default_bwd_config(128, torch.float16, cuda) == "bwd tiles"
    assert asked == [("fwd", (8, 0), 166912, torch.bfloat16, 64, True), ("bwd", (8, 0), 166912, torch.float16, 128, False)]
    assert cards == [cuda, cuda]  # the card of the launch's own device
    fa.default_fwd_config(64, torch.bfloat16, cuda)
    assert asked[-1] == ("fwd", (8, 0), 166912, torch.bfloat16, 64, False)  # no rotary unless asked
    cpu = torch.device("cpu")
    assert fa.default_fwd_config(64, torch.float32, cpu) == fa.FwdConfig(16, 16, 1, 1)
    assert fa.default_bwd_config(64, torch.float32, cpu) == fa.BwdConfig(16, 16, 1, 1, 16, 16, 1, 1)


def test_tuned_tiles_are_the_documented_ones():
    assert fa._tuned_fwd(64, torch.float32) == fa.FwdConfig(32, 32, 4, 1)
    assert fa._tuned_fwd(128, torch.bfloat16) == fa.FwdConfig(128, 64, 8, 3)
    assert fa._tuned_bwd(64, torch.float32) == fa.BwdConfig(16, 32, 4, 1, 32, 16, 4, 1)
    assert fa._tuned_bwd(64, torch.bfloat16) == fa.BwdConfig(32, 128, 8, 3, 128, 32, 8, 3)
    assert fa._tuned_bwd(96, torch.float16) == fa.BwdConfig(32, 64, 8, 2, 64, 64, 8, 2)
    assert fa.FwdConfig() == fa.FwdConfig(128, 64, 8, 3)
    assert fa.BwdConfig() == fa.BwdConfig(32, 128, 8, 3, 128, 32, 8, 3)


def test_tile_widths_pad_to_powers_of_two_of_at_least_16():
    assert fa._tile_widths(32) == (32, 16)
    assert fa._tile_widths(48) == (64, 32)
    assert fa._tile_widths(96) == (128, 64)
    assert fa._tile_widths(16) == (16, 16)  # half rows never narrower than 16


@pytest.mark.parametrize("card", [(8, 0), (9, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_memory_estimates_in_closed_form(card, dtype):
    """The docstrings' sums written out: hd 48 (tiles 64 wide, halves 32), rotary adds fp32 cos + sin rows."""
    size = dtype.itemsize
    fwd = fa.FwdConfig(64, 32, 4, 3)
    stages = pipeline_buffers(card, dtype, 3)
    assert fa.fwd_smem_bytes(fwd, card, dtype, 48, False) == 64 * 64 * size + stages * 2 * 32 * 64 * size
    assert fa.fwd_smem_bytes(fwd, card, dtype, 48, True) == (64 * 64 * size
                                                             + stages * (2 * 32 * 64 * size + 2 * 32 * 32 * 4))
    bwd = fa.BwdConfig(16, 32, 4, 3, 64, 16, 4, 2)
    once = (2 * 32 * 64 + 32 * 16) * size
    step = 2 * 16 * 64 * size + 2 * 16 * 32 * 4 + 2 * 16 * 4
    assert fa.dkdv_smem_bytes(bwd, card, dtype, 48, True) == once + stages * step
    assert fa.dkdv_smem_bytes(bwd, card, dtype, 48, False) == once + stages * (2 * 16 * 64 * size + 2 * 16 * 4)
    stages2 = pipeline_buffers(card, dtype, 2)
    assert fa.dq_smem_bytes(bwd, card, dtype, 48, True) == 2 * 64 * 64 * size + stages2 * (
        2 * 16 * 64 * size + 2 * 16 * 32 * 4)


def test_launcher_flags():
    flags, even = fa._common(qkv_of(hd=48), None, 48)
    assert flags == dict(HEAD_DIM=48, HALF=24, BLOCK_HALF=32, BLOCK_D=64, ROTARY=False, PRECISION="ieee")
    assert not even  # half 24 is not a power of two: masked loads
    cos, _ = tables(4, 64)
    flags, even = fa._common(qkv_of(hd=64, dtype=torch.float16), cos, 64)
    assert flags == dict(HEAD_DIM=64, HALF=32, BLOCK_HALF=32, BLOCK_D=64, ROTARY=True, PRECISION="tf32")
    assert even


@needs_triton_on_cpu
def test_programs_per_kernel(monkeypatch):
    kernels = {name: getattr(fa, name) for name in
               ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")}

    def record(expected: list) -> list:
        launches = []  # one list for the four kernels: their order is part of what is checked
        for name, kernel in kernels.items():
            monkeypatch.setattr(fa, name, LaunchRecorder(kernel, launches, expected))
        return launches

    B, T, h = 2, 37, 3  # 37 rows: 3 blocks of 16 (the interpreter's tiles)
    qkv = qkv_of(B, T, h, 32)
    expected = [(3, 6), (3, 6), (3, 6), (3, 6)]
    launches = record(expected)
    out, lse = fa.flash_attention_forward(qkv)
    fa.flash_attention_backward(torch.randn_like(out), qkv, out, lse)
    assert launches == expected
    expected = [(2, 6), (3, 6), (2, 6), (2, 6)]
    launches = record(expected)
    cfg = fa.BwdConfig(16, 32, 1, 1, 32, 16, 1, 1)  # dK/dV: 32 keys a program; dQ: 32 queries a program
    fa.flash_attention_forward(qkv, config=fa.FwdConfig(32, 16, 1, 1))
    fa.flash_attention_backward(torch.randn_like(out), qkv, out, lse, config=cfg)
    assert launches == expected


@needs_triton_on_cpu
@pytest.mark.parametrize("rotary", [False, True])
def test_launchers_ask_for_their_tiles_and_keep_fp16(monkeypatch, rotary):
    """fp16 runs exactly enough under the interpreter to check the buffers' dtypes and the values loosely."""
    asked = []
    real_fwd, real_bwd = fa.default_fwd_config, fa.default_bwd_config
    monkeypatch.setattr(fa, "default_fwd_config", lambda *a, **k: asked.append(("fwd", a, k)) or real_fwd(*a, **k))
    monkeypatch.setattr(fa, "default_bwd_config", lambda *a, **k: asked.append(("bwd", a, k)) or real_bwd(*a, **k))
    B, T, h, hd = 1, 7, 2, 32
    qkv = qkv_of(B, T, h, hd).half()
    cos, sin = (torch.cos(torch.randn(T, hd // 2)), torch.sin(torch.randn(T, hd // 2))) if rotary else (None, None)
    out, lse = fa.flash_attention_forward(qkv, cos, sin)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    dqkv = fa.flash_attention_backward(dout, qkv, out, lse, cos, sin)
    assert dqkv.dtype == torch.float16 and dqkv.shape == qkv.shape
    cpu = torch.device("cpu")
    assert asked == [("fwd", (hd, torch.float16, cpu), {"rotary": rotary}), ("bwd", (hd, torch.float16, cpu), {"rotary": rotary})]
    leaf = qkv.float().requires_grad_(True)
    ref = att.attention_ref(leaf, cos, sin)
    ref.backward(dout.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dqkv.float(), leaf.grad, atol=5e-2, rtol=5e-2)


@needs_triton_on_cpu
def test_the_backward_writes_a_contiguous_gradient_for_a_strided_qkv():
    """The op's fake (what torch.compile plans with) says contiguous: the real gradient must be too."""
    B, T, h, hd = 1, 5, 2, 32
    qkv = torch.randn(B, h, 3, T, hd).permute(0, 3, 2, 1, 4)  # [B, T, 3, h, hd], unit stride on hd only
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    out, lse = fa.flash_attention_forward(qkv)
    dqkv = fa.flash_attention_backward(torch.randn_like(out), qkv, out, lse)
    assert dqkv.is_contiguous() and dqkv.shape == qkv.shape

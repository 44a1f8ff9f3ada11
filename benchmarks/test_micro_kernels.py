"""pytest-benchmark micro-benchmarks: each kernel against PyTorch eager, forward + backward.

    python -m pytest benchmarks/test_micro_kernels.py --benchmark-group-by=param:op   (make bench-micro)

Real sizes on a GPU (RADD-small: 32 x 1024 tokens, d 768, 12 heads); tiny sizes on
CPU, where the kernels run in the Triton interpreter (proves they run, not speed).
The tables (`benchmarks/run.py`) report the derived GB/s and TFLOP/s.
"""
import pytest
import torch

from radd_fast.kernels.attention import attention, attention_ref
from radd_fast.kernels.layer_norm import layer_norm, layer_norm_ref
from radd_fast.kernels.linear_log_softmax import linear_log_softmax_gather, linear_log_softmax_gather_ref
from radd_fast.kernels.rotary import apply_rotary_qkv, apply_rotary_qkv_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DT = torch.bfloat16 if CUDA else torch.float32
N, D, H, HD, V = (32 * 1024, 768, 12, 64, 50257) if CUDA else (64, 64, 2, 32, 300)
B, T = (32, 1024) if CUDA else (1, 32)


def _inputs(op):
    g = lambda *s, dtype=DT: torch.randn(*s, device=DEV, dtype=dtype, requires_grad=True)
    if op == "layer_norm":
        return (g(N, D), g(D, dtype=torch.float32), g(D, dtype=torch.float32))
    if op == "rotary":
        t = torch.arange(T, device=DEV, dtype=torch.float32)[:, None] * torch.rand(HD // 2, device=DEV)
        return (g(B, T, 3, H, HD), t.cos(), t.sin())
    if op == "attention":
        return (g(B, T, 3, H, HD),)
    rows = N // 2  # half of the positions masked
    return (g(rows, D), g(V, D), g(V), torch.randint(0, V, (rows,), device=DEV))


OPS = {
    "layer_norm": (lambda x, w, b: layer_norm(x, w, b, out_dtype=DT), lambda x, w, b: layer_norm_ref(x, w, b).to(DT)),
    "rotary": (apply_rotary_qkv, apply_rotary_qkv_ref),
    "attention": (lambda qkv: attention(qkv, impl="triton"), lambda qkv: attention_ref(qkv).to(DT)),
    "linear_log_softmax": (lambda *a: linear_log_softmax_gather(*a, validate=False)[0],
                           lambda *a: linear_log_softmax_gather_ref(*a)[0]),
}


def _step(fn, args):
    out = fn(*args)
    out.float().sum().backward()
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", ["ours", "eager"])
@pytest.mark.parametrize("op", list(OPS))
def test_fwd_bwd(benchmark, op, provider):
    args = _inputs(op)
    fn = OPS[op][0 if provider == "ours" else 1]
    benchmark.group = op
    benchmark.pedantic(_step, args=(fn, args), rounds=5 if CUDA else 1, warmup_rounds=1)

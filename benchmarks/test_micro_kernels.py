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
from radd_fast.kernels.registry import KERNELS
from radd_fast.kernels.rotary import apply_rotary_qkv, apply_rotary_qkv_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DT = torch.bfloat16 if CUDA else torch.float32
N, D, H, HD, V = (32 * 1024, 768, 12, 64, 50257) if CUDA else (64, 64, 2, 32, 300)
B, T = (32, 1024) if CUDA else (1, 32)


def _grad(*shape, dtype=DT):
    return torch.randn(*shape, device=DEV, dtype=dtype, requires_grad=True)


def _rotary_inputs():
    t = torch.arange(T, device=DEV, dtype=torch.float32)[:, None] * torch.rand(HD // 2, device=DEV)
    return (_grad(B, T, 3, H, HD), t.cos(), t.sin())


def _loss_head_inputs():
    rows = N // 2  # half of the positions masked
    return (_grad(rows, D), _grad(V, D), _grad(V), torch.randint(0, V, (rows,), device=DEV))


# Keyed by the names of the table of kernels (radd_fast/kernels/registry.py): every entry with
# micro_benchmark=True has its inputs here and (ours, eager) in OPS; test_every_declared_kernel_is_here
# says which one is missing.
INPUTS = {
    "layer_norm": lambda: (_grad(N, D), _grad(D, dtype=torch.float32), _grad(D, dtype=torch.float32)),
    "rotary": _rotary_inputs,
    "attention": lambda: (_grad(B, T, 3, H, HD),),
    "linear_log_softmax": _loss_head_inputs,
}


OPS = {
    "layer_norm": (lambda x, w, b: layer_norm(x, w, b, out_dtype=DT), lambda x, w, b: layer_norm_ref(x, w, b).to(DT)),
    "rotary": (apply_rotary_qkv, apply_rotary_qkv_ref),
    "attention": (lambda qkv: attention(qkv, impl="triton"), lambda qkv: attention_ref(qkv).to(DT)),
    "linear_log_softmax": (lambda *a: linear_log_softmax_gather(*a, validate=False)[0],
                           lambda *a: linear_log_softmax_gather_ref(*a)[0]),
}

DECLARED = [k.name for k in KERNELS.values() if k.micro_benchmark]


def test_every_declared_kernel_is_here():
    """The micro-benchmarks are the table's: one per kernel that declares one, none for another."""
    for name in DECLARED:
        assert name in INPUTS and name in OPS, (
            f"kernel {name!r} declares micro_benchmark=True in radd_fast/kernels/registry.py, but "
            f"benchmarks/test_micro_kernels.py has no {'INPUTS' if name not in INPUTS else 'OPS'} entry for it")
    extra = sorted((set(INPUTS) | set(OPS)) - set(DECLARED))
    assert not extra, (f"benchmarks/test_micro_kernels.py times {extra}, which radd_fast/kernels/registry.py "
                       "does not declare with micro_benchmark=True")


def _step(fn, args):
    out = fn(*args)
    out.float().sum().backward()
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", ["ours", "eager"])
@pytest.mark.parametrize("op", DECLARED)
def test_fwd_bwd(benchmark, op, provider):
    if op not in INPUTS or op not in OPS:
        pytest.fail(f"kernel {op!r} declares a micro-benchmark (radd_fast/kernels/registry.py) but "
                    "benchmarks/test_micro_kernels.py has no INPUTS / OPS entry for it")
    args = INPUTS[op]()
    fn = OPS[op][0 if provider == "ours" else 1]
    benchmark.group = op
    benchmark.pedantic(_step, args=(fn, args), rounds=5 if CUDA else 1, warmup_rounds=1)

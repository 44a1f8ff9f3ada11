"""Which MLP epilogue fusion pays (issue 13): the block's MLP + residual add, three ways, inference.

    python -m benchmarks.bench_mlp_epilogue            # CUDA: RADD-small sizes, bf16
    python -m benchmarks.bench_mlp_epilogue --quick    # tiny, CPU (proves it runs; times mean nothing)

What a DDiTBlock computes after its second norm: ``x + fc2(gelu_tanh(fc1(h)))``. Providers:

- ``eager``: as the block does today (the fp32 residual stream, autocast matmuls, GELU as its
  own kernel: it reads and writes the [N, 4d] activation once more);
- ``addmm_activation``: ``torch._addmm_activation(..., use_gelu=True)``, the cuBLASLt GELU+bias
  epilogue (CUDA: the tanh form; no autograd, so inference only);
- ``compile``: ``torch.compile`` of the eager function (inductor fuses GELU, casts and the residual
  add around its matmuls).

Each row: median ms, speedup against eager, and the largest error against an fp32 reference,
beside eager's own error (an approximation must stay within it). The winner becomes the block's
inference path; until measured on a GPU, the block keeps eager (docs/KERNELS.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.run import table_main
from benchmarks.timing import median_ms


def _eager(x, h, w1, b1, w2, b2):
    return x + F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)


def _addmm_activation(x, h, w1, b1, w2, b2):
    dt = h.dtype  # outside autocast's cast list: the weights are cast here
    a = torch._addmm_activation(b1.to(dt), h, w1.to(dt).t(), use_gelu=True)
    return x + F.linear(a, w2.to(dt), b2.to(dt))


def _reference(x, h, w1, b1, w2, b2):
    """fp32 throughout: the accuracy yardstick."""
    return _eager(x.float(), h.float(), w1.float(), b1.float(), w2.float(), b2.float())


def _inputs(N: int, d: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)
    x = rnd(N, d)  # the fp32 residual stream
    h = rnd(N, d).to(dtype)  # the norm's output, in the compute dtype
    return x, h, rnd(4 * d, d, scale=d ** -0.5), rnd(4 * d, scale=0.1), rnd(d, 4 * d, scale=(4 * d) ** -0.5), rnd(d, scale=0.1)


def run(device, quick: bool) -> list:
    """Rows of {shape, dtype, provider, ms, speedup, max_err, eager_max_err}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    N, d = (64 * 1024, 768) if cuda and not quick else (37, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    args = _inputs(N, d, device, dtype)
    ref = _reference(*args)
    providers = {"eager": _eager, "addmm_activation": _addmm_activation, "compile": torch.compile(_eager, dynamic=False)}
    rows, base = [], None
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=cuda):
        eager_err = (providers["eager"](*args).float() - ref).abs().max().item()
        for name, fn in providers.items():
            try:
                err = (fn(*args).float() - ref).abs().max().item()
                ms = median_ms(lambda fn=fn: fn(*args), device)
            except RuntimeError as e:  # e.g. no cuBLASLt epilogue for this dtype: say so, keep the others
                rows.append({"shape": f"[{N}, {d}]", "provider": name, "error": str(e).splitlines()[0]})
                continue
            base = ms if name == "eager" else base
            rows.append({"shape": f"[{N}, {d}] -> {4 * d} -> {d}", "dtype": str(dtype).replace("torch.", ""),
                         "provider": name, "ms": ms, "speedup": base / ms if base else None, "max_err": err,
                         "eager_max_err": eager_err})
    return rows


if __name__ == "__main__":
    table_main(run, __doc__)

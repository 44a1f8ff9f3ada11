"""Benchmark the packed-qkv rotary kernel against eager and torch.compile.

    python -m benchmarks.bench_rotary            # CUDA sweep, markdown table
    python -m benchmarks.bench_rotary --quick    # tiny shapes, ours + eager (CPU: interpreter)

Providers: ours (Triton), eager (the published formula in qkv's dtype), compile
(torch.compile of eager). Modes: fwd, bwd, fwd+bwd; op ``rotary_qkv_`` is the in-place
inference call (fwd only). Time is the median (do_bench on CUDA, perf_counter on CPU,
where interpreter timings mean nothing); GB/s from the ideal bytes in ``_bytes``.
"""

import torch

# benchmarks/__init__.py turns the Triton interpreter on where there is no GPU.
from benchmarks.timing import (  # noqa: E402
    allow_retain_graph_under_compile,
    bandwidth_main,
    bandwidth_rows,
    grad_calls,
)
from radd_fast.kernels.rotary import apply_rotary_qkv, rotary_tables  # noqa: E402


def _eager(qkv, cos, sin):
    # what a plain PyTorch model does: full-width tables, rot via cat, in qkv's dtype
    c, s = (torch.cat([t, t], -1).to(qkv.dtype)[None, :, None, None, :] for t in (cos, sin))
    qk = qkv[:, :, :2]
    x1, x2 = qk.chunk(2, -1)
    return torch.cat([qk * c + torch.cat([-x2, x1], -1) * s, qkv[:, :, 2:]], dim=2)


def _bytes(op, mode, B, T, h, hd, s):
    """Ideal traffic. Out of place: read and write all of qkv (3 B T h hd elements each way)
    plus the fp32 tables (2 T hd/2); bwd the same on dqkv. In place: q and k only (2 of 3)."""
    tables = 2 * T * (hd // 2) * 4
    if op == "rotary_qkv_":
        return 2 * (2 * B * T * h * hd * s) + tables
    one = 2 * (3 * B * T * h * hd * s) + tables
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode]


def run(device, quick: bool) -> list:
    """Rows of {op, shape, dtype, provider, mode, ms, gbps, peak_mb}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        allow_retain_graph_under_compile()
    if quick or not cuda:
        shapes, dtypes = [(1, 5, 2, 16)], [torch.float32]
    else:  # small (h 12) and medium (h 16) model, hd 64, batch x 1024 tokens
        shapes, dtypes = [(32, 1024, 12, 64), (8, 1024, 16, 64)], [torch.bfloat16]
    rows = []
    for B, T, h, hd in shapes:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        cos, sin = rotary_tables(T, inv_freq, device)
        for dtype in dtypes:
            s = torch.finfo(dtype).bits // 8
            label, shape = str(dtype).replace("torch.", ""), f"[{B}, {T}, 3, {h}, {hd}]"
            qkv = torch.randn(B, T, 3, h, hd, device=device, dtype=dtype, requires_grad=True)
            providers = [("ours", apply_rotary_qkv), ("eager", _eager)]
            if cuda and not quick:
                providers.append(("compile", torch.compile(_eager)))
            for provider, fn in providers:
                rows += bandwidth_rows(grad_calls(fn, (qkv, cos, sin)), device,
                                       lambda mode: _bytes("rotary_qkv", mode, B, T, h, hd, s), cpu_reps=1,
                                       op="rotary_qkv", shape=shape, dtype=label, provider=provider)
            work = qkv.detach().clone()

            def inplace():
                with torch.no_grad():
                    apply_rotary_qkv(work, cos, sin, inplace=True)

            rows += bandwidth_rows({"fwd": inplace}, device, lambda mode: _bytes("rotary_qkv_", mode, B, T, h, hd, s),
                                   cpu_reps=1, op="rotary_qkv_", shape=shape, dtype=label, provider="ours")
    return rows


if __name__ == "__main__":
    bandwidth_main(run, __doc__.splitlines()[0])

"""Benchmark LayerNormWot (and the fused residual form) against eager and torch.compile.

    python -m benchmarks.bench_layer_norm            # CUDA sweep, markdown table
    python -m benchmarks.bench_layer_norm --quick    # tiny shapes, ours + eager (CPU: interpreter)

Providers: ours (Triton), eager (the published LayerNormWot in PyTorch), compile
(torch.compile of eager). Modes: fwd, bwd, fwd+bwd. Time is the median (do_bench on
CUDA, perf_counter on CPU, where interpreter timings mean nothing); GB/s uses the ideal
bytes below (each tensor read or written once), so it is comparable across providers.
"""

import torch

# benchmarks/__init__.py turns the Triton interpreter on where there is no GPU.
from benchmarks.timing import (  # noqa: E402
    allow_retain_graph_under_compile,
    bandwidth_main,
    bandwidth_rows,
    grad_calls,
)
from radd_fast.kernels.layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref  # noqa: E402


def _eager_ln(x, w, b, out_dtype):
    return layer_norm_ref(x, w, b).to(out_dtype)


def _eager_add_ln(x, delta, w, b, out_dtype):
    new_x, normed = add_layer_norm_ref(x, delta, w, b)
    return new_x, normed.to(out_dtype)


def _ours_ln(x, w, b, out_dtype):
    return layer_norm(x, w, b, out_dtype=out_dtype)


def _ours_add_ln(x, delta, w, b, out_dtype):
    return add_layer_norm(x, delta, w, b, out_dtype=out_dtype)


def _bytes(op, mode, n, d, s_x, s_y, s_w=4):
    """Ideal traffic. layer_norm fwd: read x, write y, w+b, mean+rstd (8 B/row);
    bwd: read x, dy, mean+rstd, w, write dx, dw, db.
    add_layer_norm (s_y = delta's and normed's size, x/new_x fp32 = s_x) fwd: read x, delta,
    write new_x, normed; bwd: read dnew_x, dnormed, new_x, mean+rstd, w, write dx, ddelta, dw, db."""
    if op == "layer_norm":
        fwd = n * d * (s_x + s_y) + 2 * d * s_w + 8 * n
        bwd = n * d * (s_x + s_y + s_x) + 8 * n + 3 * d * s_w
    else:
        fwd = n * d * (2 * s_x + 2 * s_y) + 2 * d * s_w + 8 * n
        bwd = n * d * (3 * s_x + 2 * s_y) + 8 * n + 3 * d * s_w
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def run(device, quick: bool) -> list:
    """Rows of {op, shape, dtype, provider, mode, ms, gbps, peak_mb}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        allow_retain_graph_under_compile()
    if quick or not cuda:
        shapes, dtypes = [(8, 64)], [("fp32", torch.float32, torch.float32)]
    else:
        shapes = [(n, d) for n in (4096, 32768) for d in (768, 1024)]
        # x dtype -> normed dtype: all-bf16, and the model's fp32 stream -> bf16 GEMM input
        dtypes = [("bf16", torch.bfloat16, torch.bfloat16), ("fp32->bf16", torch.float32, torch.bfloat16)]
    rows = []
    for n, d in shapes:
        for label, x_dtype, y_dtype in dtypes:
            s_x, s_y = torch.finfo(x_dtype).bits // 8, torch.finfo(y_dtype).bits // 8
            x = torch.randn(n, d, device=device, dtype=x_dtype, requires_grad=True)
            delta = torch.randn(n, d, device=device, dtype=y_dtype, requires_grad=True)
            w = torch.ones(d, device=device, requires_grad=True)
            b = torch.ones(d, device=device, requires_grad=True)
            providers = [("ours", _ours_ln, _ours_add_ln), ("eager", _eager_ln, _eager_add_ln)]
            if cuda and not quick and (n, d) == (32768, 768):  # compile: the target shape only (compile time)
                providers.append(("compile", torch.compile(_eager_ln), torch.compile(_eager_add_ln)))
            for provider, ln_fn, add_fn in providers:
                runs = [("layer_norm", lambda x, w, b: ln_fn(x, w, b, y_dtype), (x, w, b))]
                if x_dtype == torch.float32:  # the fused form as the model calls it: fp32 stream
                    runs.append(("add_layer_norm", lambda x, dl, w, b: add_fn(x, dl, w, b, y_dtype), (x, delta, w, b)))
                for op, fn, inputs in runs:
                    rows += bandwidth_rows(grad_calls(fn, inputs), device,
                                           lambda mode, op=op: _bytes(op, mode, n, d, s_x, s_y), cpu_reps=1,
                                           op=op, shape=f"[{n}, {d}]", dtype=label, provider=provider)
    return rows


if __name__ == "__main__":
    bandwidth_main(run, __doc__.splitlines()[0])

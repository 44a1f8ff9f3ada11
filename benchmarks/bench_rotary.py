"""Benchmark the packed-qkv rotary kernel against eager and torch.compile.

    python benchmarks/bench_rotary.py            # CUDA sweep, markdown table
    python benchmarks/bench_rotary.py --quick    # tiny shapes, ours + eager (CPU: interpreter)

Providers: ours (Triton), eager (the published formula in qkv's dtype), compile
(torch.compile of eager). Modes: fwd, bwd, fwd+bwd; op ``rotary_qkv_`` is the in-place
inference call (fwd only). Time is the median (do_bench on CUDA, perf_counter on CPU,
where interpreter timings mean nothing); GB/s from the ideal bytes in ``_bytes``.
"""
import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

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


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_median(fn, reps=1):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_median


def _peak_mb(fn, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(device, quick: bool) -> list:
    """Rows of {op, shape, dtype, provider, mode, ms, gbps, peak_mb}."""
    device = torch.device(device)
    timer = _timer(device)
    cuda = device.type == "cuda"
    if cuda:  # compiled backwards donate buffers, which forbids retain_graph (our "bwd" timing)
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
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
                y = fn(qkv, cos, sin)
                dy = torch.randn_like(y)
                modes = (
                    ("fwd", lambda: fn(qkv, cos, sin)),
                    ("bwd", lambda: torch.autograd.grad(y, qkv, dy, retain_graph=True)),
                    ("fwd+bwd", lambda: torch.autograd.grad(fn(qkv, cos, sin), qkv, dy)),
                )
                for mode, f in modes:
                    ms = timer(f)
                    rows.append(dict(op="rotary_qkv", shape=shape, dtype=label, provider=provider, mode=mode, ms=ms,
                                     gbps=_bytes("rotary_qkv", mode, B, T, h, hd, s) / ms / 1e6,
                                     peak_mb=_peak_mb(f, device)))
            work = qkv.detach().clone()

            def inplace():
                with torch.no_grad():
                    apply_rotary_qkv(work, cos, sin, inplace=True)

            ms = timer(inplace)
            rows.append(dict(op="rotary_qkv_", shape=shape, dtype=label, provider="ours", mode="fwd", ms=ms,
                             gbps=_bytes("rotary_qkv_", "fwd", B, T, h, hd, s) / ms / 1e6,
                             peak_mb=_peak_mb(inplace, device)))
    return rows


def to_markdown(rows) -> str:
    lines = ["| op | shape | dtype | provider | mode | ms | GB/s | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['mode']} | "
                     f"{r['ms']:.4f} | {r['gbps']:.1f} | {r['peak_mb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (what the CPU runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(to_markdown(run(args.device, args.quick)))

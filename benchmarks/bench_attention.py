"""Attention benchmark: our Triton kernel vs each SDPA backend vs flash-attn.

    python -m benchmarks.bench_attention            # CUDA: RADD sizes; CPU: tiny
    python -m benchmarks.bench_attention --quick    # one size
    python -m benchmarks.bench_attention --sweep    # also sweep Triton tile configs

FLOPs (matmul only, non-causal): fwd = 4 * B * h * T^2 * hd (QK^T and PV);
bwd = 2.5 x fwd (five T^2 matmuls: recomputed QK^T, dV, dP, dQ, dK);
fwd+bwd = 3.5 x fwd. TFLOP/s = FLOPs / median time.
Providers: "triton" (rotary off / on), "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"
(one SDPA backend each), "sdpa+rotary" (PyTorch's default SDPA choice after two
rotary passes: what the model would run without our kernel), "flash_attn" when
installed, "reference" on CPU only.
"""
import argparse
import json

import torch

from benchmarks.timing import grad_calls, median_ms
from radd_fast.kernels import flash_attention as fa
from radd_fast.kernels.attention import _flash_attn_ok, attention, attention_ref

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                     "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
except ImportError:  # torch < 2.3: only the default SDPA choice
    SDPA_BACKENDS = {}

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def flops(B, T, h, hd, mode):
    return 4 * B * h * T * T * hd * FLOP_FACTOR[mode]


def rotary_tables(T, hd, device):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def providers(device, dtype, hd):
    """name -> (callable(qkv, cos, sin) -> out, uses_rotary)."""
    p = {}
    if device == "cuda" or fa.interpreter_on():
        p["triton"] = (lambda x, c, s: attention(x, impl="triton"), False)
        p["triton+rotary"] = (lambda x, c, s: attention(x, impl="triton", cos=c, sin=s), True)
    if device == "cuda":
        for name, backend in SDPA_BACKENDS.items():
            p[name] = (lambda x, c, s, b=backend: _sdpa_with(b, x), False)
    p["sdpa+rotary"] = (lambda x, c, s: attention(x, impl="sdpa", cos=c, sin=s), True)
    probe = torch.empty(1, 1, 3, 1, hd, device=device, dtype=dtype)
    if _flash_attn_ok(probe):
        p["flash_attn"] = (lambda x, c, s: attention(x, impl="flash_attn"), False)
    if device == "cpu":
        p["reference"] = (lambda x, c, s: attention_ref(x, c, s), True)
    return p


def _sdpa_with(backend, qkv):
    with sdpa_kernel(backend):
        return attention(qkv, impl="sdpa")


def _time_modes(fn, qkv, device):
    """ms per mode for out = fn(qkv); the backward replays one saved graph."""
    calls = grad_calls(fn, (qkv.detach().requires_grad_(True),))
    return {mode: median_ms(call, device) for mode, call in calls.items()}


def run(device: str = "cuda", quick: bool = False) -> list:
    """Rows: impl, B, T, h, hd, dtype, mode, ms (median), tflops."""
    device = torch.device(device).type  # benchmarks.run passes a torch.device; compare by type below
    if device == "cuda":
        dtype = torch.bfloat16
        # RADD small (h 12) and medium (h 16) at hd 64; one hd 128 point.
        shapes = [(32, 1024, 12, 64)] if quick else [(32, 1024, 12, 64), (16, 1024, 16, 64), (8, 2048, 12, 64),
                                                      (64, 256, 12, 64), (16, 1024, 8, 128)]
    else:  # the interpreter runs the Triton kernel in numpy: tiny only
        dtype = torch.float32
        shapes = [(1, 64, 2, 32)] if quick else [(1, 64, 2, 32), (2, 128, 2, 64)]
    rows = []
    for B, T, h, hd in shapes:
        qkv = torch.randn(B, T, 3, h, hd, device=device, dtype=dtype)
        cos, sin = rotary_tables(T, hd, device)
        for name, (fn, _) in providers(device, dtype, hd).items():
            try:
                ms = _time_modes(lambda x, fn=fn: fn(x, cos, sin), qkv, device)
            except RuntimeError as e:  # e.g. an SDPA backend that rejects this shape or GPU: shown, not hidden
                rows.append(dict(impl=name, B=B, T=T, h=h, hd=hd, dtype=str(dtype).split(".")[-1], mode="-",
                                 ms=float("nan"), tflops=float("nan"), error=str(e).splitlines()[0][:80]))
                continue
            for mode in MODES:
                rows.append(dict(impl=name, B=B, T=T, h=h, hd=hd, dtype=str(dtype).split(".")[-1], mode=mode,
                                 ms=ms[mode], tflops=flops(B, T, h, hd, mode) / ms[mode] * 1e-9))
        rows += _inference_rows(qkv, cos, sin, device)
    return rows


def _inference_rows(qkv, cos, sin, device) -> list:
    """The sampler's call (no autograd): rotary out of place then SDPA, against rotary in place
    (``overwrite_qkv``: no copy of v). In place rotates the same buffer again on every call, which
    changes its values, not its cost."""
    B, T, _, h, hd = qkv.shape
    work = qkv.clone()
    rows = []
    with torch.no_grad():
        for name, overwrite in (("sdpa+rotary", False), ("sdpa+rotary in place", True)):
            ms = median_ms(lambda o=overwrite: attention(work, impl="sdpa", cos=cos, sin=sin, overwrite_qkv=o), device)
            rows.append(dict(impl=name, B=B, T=T, h=h, hd=hd, dtype=str(qkv.dtype).split(".")[-1], mode="inference",
                             ms=ms, tflops=flops(B, T, h, hd, "fwd") / ms * 1e-9))
    return rows


def sweep_configs(B=32, T=1024, h=12, hd=64, dtype=torch.bfloat16, rotary=True, device="cuda") -> list:
    """Time Triton tile configs directly through the launchers (meant for CUDA)."""
    qkv = torch.randn(B, T, 3, h, hd, device=device, dtype=dtype)
    cos, sin = rotary_tables(T, hd, device) if rotary else (None, None)
    out, lse = fa.flash_attention_forward(qkv, cos, sin)
    dout = torch.randn_like(out)
    fwd_cfgs = [fa.FwdConfig(128, 64, 8, 3), fa.FwdConfig(128, 64, 4, 3), fa.FwdConfig(128, 128, 8, 3),
                fa.FwdConfig(64, 64, 4, 3), fa.FwdConfig(128, 64, 8, 4), fa.FwdConfig(128, 32, 4, 3)]
    base = fa.default_bwd_config(hd, dtype, qkv.device, rotary=rotary)  # the launcher's own choice for this card
    dkdv = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 2)]
    dq = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2)]
    bwd_cfgs = [fa.BwdConfig(*c, *_dq_part(base)) for c in dkdv] + \
               [fa.BwdConfig(*_dkdv_part(base), *c) for c in dq]
    rows = []
    for cfg in fwd_cfgs:
        rows.append(_sweep_row("fwd", cfg, lambda c=cfg: fa.flash_attention_forward(qkv, cos, sin, out=out, config=c),
                               flops(B, T, h, hd, "fwd"), device))
    for cfg in bwd_cfgs:
        rows.append(_sweep_row("bwd", cfg, lambda c=cfg: fa.flash_attention_backward(dout, qkv, out, lse, cos, sin, config=c),
                               flops(B, T, h, hd, "bwd"), device))
    return rows


def _dkdv_part(c):
    return (c.block_m1, c.block_n1, c.num_warps1, c.num_stages1)


def _dq_part(c):
    return (c.block_m2, c.block_n2, c.num_warps2, c.num_stages2)


def _sweep_row(mode, cfg, fn, n_flops, device):
    try:
        ms = median_ms(fn, device)
    except Exception as e:  # out of shared memory / registers for this tile: reported in the table
        return dict(mode=mode, config=str(cfg), ms=float("nan"), tflops=float("nan"), error=type(e).__name__)
    return dict(mode=mode, config=str(cfg), ms=ms, tflops=n_flops / ms * 1e-9)


def markdown(rows) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also sweep Triton tile configs (CUDA)")
    ap.add_argument("--json", default=None, help="write all rows here")
    args = ap.parse_args()
    env = f"torch {torch.__version__}"
    if args.device == "cuda":
        import triton
        env += f", triton {triton.__version__}, {torch.cuda.get_device_name()}"
    print(env)
    result = {"env": env}
    if args.sweep and args.device == "cuda":
        result["sweep"] = sweep_configs()
        print(markdown(result["sweep"]), "\n", flush=True)
    result["rows"] = run(args.device, args.quick)
    print(markdown(result["rows"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

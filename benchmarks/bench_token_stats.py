"""Benchmark: the one-pass token statistics kernel (token, log-prob, entropy) vs the unfused head.

    python -m benchmarks.bench_token_stats [--quick] [--device cuda]

Providers: `kernel` (``token_stats``: logits, online log-sum-exp and entropy and the Gumbel-max
draw in one pass over the vocabulary), `eager` (what a decoder would write in PyTorch: [N, V-1]
logits in the inputs' dtype, fp32 log-softmax, probabilities, p log p, Gumbel noise from
torch, argmax), `compiled` (torch.compile of eager; CUDA only) and `reference`
(``token_stats_ref``: fp32 logits, the kernel's noise materialised, fp64 statistics: the
tests' oracle, timed for completeness).

Shapes on CUDA: the RADD-small head (d 768, V-1 = 50257, bf16) at N masked positions an
adaptive decoder scores in one evaluation: 128 (a few rows late in sampling), 2048 and 16384
(16 rows of 1024 at the start). CPU: a tiny fp32 shape through the Triton interpreter, to prove
the benchmark runs (its times mean nothing).

Derived figures, the same formula for every provider so they compare like for like:
    bytes  = N d e + (V-1)(d + 1) e + 16 N      read h, W, b once, write token (8 B), log p, H (4 B each)
    FLOPs  = 2 N d (V-1)                         the logits GEMM
GB/s = bytes / time (the kernel re-reads W per row tile, mostly from L2: at large N the op is
GEMM-bound and TFLOP/s is the figure that matters), rows/s = N / time; peak extra MiB above the
inputs (CUDA); agreement with the reference: the fraction of equal tokens (same key; eager draws
its own noise, so its fraction is chance) and the largest entropy difference.
"""
from __future__ import annotations

import torch

# benchmarks/__init__.py turns the Triton interpreter on where there is no GPU.
from benchmarks.run import table_main  # noqa: E402
from benchmarks.timing import median_ms, peak_memory_mb  # noqa: E402
from radd_fast.kernels.token_stats import TokenStats, token_stats, token_stats_ref  # noqa: E402

KEY = 12345


def eager(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> TokenStats:
    """The unfused statistics in PyTorch, fp32: every [N, V-1] intermediate materialised."""
    logits = (h @ w.t() + b).float()
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    u = torch.rand_like(logits).clamp_min_(torch.finfo(torch.float32).tiny)
    tokens = (logits - u.log_().neg_().log_()).argmax(dim=-1)
    return TokenStats(tokens, logp.gather(-1, tokens[:, None]).squeeze(-1), entropy)


def _inputs(N: int, d: int, V: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, d, device=device, generator=g).to(dtype)
    w = (torch.randn(V, d, device=device, generator=g) * (2.0 / d**0.5)).to(dtype)
    b = (torch.randn(V, device=device, generator=g) * 0.1).to(dtype)
    return h, w, b


def _shapes(device: torch.device, quick: bool) -> tuple[list[int], int, int, torch.dtype]:
    if device.type == "cuda":
        return ([128, 2048] if quick else [128, 2048, 16384]), 768, 50257, torch.bfloat16
    return [64], 32, 500, torch.float32


def _rows_at(N: int, d: int, V: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    h, w, b = _inputs(N, d, V, dtype, device)
    ref = token_stats_ref(h, w, b, KEY)
    providers = {"kernel": lambda: token_stats(h, w, b, KEY), "eager": lambda: eager(h, w, b),
                 "reference": lambda: token_stats_ref(h, w, b, KEY)}
    if device.type == "cuda":
        compiled = torch.compile(eager, dynamic=False)
        providers["compiled"] = lambda: compiled(h, w, b)
    e = torch.finfo(dtype).bits // 8
    n_bytes = N * d * e + V * (d + 1) * e + 16 * N
    flops = 2 * N * d * V
    rows = []
    for name, call in providers.items():
        out = call()  # warm-up (compilation) and the agreement check
        ms = median_ms(call, device)
        rows.append(dict(
            provider=name, N=N, d=d, vocab=V, dtype=str(dtype).replace("torch.", ""),
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
            ms=ms, rows_per_s=N / ms * 1e3, gbs=n_bytes / ms / 1e6, tflops=flops / ms / 1e9,
            peak_extra_mib=peak_memory_mb(call, device),
            tokens_equal_ref=float((out.tokens == ref.tokens).float().mean()),
            max_entropy_diff=float((out.entropy.double() - ref.entropy.double()).abs().max()),
        ))
    eager_ms = next(r["ms"] for r in rows if r["provider"] == "eager")
    for r in rows:
        r["speedup_vs_eager"] = eager_ms / r["ms"]
    return rows


def run(device, quick: bool) -> list[dict]:
    """One row per (N, provider): ms, rows/s, GB/s, TFLOP/s, peak extra MiB, agreement with the reference."""
    device = torch.device(device)
    ns, d, V, dtype = _shapes(device, quick)
    rows = []
    for N in ns:
        rows += _rows_at(N, d, V, dtype, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    table_main(run, __doc__)

"""The approximate sampler's attention: a few query rows per sequence against L cached keys (issue 15).

    python -m benchmarks.bench_cached_attention            # CUDA: RADD-small cache, bf16
    python -m benchmarks.bench_cached_attention --quick    # tiny, CPU (proves it runs; times mean nothing)

A cached evaluation (``DDiTBlock.forward_cached``) pushes S positions per row and attends over
the row's L cached keys and values, read in place from the cache ``[B, L + 1, h, hd]`` (strided
views, no gather). The work is a read of the cache: memory-bound, so the yardstick is bytes of
K and V over time (GB/s). Providers, at S = 1 .. 32:

- ``sdpa views``: what the block runs, SDPA on the strided cache views;
- ``sdpa contiguous``: SDPA on contiguous [B, h, L, hd] copies (copy not timed: what a
  head-major cache layout would give);
- ``matmul``: softmax(q k^T / sqrt(hd)) v written out (two batched matmuls).

A decode-style kernel (split over L, as flash-decoding does) is worth writing only if these
stay far from the card's bandwidth at small S; this table says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.run import table_main
from benchmarks.timing import median_ms


def _views(cache_k, cache_v):
    L1 = cache_k.shape[1]
    return cache_k[:, :L1 - 1].transpose(1, 2), cache_v[:, :L1 - 1].transpose(1, 2)  # [B, h, L, hd]


def _matmul_attention(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1), v)


def run(device, quick: bool) -> list:
    """Rows of {B, L, h, hd, S, dtype, provider, ms, gbps, max_err}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    B, L, h, hd = (64, 1024, 12, 64) if cuda and not quick else (3, 37, 2, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    queries = (1, 2, 4, 8, 16, 32) if cuda and not quick else (1, 5)
    g = torch.Generator(device="cpu").manual_seed(0)
    cache_k = torch.randn(B, L + 1, h, hd, generator=g).to(device, dtype)
    cache_v = torch.randn(B, L + 1, h, hd, generator=g).to(device, dtype)
    k, v = _views(cache_k, cache_v)
    k_c, v_c = k.contiguous(), v.contiguous()
    kv_bytes = 2 * B * L * h * hd * cache_k.element_size()
    rows = []
    for S in queries:
        q = torch.randn(B, h, S, hd, generator=g).to(device, dtype)
        ref = _matmul_attention(q.double(), k.double(), v.double())
        providers = {"sdpa views": lambda: F.scaled_dot_product_attention(q, k, v),
                     "sdpa contiguous": lambda: F.scaled_dot_product_attention(q, k_c, v_c),
                     "matmul": lambda: _matmul_attention(q, k, v)}
        for name, fn in providers.items():
            with torch.no_grad():
                err = (fn().double() - ref).abs().max().item()
                ms = median_ms(fn, device)
            rows.append({"B": B, "L": L, "h": h, "hd": hd, "S": S, "dtype": str(dtype).replace("torch.", ""),
                         "provider": name, "ms": ms, "gbps": kv_bytes / ms / 1e6, "max_err": err})
    return rows


if __name__ == "__main__":
    table_main(run, __doc__)

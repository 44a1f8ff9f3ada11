"""The cached-attention benchmark (benchmarks/bench_cached_attention.py) at tiny sizes on CPU."""
import torch

from benchmarks import bench_cached_attention


def test_cached_attention_benchmark_agrees_with_float64():
    """The approximate sampler's attention providers all compute the same attention (fp32 on CPU)."""
    rows = bench_cached_attention.run(torch.device("cpu"), quick=True)
    assert {r["provider"] for r in rows} == {"sdpa views", "sdpa contiguous", "matmul"}
    assert all(r["max_err"] < 1e-5 and r["gbps"] > 0 for r in rows)

"""The MLP epilogue benchmark (benchmarks/bench_mlp_epilogue.py) at tiny sizes on CPU."""
import torch

from benchmarks import bench_mlp_epilogue


def test_mlp_epilogue_benchmark_compares_three_providers_with_their_errors():
    """The epilogue-fusion choice is a measurement: every provider's row, and its error
    against fp32 (on the CPU in fp32: eager is the reference itself, compile within rounding)."""
    rows = {r["provider"]: r for r in bench_mlp_epilogue.run(torch.device("cpu"), quick=True)}
    assert set(rows) == {"eager", "addmm_activation", "compile"}
    assert rows["eager"]["max_err"] == 0.0 and rows["eager"]["speedup"] == 1.0
    assert rows["compile"]["max_err"] < 1e-5 and all(r["ms"] > 0 for r in rows.values())

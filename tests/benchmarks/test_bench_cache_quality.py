"""benchmarks/bench_cache_quality.py: the approximate sampler's teacher-forced KL against the exact model."""
import pytest

from radd_fast import LogLinearNoise
from tests.support.models import normal_head_model


def test_the_quality_benchmark_measures_no_kl_where_caching_is_exact():
    """benchmarks/bench_cache_quality.py's teacher-forced KL: 0 at r = 1, ~0 on a one-block model
    (caching exact there), > 0 with two blocks and no refresh; body fractions as the engine counts."""
    bench = pytest.importorskip("benchmarks.bench_cache_quality")
    one, two = normal_head_model(n_blocks=1, length=12), normal_head_model(n_blocks=2, length=12)
    kl_one = bench.teacher_forced_kl(one, LogLinearNoise(), 4, 12, 8, [1, 3, bench.NEVER], seed=0)
    kl_two = bench.teacher_forced_kl(two, LogLinearNoise(), 4, 12, 8, [1, 3, bench.NEVER], seed=0)
    assert kl_one[1]["kl"] == kl_two[1]["kl"] == 0.0 and kl_one[1]["tf_body_fraction"] == 1.0
    # exact caching leaves only fp32 rounding of the log-probs (+-4e-9 on this project's CPUs, and
    # its sign varies by CPU): 1e-6 is far above that and far below the inexact two-block KL (~1e-3)
    assert abs(kl_one[3]["kl"]) < 1e-6 and abs(kl_one[bench.NEVER]["kl"]) < 1e-6
    assert kl_two[bench.NEVER]["kl"] > 1e-4
    assert 0 < kl_two[3]["tf_body_fraction"] < 1

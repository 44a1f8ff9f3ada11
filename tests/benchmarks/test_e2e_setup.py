"""The end-to-end benchmark's plans and rows (benchmarks/e2e_setup.py): how the sizes set the samplers'
runs, and a failing provider reported in its row without a ratio."""
from __future__ import annotations

from benchmarks import e2e_setup


def test_plans_size_the_samplers():
    small = e2e_setup.PLANS["small"]
    assert e2e_setup.samples_for(small.cached_samples, 1024) == 16
    assert e2e_setup.samples_for(small.cached_samples, 4096) == 8
    assert e2e_setup.samples_for(small.nocache_samples, 4096) == 0  # not run: minutes at 4096 steps
    assert small.fast_samples == small.rows_per_eval == 64
    assert small.train_batch == 32  # the training targets are at B = 32 x 1024
    assert small.reference_max_steps == 1024 and e2e_setup.PLANS["quick"].reference_max_steps > 4096

def test_a_failing_provider_gets_an_error_row_and_no_ratio():
    def broken():
        raise RuntimeError("CUDA out of memory.\nTried to allocate 6 GiB")

    group = []
    e2e_setup.attempt(group, {"provider": "published"}, broken)
    e2e_setup.attempt(group, {"provider": "reference"}, lambda: {"s": 2.0})
    e2e_setup.attempt(group, {"provider": "fast"}, lambda: {"s": 0.5})
    e2e_setup.add_ratios(group, lambda r: r["s"])
    assert group[0] == {"provider": "published", "error": "RuntimeError: CUDA out of memory. Tried to allocate 6 GiB"}
    assert group[2]["vs reference"] == 4.0 and "vs published" not in group[2]

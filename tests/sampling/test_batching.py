"""The batching plan (radd_fast/sampling/batching.py): every evaluation once and in order, the
power-of-two buckets, and small plans written out by hand."""
import numpy as np
import pytest

from radd_fast.sampling.batching import bucket, plan_ticks


@pytest.mark.parametrize("buckets", [True, False])
def test_plan_runs_every_evaluation_once_in_order(buckets):
    rng = np.random.default_rng(0)
    K = rng.integers(0, 9, size=57)
    plan = plan_ticks(K, batch_size=8, pad_row=57, buckets=buckets)
    seen = {}
    for t in range(plan.ticks):
        rows, ks = plan.rows[t], plan.k[t]
        active = rows != 57
        assert active.sum() == plan.active[t] and active[: plan.active[t]].all()  # active first
        assert plan.batch[t] >= plan.active[t] and plan.batch[t] <= 8
        if buckets:
            assert plan.batch[t] in (1, 2, 4, 8)
        assert len(set(rows[active].tolist())) == active.sum()  # a row once per tick
        for r, k in zip(rows[active], ks[active]):
            assert seen.get(int(r), -1) == k - 1  # its evaluations in order, one per tick
            seen[int(r)] = int(k)
    assert {r: k + 1 for r, k in seen.items()} == {r: int(k) for r, k in enumerate(K) if k > 0}
    assert plan.active.sum() == K.sum() and (plan.active[: plan.ticks - 10] == 8).all()  # full until the tail


def test_bucket_is_the_next_power_of_two_capped():
    assert bucket(np.array([1, 2, 3, 4, 5, 8, 9]), 8).tolist() == [1, 2, 4, 4, 8, 8, 8]
    assert int(bucket(0, 4)) == 1 and int(bucket(3, 2)) == 2 and int(bucket(17, 64)) == 32


def test_plan_ticks_small_cases_by_hand():
    plan = plan_ticks(np.array([3, 1, 2]), batch_size=2, pad_row=3)  # the docstring's example
    assert plan.ticks == 3 and plan.rows.tolist() == [[0, 1], [0, 2], [0, 2]]
    assert plan.k.tolist() == [[0, 0], [1, 0], [2, 1]] and plan.k.dtype == np.int32
    assert plan.active.tolist() == [2, 2, 2] and plan.batch.tolist() == [2, 2, 2]
    # slots free at ticks 1, 1, 1, 1: rows 4 and 5 take slots 0 and 1, then the tail shrinks
    plan = plan_ticks(np.array([1, 1, 1, 1, 1, 3]), batch_size=4, pad_row=9)
    assert plan.rows.tolist() == [[0, 1, 2, 3], [4, 5, 9, 9], [5, 9, 9, 9], [5, 9, 9, 9]]
    assert plan.k.tolist() == [[0, 0, 0, 0], [0, 0, -2, -2], [1, -2, -2, -2], [2, -2, -2, -2]]
    assert plan.active.tolist() == [4, 2, 1, 1] and plan.batch.tolist() == [4, 2, 1, 1]
    plan = plan_ticks(np.array([1, 1, 1, 2]), batch_size=8, pad_row=4, buckets=True)  # B = 4 rows
    assert plan.rows.shape == (2, 4) and plan.active.tolist() == [4, 1] and plan.batch.tolist() == [4, 1]
    plan = plan_ticks(np.array([2, 2, 2, 1]), batch_size=4, pad_row=5, buckets=False)
    assert plan.active.tolist() == [4, 3] and plan.batch.tolist() == [4, 3]
    plan = plan_ticks(np.array([2, 2, 2, 1]), batch_size=4, pad_row=5, buckets=True)
    assert plan.batch.tolist() == [4, 4]


def test_plan_ticks_skips_rows_without_evaluations():
    plan = plan_ticks(np.array([0, 2, 0, 1]), batch_size=4, pad_row=7)
    assert plan.rows.tolist() == [[1, 3], [1, 7]] and plan.k.tolist() == [[0, 0], [1, -2]]
    assert plan.active.tolist() == [2, 1] and plan.batch.tolist() == [2, 1]
    empty = plan_ticks(np.zeros(5, dtype=np.int64), batch_size=4, pad_row=5)
    assert empty.ticks == 0 and empty.rows.shape == (0, 1) and empty.k.dtype == np.int32
    assert empty.active.shape == (0,) and empty.batch.shape == (0,)
    assert empty.rows.dtype == empty.active.dtype == empty.batch.dtype == np.int64


def test_plan_ticks_defaults_to_buckets_and_takes_float_counts():
    plan = plan_ticks(np.array([2, 2, 2, 1]), batch_size=4, pad_row=5)  # active [4, 3] -> bucket 4
    assert plan.batch.tolist() == [4, 4]
    as_float = plan_ticks(np.array([3.0, 1.0, 2.0]), batch_size=2, pad_row=3)  # counts from a float tensor
    assert as_float.rows.tolist() == [[0, 1], [0, 2], [0, 2]] and as_float.rows.dtype == np.int64


def test_done_tick_is_each_rows_last_evaluation():
    plan = plan_ticks(np.array([3, 1, 2, 0]), batch_size=2, pad_row=4)
    # row 0 at ticks 0-2; row 1 at tick 0, row 2 takes its slot at ticks 1-2; row 3 needs no evaluation
    assert plan.done_tick(4).tolist() == [2, 0, 2, -1]
    assert plan_ticks(np.zeros(2, np.int64), 2, pad_row=2).done_tick(2).tolist() == [-1, -1]

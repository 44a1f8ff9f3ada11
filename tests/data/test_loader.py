"""The resumable sharded loader (radd_fast/data/loader.py): the global batch split over ranks and
accumulation steps without overlap, an exact resume, and bad positions refused."""
import numpy as np
import pytest
import torch

from radd_fast.data import DataError, ResumableLoader, TokenBlocks


def blocks_of(n, length=2):
    return TokenBlocks(np.arange(n * length, dtype=np.int64), length, "numbers")

def test_loader_shards_the_global_batch_without_overlap():
    one = ResumableLoader(blocks_of(40), batch_size=8, seed=1)
    ranks = [ResumableLoader(blocks_of(40), batch_size=8, seed=1, rank=r, world=2, accum=2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        (_, full), = one.next_step()
        parts = {m: x for loader in ranks for m, x in loader.next_step()}
        assert sorted(parts) == [0, 1, 2, 3] and all(x.shape == (2, 2) for x in parts.values())
        assert torch.equal(torch.cat([parts[m] for m in range(4)]), full)
    assert one.state_dict() == {"epoch": 1, "batch": 2}

def test_loader_resumes_exactly_and_rejects_bad_positions():
    a = ResumableLoader(blocks_of(30), batch_size=4, seed=5)
    for _ in range(9):
        a.next_step()
    b = ResumableLoader(blocks_of(30), batch_size=4, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert torch.equal(a.next_step()[0][1], b.next_step()[0][1])
    with pytest.raises(DataError, match="does not fit this data source"):
        b.load_state_dict({"epoch": 0, "batch": 99})
    with pytest.raises(DataError, match="fewer than one batch"):
        ResumableLoader(blocks_of(3), batch_size=4)
    with pytest.raises(ValueError, match="not divisible"):
        ResumableLoader(blocks_of(30), batch_size=4, world=3)


def test_batch_must_split_over_ranks_and_accum():
    from radd_fast.data import check_batch_split

    assert check_batch_split(512, 8, 1) == 64
    with pytest.raises(ValueError, match="not divisible by ngpus x training.accum = 3 x 2 = 6"):
        check_batch_split(512, 3, 2)

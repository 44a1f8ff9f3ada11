"""Two gloo ranks on 127.0.0.1 agree with one process on the same global batch (radd_fast/distributed.py
under the training loop).

Per-micro-batch randomness is keyed on the micro-batch's index in the global
batch, so 2 ranks x accum 1 and 1 rank x accum 2 draw the same data, masks and
dropout; only float summation order differs (the gradient all-reduce).
"""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radd_fast.training import train
from tests.support.runs import assert_same_state, ddp_worker, free_port, load_meta, tiny_config


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_two_ranks_match_one_process(tmp_path):
    single = train(tiny_config(tmp_path, training={"accum": 2, "n_iters": 4}), tmp_path / "single")
    cfg = tiny_config(tmp_path, training={"accum": 1, "n_iters": 4})
    out = tmp_path / "ddp.json"
    mp.spawn(ddp_worker, args=(2, free_port(), cfg, str(tmp_path / "ddp"), str(out)), nprocs=2, join=True)
    ddp = json.loads(out.read_text())
    assert ddp["step"] == single["step"] == 4
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ddp["eval_losses"]),
                               torch.tensor(single["eval_losses"]), rtol=1e-5, atol=1e-6)
    ckpt = load_meta(tmp_path / "ddp")
    assert ckpt["world"] == 2 and "rng" not in ckpt  # generators are reseeded per micro-batch, not restored
    assert_same_state(ckpt, load_meta(tmp_path / "single"), exact=False, atol=1e-5)

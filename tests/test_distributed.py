"""radd_fast/distributed.py, the one distributed idiom: a DistEnv per process, from torchrun, from ranks
spawned on this machine (eval.py --ngpus) or from a caller's group, and the collectives on it. Two gloo
ranks on 127.0.0.1 agree with one process on the same global batch under the training loop.

Per-micro-batch randomness is keyed on the micro-batch's index in the global
batch, so 2 ranks x accum 1 and 1 rank x accum 2 draw the same data, masks and
dropout; only float summation order differs (the gradient all-reduce).
"""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radd_fast.config import ConfigError
from radd_fast.distributed import DistEnv, broadcast_object, gather_objects, group_env, shard, spawn_local_ranks
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


def test_shard_is_round_robin_by_rank():
    items = list(range(7))
    assert [shard(items, DistEnv(rank=r, world=3)) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard(items, DistEnv()) == items  # one process: everything


def test_one_process_needs_no_group():
    env = group_env("cpu")
    assert (env.rank, env.local_rank, env.world, env.device, env.is_main) == (0, 0, 1, torch.device("cpu"), True)
    assert gather_objects({"a": 1}, env) == [{"a": 1}] and broadcast_object("x", env) == "x"


def test_group_env_is_the_place_in_the_group_a_caller_joined(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    env = group_env("cpu")
    assert (env.rank, env.local_rank, env.world, env.is_main) == (3, 3, 4, False)  # spawned locally: local = rank
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert group_env(torch.device("cpu")).local_rank == 1  # torchrun says it


def _report(env: DistEnv, folder: str) -> None:
    """One spawned rank: what its DistEnv says, and what the collectives give it."""
    record = {"env": [env.rank, env.local_rank, env.world, str(env.device)],
              "group": [group_env(env.device).rank, group_env(env.device).world],
              "gathered": gather_objects(env.rank * 10, env), "broadcast": broadcast_object(f"from {env.rank}", env),
              "shard": shard(list(range(5)), env)}
    with open(f"{folder}/rank{env.rank}.json", "w") as fh:
        json.dump(record, fh)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_spawned_local_ranks_each_get_their_dist_env(tmp_path):
    spawn_local_ranks(_report, 2, "cpu", str(tmp_path))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(records):
        assert rec["env"] == [r, r, 2, "cpu"] and rec["group"] == [r, 2]
        assert rec["gathered"] == [0, 10] and rec["broadcast"] == "from 0"
    assert [rec["shard"] for rec in records] == [[0, 2, 4], [1, 3]]


def test_more_ranks_than_gpus_are_refused_before_spawning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 ranks but only 1 CUDA device"):
        spawn_local_ranks(_report, 2, "cuda", "unused")

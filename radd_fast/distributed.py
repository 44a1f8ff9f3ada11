"""The one distributed idiom of training, sampling and evaluation: a ``DistEnv`` per process.

A process learns its place from one of three entries and then uses the same
few collectives (``barrier``, ``all_reduce_mean``, ``gather_objects``,
``broadcast_object``, ``shard``), which are no-ops for one process:

- ``init_distributed``: the torchrun environment (``train.py``, ``sample.py``):
  RANK / LOCAL_RANK / WORLD_SIZE, NCCL when CUDA is present (one GPU per local
  rank), gloo on CPU; one process: no process group.
- ``spawn_local_ranks``: N processes spawned on this machine (``eval.py --ngpus N``),
  rendezvous over TCP on 127.0.0.1 (a free port picked by the OS), the same backends.
- ``group_env``: a library call (``evaluate_ppl``) inside whatever group its caller joined.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistEnv:
    """Read RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                              "start at most as many ranks per node as GPUs (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, local_rank, world, dev)


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world > 1:
        dist.all_reduce(t)
        t = t / env.world
    return t


def cleanup(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def group_env(device) -> DistEnv:
    """This process's place in the process group it already joined (by torchrun, ``spawn_local_ranks`` or
    its caller), with ``device`` its device; one process when it joined none."""
    device = torch.device(device)
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv(device=device)
    rank = dist.get_rank()
    return DistEnv(rank, int(os.environ.get("LOCAL_RANK", rank)), dist.get_world_size(), device)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local_ranks(fn: Callable, world: int, device_type: str, *args) -> None:
    """Call ``fn(env, *args)`` on ``world`` processes spawned on this machine, each inside an initialised
    process group (``env`` its ``DistEnv``: rank = local rank, one GPU each on CUDA); raises if any rank
    fails. ``fn`` and ``args`` must be picklable (a module-level function)."""
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise ConfigError(f"{world} ranks but only {torch.cuda.device_count()} CUDA device(s) are visible")
    port = free_port()
    torch.multiprocessing.spawn(_spawned_rank, args=(world, device_type, port, fn, args), nprocs=world, join=True)


def _spawned_rank(rank: int, world: int, device_type: str, port: int, fn: Callable, args: tuple) -> None:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:  # N ranks share this CPU: split its threads instead of oversubscribing
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(DistEnv(rank, rank, world, device), *args)
    finally:
        dist.destroy_process_group()


def shard(items: list, env: DistEnv) -> list:
    """This rank's round-robin share of ``items`` (item i goes to rank i mod world; one process: all)."""
    return items[env.rank::env.world]


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` in rank order, on every rank (picklable objects; one process: ``[obj]``)."""
    if env.world == 1:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank (one process: ``obj``)."""
    if env.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

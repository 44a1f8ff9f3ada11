"""Run a function on N local ranks with torch.distributed (what ``eval.py --ngpus N`` uses).

Processes are spawned on this machine only and rendezvous over TCP on
127.0.0.1 (a free port picked by the OS). Backend: NCCL with one GPU per rank
on CUDA, gloo on CPU. ``ngpus == 1`` needs none of this: run in-process.
"""
from __future__ import annotations

import socket
from typing import Callable

import torch
import torch.distributed as dist

from .protocol import EvalError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable, world_size: int, device_type: str, *args) -> None:
    """Call ``fn(rank, world_size, device, *args)`` on ``world_size`` spawned processes, each inside an
    initialised process group; raises if any rank fails."""
    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise EvalError(f"--ngpus {world_size} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    port = free_port()
    torch.multiprocessing.spawn(_worker, args=(world_size, device_type, port, fn, args), nprocs=world_size,
                                join=True)


def _worker(rank: int, world_size: int, device_type: str, port: int, fn: Callable, args: tuple) -> None:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:  # N ranks share this CPU: split its threads instead of oversubscribing
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()


def shard(items: list, rank: int, world_size: int) -> list:
    """Round-robin share of ``items`` for ``rank`` (batch i goes to rank i mod world_size)."""
    return items[rank::world_size]

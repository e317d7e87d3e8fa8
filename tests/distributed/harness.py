"""Spawn a process group for a test: N processes (start method spawn), gloo or NCCL on a free 127.0.0.1 port.

A hang fails the test instead of blocking CI: collectives time out inside the group (`COLLECTIVE_TIMEOUT`), and
the parent kills the processes when the whole run exceeds its deadline.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=90)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, backend: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)  # N processes share the CI machine's 2 cores
    warnings.filterwarnings("ignore", message=".*DTensor random operators.*")
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT, device_id=device_id)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 180.0) -> None:
    """Run fn(rank, world_size, *args) in world_size fresh processes; raise if one fails or time runs out.

    fn must be importable by name (a module-level function), as spawned children import it.
    """
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), backend, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout:.0f} s")

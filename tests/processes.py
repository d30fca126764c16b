"""Run a function on N gloo processes (the CPU runtime) and collect what each rank returns."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def launch(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``fn(*args)`` on ``world_size`` spawned ranks; their return values, by rank."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_entry, args=(fn, world_size, port, folder, args), nprocs=world_size,
                           start_method="spawn", join=True)
        return [pickle.loads((Path(folder) / f"rank{r}.pkl").read_bytes()) for r in range(world_size)]


def _entry(rank: int, fn, world_size: int, port: int, folder: str, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    result = fn(*args)
    (Path(folder) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# Variables an earlier in-process fit may have left: a child process must start its own world.
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_environment() -> dict[str, str]:
    """This process's environment without torch.distributed's variables."""
    return {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}

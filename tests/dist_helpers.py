"""Run a function in N gloo processes on CPU (for distributed tests)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable, world: int, tmp_path: Path, *args) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo group."""
    init_file = tmp_path / f"init-{os.getpid()}-{fn.__name__}"
    mp.spawn(_worker, args=(world, str(init_file), fn, args), nprocs=world, join=True)

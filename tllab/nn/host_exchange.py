"""Low-latency all-gather of small vectors between CPU processes on one machine.

Synchronized BatchNorm exchanges a few hundred numbers per layer and direction. Through gloo each
exchange is handed to gloo's own threads, which on a busy machine costs milliseconds of
scheduling; here the ranks write into a shared-memory file and spin until every rank's sequence
number has arrived (microseconds). Two buffers alternate: a rank can be at most one exchange
ahead of the slowest one, so it never overwrites data still being read.
"""

from __future__ import annotations

import os
import socket
import uuid

import torch
import torch.distributed as dist
from torch import Tensor

CAPACITY = 1 << 16  # float64 values per rank per exchange
_EXCHANGES: dict[object, HostExchange | None] = {}


class HostExchange:
    """Shared-memory all-gather for the CPU ranks of ``group`` (all on this machine).

    Example:
        >>> ex = host_exchange(None)  # doctest: +SKIP
        >>> ex.all_gather(torch.ones(3, dtype=torch.float64)).shape  # (world, 3)  # doctest: +SKIP
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        box = [f"/dev/shm/tllab-exchange-{uuid.uuid4().hex}"]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        size = self.world + 2 * self.world * CAPACITY
        memory = torch.from_file(box[0], shared=True, size=size, dtype=torch.float64)
        dist.barrier(group=group)
        if self.rank == 0:
            os.unlink(box[0])  # the mappings stay valid; nothing is left behind
        self.seq = memory[: self.world]
        self.slots = memory[self.world:].view(2, self.world, CAPACITY)
        self.calls = 0

    def all_gather(self, vec: Tensor) -> Tensor:
        """Every rank's ``vec`` (float64, same length everywhere), stacked in rank order."""
        n = vec.numel()
        if n > CAPACITY:
            raise ValueError(f"host exchange holds {CAPACITY} values per rank, got {n}")
        self.calls += 1
        slot = self.slots[self.calls % 2]
        slot[self.rank, :n] = vec
        self.seq[self.rank] = self.calls  # published after the data (x86/ARM stores: program order per thread)
        while bool((self.seq < self.calls).any()):
            os.sched_yield()  # spin, but let other runnable work (more ranks than cores) go first
        return slot[:, :n].clone()


def host_exchange(group: dist.ProcessGroup | None) -> HostExchange | None:
    """The shared-memory exchange of ``group`` when all its ranks run on this machine with the
    gloo backend and /dev/shm exists, else None (use the process group's collectives)."""
    if group not in _EXCHANGES:
        hosts = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        eligible = (len(set(hosts)) == 1 and os.path.isdir("/dev/shm")
                    and dist.get_backend(group) == "gloo" and os.environ.get("TLLAB_HOST_EXCHANGE", "1") != "0")
        _EXCHANGES[group] = HostExchange(group) if eligible else None
    return _EXCHANGES[group]

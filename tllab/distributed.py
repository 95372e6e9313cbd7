"""Process-group helpers: what a method needs to be correct under data-parallel training.

Every function works unchanged in a single process (no process group, or world size 1), so a
method written with them runs the same way on one CPU and on many GPUs:

- :func:`rank`, :func:`world_size`, :func:`is_main` — who am I;
- :func:`all_reduce_sum` — sum a tensor over ranks (counts, statistics, gradients);
- :func:`all_gather_cat` — concatenate per-rank tensors whose first dimension may differ
  (features of uneven batches, a MoCo-style queue update);
- :func:`all_gather_stack` — stack every rank's same-shaped tensor, with gradients flowing back
  to each rank's input (batch statistics merged over ranks);
- :func:`all_gather_objects` — every rank's picklable object (per-rank RNG states);
- :func:`broadcast_object` — compute something once on rank 0 and share it (Co-Tuning's
  relationship, LwF's teacher outputs, DELTA's channel attention);
- :func:`broadcast_tensors` — overwrite tensors with rank 0's values (random masks that must
  agree across ranks, BatchNorm buffers).

Backends: gloo on CPU, NCCL on CUDA (see :func:`default_backend`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions take ``group.WORLD`` as a default argument,
# evaluated at import, so a first import after init_process_group would keep that group (and its gloo
# threads) alive past destroy_process_group, and about one 2-process run in five aborts at exit.
import torch.distributed.nn  # noqa: F401
from torch import Tensor


def dist_is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_dist() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist_is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist_is_initialized() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (default: all); 1 without a process group."""
    return dist.get_world_size(group) if dist_is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (its GPU), from the launcher's environment."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank())))


def is_main() -> bool:
    """Rank 0 (or no process group): the only process that writes logs, records and checkpoints."""
    return rank() == 0


def default_backend(device: torch.device) -> str:
    """The process-group backend for a device: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def env_world() -> tuple[int, int, int] | None:
    """``(rank, local_rank, world_size)`` from torchrun's or SLURM's environment, or None."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1 and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"]), int(os.environ["SLURM_NTASKS"])
    return None


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over all ranks (in place; returned for chaining). No-op in one process."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order; first dimensions may differ
    (ranks with 0 rows take part too). Not differentiable."""
    if not is_dist():
        return t
    sizes = [torch.zeros((), dtype=torch.long, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(t.shape[0], device=t.device))
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class _AllGatherStack(torch.autograd.Function):
    """Forward: every rank's ``t`` stacked in rank order. Backward: the gradient of rank ``r``'s input
    is the sum over ranks of their gradients w.r.t. slot ``r``, hence one all-reduce."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_stack(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's ``t`` (same shape on all ranks) stacked along a new dim 0 in rank order,
    differentiable: gradients reach each rank's input. ``t[None]`` in one process.
    (``torch.distributed.nn.functional.all_gather`` is deprecated.)"""
    if world_size(group) == 1:
        return t[None]
    return _AllGatherStack.apply(t, group)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as computed on rank ``src`` (picklable objects; other ranks pass anything)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    if is_dist():
        for t in tensors:
            dist.broadcast(t, src=src)

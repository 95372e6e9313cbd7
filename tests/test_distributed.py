"""The synchronization helpers methods use, over 2 gloo processes and in one process."""

from __future__ import annotations

import torch

from tests.dist_helpers import run_gloo
from tllab import distributed as D


def helpers_worker(rank: int, world: int, out_dir: str) -> None:
    rows = torch.full((rank * 3, 2), float(rank))  # rank 0 has no rows, rank 1 three
    mask = torch.rand(4) if rank == 0 else torch.zeros(4)
    D.broadcast_tensors([mask])
    out = {
        "rank": (D.rank(), D.world_size(), D.is_main(), D.is_dist()),
        "sum": D.all_reduce_sum(torch.tensor([rank + 1.0])).item(),
        "cat": D.all_gather_cat(rows),
        "objects": D.all_gather_objects({"r": rank}),
        "broadcast": D.broadcast_object(f"from {rank}"),
        "mask": mask,
    }
    torch.save(out, f"{out_dir}/h{rank}.pt")


def test_helpers_over_two_processes(tmp_path):
    run_gloo(helpers_worker, 2, tmp_path, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"h{r}.pt", weights_only=False) for r in range(2))
    assert r0["rank"] == (0, 2, True, True) and r1["rank"] == (1, 2, False, True)
    assert r0["sum"] == r1["sum"] == 3.0
    for r in (r0, r1):
        assert torch.equal(r["cat"], torch.ones(3, 2))  # rank 0's empty part, then rank 1's rows
        assert r["objects"] == [{"r": 0}, {"r": 1}]
        assert r["broadcast"] == "from 0"
    assert torch.equal(r0["mask"], r1["mask"]) and r0["mask"].abs().sum() > 0


def test_helpers_are_identities_in_one_process():
    t = torch.arange(3.0)
    assert (D.rank(), D.world_size(), D.is_main(), D.is_dist()) == (0, 1, True, False)
    assert D.all_reduce_sum(t) is t and D.all_gather_cat(t) is t
    assert D.all_gather_objects(5) == [5] and D.broadcast_object("x") == "x"
    assert D.default_backend(torch.device("cpu")) == "gloo" and D.default_backend(torch.device("cuda")) == "nccl"

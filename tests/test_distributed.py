"""The synchronization helpers methods use, over 2 gloo processes and in one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def stack_worker(rank: int, world: int, out_dir: str) -> None:
    x = torch.tensor([1.0, 2.0]) * (rank + 1)
    x.requires_grad_(True)
    stacked = D.all_gather_stack(x)
    (stacked * torch.tensor([[1.0, 10.0], [100.0, 1000.0]])).sum().backward()
    torch.save({"stacked": stacked.detach(), "grad": x.grad}, f"{out_dir}/s{rank}.pt")


def test_all_gather_stack_sends_each_rank_the_gradient_of_its_slot_summed_over_ranks(tmp_path):
    run_gloo(stack_worker, 2, tmp_path, str(tmp_path))
    for r in range(2):
        got = torch.load(tmp_path / f"s{r}.pt")
        assert got["stacked"].tolist() == [[1.0, 2.0], [2.0, 4.0]]
        # Both ranks weight slot r the same way, so rank r's input gets twice that weight.
        assert got["grad"].tolist() == [[2.0, 20.0], [200.0, 2000.0]][r]
    x = torch.ones(3, requires_grad=True)
    assert torch.equal(D.all_gather_stack(x), torch.ones(1, 3))


def _gloo_threads() -> list[str]:
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return [n for n in names if "gloo" in n]


def teardown_worker(rank: int, init_file: str, out_dir: str) -> None:
    from tllab.nn import batch_stats
    from tllab.norm.stochnorm import StochNorm2d

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    layer = StochNorm2d(3)
    layer.sync = True
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    (layer(x).sum() + batch_stats(x)[1].sum()).backward()
    running = _gloo_threads()
    dist.destroy_process_group()
    torch.save((running, _gloo_threads()), f"{out_dir}/t{rank}.pt")


def test_destroying_the_group_ends_its_threads_after_synced_statistics(tmp_path):
    # A process group kept alive past destroy_process_group (e.g. captured by a default argument of
    # a module first imported after init) leaves gloo threads that abort the process at exit.
    mp.spawn(teardown_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        running, after = torch.load(tmp_path / f"t{r}.pt")
        assert running and after == []


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

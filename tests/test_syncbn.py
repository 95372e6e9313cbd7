"""tllab's SyncBatchNorm over 2 gloo processes equals BatchNorm on the concatenated batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.dist_helpers import run_gloo
from tllab.nn import DistSyncBatchNorm, SyncBatchNorm, batch_norm, convert_sync_batchnorm, revert_sync_batchnorm

SPLITS = [(8, 8), (5, 11), (1, 15), (0, 16)]
STEPS = 2


def make_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 images whose two halves differ in distribution, and an upstream gradient."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 3, 4, 5, generator=g, dtype=torch.float64)
    x[8:] = 3 * x[8:] + 2
    return x, torch.randn(16, 3, 4, 5, generator=g, dtype=torch.float64)


def sync_worker(rank: int, world: int, out_dir: str, momentum: float | None) -> None:
    results = {}
    for split in SPLITS:
        layer = SyncBatchNorm(3, momentum=momentum).double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        lo = sum(split[:rank])
        for step in range(STEPS):
            x, grad = make_data(step)
            xs = x[lo:lo + split[rank]].clone().requires_grad_()
            layer.zero_grad()
            y = layer(xs)
            (y * grad[lo:lo + split[rank]]).sum().backward()
        results[split] = {"y": y.detach(), "dx": xs.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
                          "mean": layer.running_mean, "var": layer.running_var,
                          "tracked": layer.num_batches_tracked}
    # Eval mode: no collective at all, and plain BatchNorm's output.
    calls = []
    for name in ("all_gather", "all_reduce", "broadcast"):
        original = getattr(dist, name)
        setattr(dist, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    layer.eval()
    results["eval"] = (layer(make_data(0)[0][:4]), list(calls))
    # float32 data with mean 1e3 and std 1e-2: a one-pass E[x^2] - E[x]^2 would lose the variance.
    layer = SyncBatchNorm(1, momentum=1.0)
    x = 1000 + 0.01 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
    layer(x)
    results["robust"] = layer.running_var
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize(("momentum", "host_exchange"), [(0.1, "1"), (None, "1"), (0.1, "0")])
def test_syncbn_matches_batchnorm_on_concatenated_batch(tmp_path, momentum, host_exchange, monkeypatch):
    # host_exchange "1": statistics through shared memory (same machine); "0": through gloo.
    monkeypatch.setenv("TLLAB_HOST_EXCHANGE", host_exchange)
    run_gloo(sync_worker, 2, tmp_path, str(tmp_path), momentum)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for split in SPLITS:
        ref = nn.BatchNorm2d(3, momentum=momentum).double()
        with torch.no_grad():
            ref.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
            ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        for step in range(STEPS):
            x, grad = make_data(step)
            x.requires_grad_()
            ref.zero_grad()
            y = ref(x)
            (y * grad).sum().backward()
        lo = 0
        for r in range(2):
            got = ranks[r][split]
            sl = slice(lo, lo + split[r])
            lo += split[r]
            assert got["y"].shape == (split[r], 3, 4, 5)
            torch.testing.assert_close(got["y"], y[sl].detach(), atol=1e-10, rtol=0)
            torch.testing.assert_close(got["dx"], x.grad[sl], atol=1e-10, rtol=0)
            torch.testing.assert_close(got["mean"], ref.running_mean, atol=1e-10, rtol=0)
            torch.testing.assert_close(got["var"], ref.running_var, atol=1e-10, rtol=0)
            assert got["tracked"].item() == STEPS
        # data-parallel training sums the per-rank parameter gradients
        torch.testing.assert_close(ranks[0][split]["dw"] + ranks[1][split]["dw"], ref.weight.grad, atol=1e-10, rtol=0)
        torch.testing.assert_close(ranks[0][split]["db"] + ranks[1][split]["db"], ref.bias.grad, atol=1e-10, rtol=0)
    out, calls = ranks[0]["eval"]
    assert calls == []
    ref.eval()
    torch.testing.assert_close(out, ref(make_data(0)[0][:4]).detach(), atol=1e-10, rtol=0)
    x = torch.cat([1000 + 0.01 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(r))
                   for r in range(2)])
    true_var = x.double().var()
    assert abs(ranks[0]["robust"].item() - true_var.item()) / true_var.item() < 1e-2


def test_single_process_is_plain_batchnorm():
    torch.manual_seed(0)
    ref, layer = nn.BatchNorm1d(4, momentum=None), SyncBatchNorm(4, momentum=None)
    for _ in range(3):
        x = torch.randn(6, 4)
        torch.testing.assert_close(layer(x), ref(x), atol=0, rtol=0)
    torch.testing.assert_close(layer.running_var, ref.running_var, atol=0, rtol=0)
    assert DistSyncBatchNorm is SyncBatchNorm
    assert batch_norm(torch.randn(4, 3, 5, 5), nn.BatchNorm2d(3)).shape == (4, 3, 5, 5)


class GatedBN(nn.BatchNorm2d):
    """A BatchNorm subclass with an extra parameter that can be synchronized."""

    supports_sync = True

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.gate = nn.Parameter(torch.full((num_features,), 0.5))
        self.sync, self.process_group = False, None

    def forward(self, x):
        y = batch_norm(x, self, self.process_group) if self.sync else super().forward(x)
        return self.gate.view(1, -1, 1, 1) * y


class OpaqueBN(nn.BatchNorm2d):
    """A BatchNorm subclass that does not declare sync support."""


def test_converter_keeps_parameters_buffers_and_subclass_extras():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), GatedBN(4), OpaqueBN(4),
                          nn.Flatten(), nn.Linear(4 * 9, 5), nn.BatchNorm1d(5))
    model(torch.randn(8, 3, 5, 5))  # fill running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    with pytest.warns(UserWarning, match="OpaqueBN is a BatchNorm subclass without supports_sync"):
        convert_sync_batchnorm(model)
    assert [type(m).__name__ for m in model] == ["Conv2d", "SyncBatchNorm", "ReLU", "GatedBN", "OpaqueBN",
                                                "Flatten", "Linear", "SyncBatchNorm"]
    assert model[1].weight is weight  # shared, not copied
    assert model[3].sync and isinstance(model[3].gate, nn.Parameter)
    assert model.state_dict().keys() == before.keys()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revert_sync_batchnorm(model)
    assert [type(m).__name__ for m in model][1::6] == ["BatchNorm2d", "BatchNorm1d"]
    assert not model[3].sync
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(convert_sync_batchnorm(nn.BatchNorm3d(2))) is SyncBatchNorm


def exchange_worker(rank: int, world: int, out_dir: str) -> None:
    from tllab.nn.host_exchange import host_exchange

    ex = host_exchange(None)
    got = [ex.all_gather(torch.full((5,), float(10 * step + rank), dtype=torch.float64)) for step in range(50)]
    torch.save(got, f"{out_dir}/ex{rank}.pt")


def test_host_exchange_gathers_in_rank_order_across_many_calls(tmp_path):
    run_gloo(exchange_worker, 2, tmp_path, str(tmp_path))
    for r in range(2):
        got = torch.load(tmp_path / f"ex{r}.pt")
        for step, g in enumerate(got):
            assert g.tolist() == [[10.0 * step] * 5, [10.0 * step + 1] * 5]
    assert not list(Path("/dev/shm").glob("tllab-exchange-*"))  # unlinked once mapped


def batch_stats_worker(rank: int, world: int, out_dir: str) -> None:
    from tllab.nn import batch_stats

    x = torch.randn(16, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 + 5
    mine = (x[:5] if rank == 0 else x[5:]).clone().requires_grad_(True)  # uneven shards: [5, 11]
    mean, var, count = batch_stats(mine)
    # Each rank's loss is its share of the one-process loss; gradients reach every rank's input.
    ((mean.sum() + (var * torch.arange(1.0, 4.0, dtype=torch.float64)).sum()) / world).backward()
    torch.save({"mean": mean.detach(), "var": var.detach(), "count": count, "grad": mine.grad},
               Path(out_dir) / f"stats{rank}.pt")


def test_batch_stats_over_ranks_equal_one_process_with_gradients(tmp_path):
    from tllab.nn import batch_stats

    run_gloo(batch_stats_worker, 2, tmp_path, str(tmp_path))
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 + 5
    x.requires_grad_(True)
    mean, var, count = batch_stats(x)
    (mean.sum() + (var * torch.arange(1.0, 4.0, dtype=torch.float64)).sum()).backward()
    assert count == 16 * 16
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False))
    parts = [torch.load(tmp_path / f"stats{r}.pt") for r in range(2)]
    for part in parts:
        assert part["count"] == count
        torch.testing.assert_close(part["mean"], mean.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(part["var"], var.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([parts[0]["grad"], parts[1]["grad"]]), x.grad, rtol=0, atol=1e-12)

"""tllab's SyncBatchNorm over 2 gloo processes equals BatchNorm on the concatenated batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tllab.nn.syncbn as syncbn
from tests.dist_helpers import run_gloo
from tllab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    DistSyncBatchNorm,
    SyncBatchNorm,
    batch_norm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

SPLITS = [(8, 8), (5, 11), (1, 15), (0, 16)]
STEPS = 2
SLOPE = 0.2


def make_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 images whose two halves differ in distribution, and an upstream gradient."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 3, 4, 5, generator=g, dtype=torch.float64)
    x[8:] = 3 * x[8:] + 2
    return x, torch.randn(16, 3, 4, 5, generator=g, dtype=torch.float64)


def train(layer: nn.Module, split: tuple[int, ...], rank: int) -> dict[str, torch.Tensor]:
    """STEPS steps of ``layer`` (a BatchNorm, or a module holding one) on shard ``rank`` of ``split``
    of the 16 images: the last output, the gradients and the BatchNorm's running statistics. In the
    workers it is one rank's part; with ``split=(16,)`` the one-process reference."""
    bn = next(m for m in layer.modules() if isinstance(m, _BatchNorm))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    lo = sum(split[:rank])
    shard = slice(lo, lo + split[rank])
    for step in range(STEPS):
        x, grad = make_data(step)
        xs = x[shard].clone().requires_grad_()
        layer.zero_grad()
        y = layer(xs)
        (y * grad[shard]).sum().backward()
    return {"y": y.detach(), "dx": xs.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "mean": bn.running_mean,
            "var": bn.running_var, "tracked": bn.num_batches_tracked}


def sync_worker(rank: int, world: int, out_dir: str, momentum: float | None) -> None:
    results = {}
    for split in SPLITS:
        layer = SyncBatchNorm(3, momentum=momentum).double()
        results[split] = train(layer, split, rank)
    leaky = SyncBatchNorm(3, momentum=momentum, activation="leaky_relu", slope=SLOPE).double()
    results["leaky"] = train(leaky, SPLITS[1], rank)
    # From here on: no collective, and no exchange of statistics at all.
    calls = []
    for owner, name in ((dist, "all_gather"), (dist, "all_reduce"), (dist, "broadcast"), (syncbn, "_all_gather")):
        original = getattr(owner, name)
        setattr(owner, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    results["local"] = train(SyncBatchNorm(3, momentum=momentum, sync=False).double(), SPLITS[1], rank)
    layer.eval()
    results["eval"] = (layer(make_data(0)[0][:4]), list(calls))
    # float32 data with mean 1e3 and std 1e-2: a one-pass E[x^2] - E[x]^2 would lose the variance.
    layer = SyncBatchNorm(1, momentum=1.0)
    x = 1000 + 0.01 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
    layer(x)
    results["robust"] = layer.running_var
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def assert_equal_results(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    for key in keys:
        torch.testing.assert_close(got[key], want[key], atol=1e-10, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(("momentum", "host_exchange"), [(0.1, "1"), (None, "1"), (0.1, "0")])
def test_syncbn_matches_batchnorm_on_concatenated_batch(tmp_path, momentum, host_exchange, monkeypatch):
    # host_exchange "1": statistics through shared memory (same machine); "0": through gloo.
    monkeypatch.setenv("TLLAB_HOST_EXCHANGE", host_exchange)
    run_gloo(sync_worker, 2, tmp_path, str(tmp_path), momentum)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    cases = [(split, split, nn.BatchNorm2d(3, momentum=momentum)) for split in SPLITS]
    cases.append(("leaky", SPLITS[1], nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.LeakyReLU(SLOPE))))
    for key, split, ref in cases:
        want = train(ref.double(), (16,), 0)
        lo = 0
        for r in range(2):
            got = ranks[r][key]
            sl = slice(lo, lo + split[r])
            lo += split[r]
            assert got["y"].shape == (split[r], 3, 4, 5)
            assert_equal_results(got, {**want, "y": want["y"][sl], "dx": want["dx"][sl]},
                                 ("y", "dx", "mean", "var", "tracked"))
        # data-parallel training sums the per-rank parameter gradients
        torch.testing.assert_close(ranks[0][key]["dw"] + ranks[1][key]["dw"], want["dw"], atol=1e-10, rtol=0)
        torch.testing.assert_close(ranks[0][key]["db"] + ranks[1][key]["db"], want["db"], atol=1e-10, rtol=0)
    # sync=False: each rank is a BatchNorm of its own shard, parameter gradients included.
    for r in range(2):
        assert_equal_results(ranks[r]["local"], train(nn.BatchNorm2d(3, momentum=momentum).double(), SPLITS[1], r),
                             ("y", "dx", "dw", "db", "mean", "var", "tracked"))
    out, calls = ranks[0]["eval"]
    assert calls == []
    ref = cases[len(SPLITS) - 1][2].eval()
    torch.testing.assert_close(out, ref(make_data(0)[0][:4]).detach(), atol=1e-10, rtol=0)
    x = torch.cat([1000 + 0.01 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(r))
                   for r in range(2)])
    true_var = x.double().var()
    assert abs(ranks[0]["robust"].item() - true_var.item()) / true_var.item() < 1e-2


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("slope", [0.01, 0.0, -0.3])
def test_leaky_relu_equals_batchnorm_then_leaky_relu(slope, inplace):
    layer = SyncBatchNorm(3, activation="leaky_relu", slope=slope, inplace=inplace).double()
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(slope)).double()
    everything = ("y", "dx", "dw", "db", "mean", "var", "tracked")
    assert_equal_results(train(layer, (16,), 0), train(ref, (16,), 0), everything)
    assert_equal_results(train(layer.eval(), (16,), 0), train(ref.eval(), (16,), 0), everything)
    # in place exactly where autograd allows it (a negative slope's in-place backward raises)
    y = layer.train()(make_data(0)[0].requires_grad_())
    assert (y._version > 0) == (inplace and slope >= 0)
    assert "activation='leaky_relu'" in repr(layer)


def test_single_process_is_plain_batchnorm():
    torch.manual_seed(0)
    ref, layer = nn.BatchNorm1d(4, momentum=None), SyncBatchNorm(4, momentum=None)
    for _ in range(3):
        x = torch.randn(6, 4)
        torch.testing.assert_close(layer(x), ref(x), atol=0, rtol=0)
    torch.testing.assert_close(layer.running_var, ref.running_var, atol=0, rtol=0)
    assert DistSyncBatchNorm is SyncBatchNorm
    assert batch_norm(torch.randn(4, 3, 5, 5), nn.BatchNorm2d(3)).shape == (4, 3, 5, 5)
    assert repr(layer) == repr(ref).replace("BatchNorm1d", "SyncBatchNorm")  # defaults add nothing
    with pytest.raises(ValueError, match="activation must be 'none' or 'leaky_relu', got 'relu'"):
        SyncBatchNorm(4, activation="relu")
    with pytest.raises(TypeError):  # sync (PyTorch-Encoding) or affine (torch)? Keyword only.
        SyncBatchNorm(4, 1e-5, 0.1, False)


@pytest.mark.parametrize(("alias", "good", "bad"), [(BatchNorm1d, [(6, 3), (6, 3, 5)], (6, 3, 4, 5)),
                                                    (BatchNorm2d, [(6, 3, 4, 5)], (6, 3, 5)),
                                                    (BatchNorm3d, [(6, 3, 2, 4, 5)], (6, 3, 4, 5))])
def test_deprecated_aliases_warn_build_syncbn_and_check_dims(alias, good, bad):
    with pytest.warns(DeprecationWarning, match=rf"tllab.nn.{alias.__name__} is deprecated; use tllab.nn.Sync") as rec:
        plain, leaky = alias(3), alias(3, momentum=None, activation="leaky_relu", slope=SLOPE)
    assert {r.filename for r in rec} == {__file__}  # points at the caller
    assert isinstance(leaky, SyncBatchNorm) and leaky.sync and leaky.momentum is None and leaky.slope == SLOPE
    for shape in good:
        x = torch.randn(shape)
        torch.testing.assert_close(leaky(x), nn.functional.leaky_relu(getattr(nn, alias.__name__)(3)(x), SLOPE))
    with pytest.raises(ValueError, match=rf"^expected [\dD or]+ input \(got {len(bad)}D input\)$"):
        leaky(torch.randn(bad))
    assert type(revert_sync_batchnorm(plain)) is getattr(nn, alias.__name__)
    # no BatchNorm class applies a leaky ReLU: the layer stays, unsynchronized
    assert revert_sync_batchnorm(leaky) is leaky and not leaky.sync


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
    converted = convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(converted) is SyncBatchNorm and converted.sync and converted.activation == "none"


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

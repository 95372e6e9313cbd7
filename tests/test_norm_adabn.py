"""AdaBN: exact layer-by-layer target statistics, the plug-in, tllab-analyze adabn, 2-process gloo.

Models, the trainer and the analysis CLI are imported inside the tests that use them: the
spawned gloo workers import this module, and those imports (torchvision, timm) take seconds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tests.conftest import FAST, compose_config
from tests.dist_helpers import run_gloo
from tllab.checkpoint import load_checkpoint
from tllab.data import DataModule
from tllab.data.arrays import ArrayDataset
from tllab.data.loaders import eval_loader
from tllab.errors import ConfigError
from tllab.nn import SyncBatchNorm, convert_sync_batchnorm
from tllab.norm.adabn import AdaBNStrategy, adapt_batchnorm, adaptation_split


class Shuffled(nn.Module):
    """BatchNorms registered in the reverse of their forward order, dropout in between and a
    BatchNorm1d at the end: the adaptation order must come from the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.bn3 = nn.BatchNorm1d(6)
        self.bn2 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(5 * 4 * 4, 6)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(self.drop(x))))
        return self.bn3(self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)))


def train_source(model: nn.Module, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Give the BatchNorms non-trivial source statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(dtype).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, 8, 8, generator=g, dtype=dtype))
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model


def sorted_target(n: int = 103, dtype: torch.dtype = torch.float64, size: int = 8) -> Tensor:
    """Non-i.i.d. target images: shifted and scaled away from the source, sorted by brightness,
    so consecutive batches have very different statistics."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype) * 2 + torch.linspace(-3, 3, n, dtype=dtype).view(
        -1, 1, 1, 1)
    return x[x.mean((1, 2, 3)).argsort()]


def batches(x: Tensor, size: int) -> list[tuple[Tensor, None]]:
    """``(images, None)`` batches: AdaBN reads no labels."""
    return [(part, None) for part in x.split(size)]


def batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def exact_reference(model: nn.Module, x: Tensor, order: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """By hand: layer by layer in ``order``, the mean and biased variance of the layer's input
    over the whole target set in one batch, computed with the earlier layers already adapted
    (eval mode: the statistics of a sample do not depend on its batch)."""
    ref = copy.deepcopy(model).eval()
    layers = batchnorms(ref)
    stats = {}
    for name in order:
        seen: list[Tensor] = []
        handle = layers[name].register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].double()))
        with torch.no_grad():
            ref(x)
        handle.remove()
        dims = [0, *range(2, seen[0].dim())]
        mean, var = seen[0].mean(dims), seen[0].var(dims, unbiased=False)
        layers[name].running_mean.copy_(mean)
        layers[name].running_var.copy_(var)
        stats[name] = (mean, var)
    return stats


def assert_stats(adapted: nn.Module, ref: dict[str, tuple[Tensor, Tensor]], atol: float) -> None:
    layers = batchnorms(adapted)
    assert set(ref) == set(layers)
    for name, (mean, var) in ref.items():
        torch.testing.assert_close(layers[name].running_mean.double(), mean, rtol=0, atol=atol, msg=name)
        torch.testing.assert_close(layers[name].running_var.double(), var, rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------- exactness
def test_every_layer_gets_the_exact_statistics_of_its_input_with_earlier_layers_adapted():
    model = train_source(Shuffled())
    x = sorted_target()
    adapted = adapt_batchnorm(model, batches(x, 16))  # 103 = 6 x 16 + 7: uneven last batch
    ref = exact_reference(model, x, ["bn1", "bn2", "bn3"])
    assert_stats(adapted, ref, atol=1e-10)
    # Sensitive: later layers measured under the source statistics of earlier ones differ.
    naive = exact_reference(model, x, ["bn3", "bn2", "bn1"])
    assert (naive["bn3"][1] - ref["bn3"][1]).abs().max() > 1e-2
    # ... and so does the usual estimate (reset, momentum=None, one train-mode pass per batch).
    usual = copy.deepcopy(model)
    for m in batchnorms(usual).values():
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for part, _ in batches(x, 16):
            usual(part)
    assert (batchnorms(usual)["bn2"].running_var - ref["bn2"][1]).abs().max() > 1e-2


@pytest.mark.parametrize("sync", [False, True])
def test_classifier_with_a_batchnorm1d_bottleneck_and_tllab_syncbn(sync: bool):
    from tllab.models import Classifier
    from tllab.models.cnn import DigitsCNN

    model = Classifier(DigitsCNN(widths=(4, 6, 8)), 10, bottleneck_dim=12)
    model = train_source(convert_sync_batchnorm(model) if sync else model)
    layers = batchnorms(model)
    assert len(layers) == 4 and all(isinstance(m, SyncBatchNorm) == sync for m in layers.values())
    x = sorted_target(size=16)
    adapted = adapt_batchnorm(model, batches(x, 24))
    assert_stats(adapted, exact_reference(model, x, list(layers)), atol=1e-10)
    assert isinstance(batchnorms(adapted)["bottleneck.1"], nn.BatchNorm1d) != sync


def test_float32_model_and_a_callable_source_of_batches():
    model = train_source(Shuffled(), torch.float32)
    x = sorted_target(dtype=torch.float32)
    adapted = adapt_batchnorm(model, lambda: iter(batches(x, 10)))
    ref = exact_reference(model.double(), x.double(), ["bn1", "bn2", "bn3"])
    for name, (mean, var) in ref.items():
        layer = batchnorms(adapted)[name]
        assert layer.running_mean.dtype == torch.float32
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_adapting_on_its_own_data_reproduces_exact_source_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)).double()
    x = sorted_target()
    model(x)  # one train-mode batch of everything: running stats = exact (unbiased) stats of x
    n = x.shape[0] * 6 * 6
    adapted = adapt_batchnorm(model, batches(x, 7))
    torch.testing.assert_close(adapted[1].running_mean, model[1].running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapted[1].running_var * n / (n - 1), model[1].running_var, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- what is left untouched
def test_source_model_untouched_and_copy_changes_only_running_statistics():
    model = train_source(Shuffled())
    model.drop.eval()  # mixed train/eval flags are kept on the copy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_batchnorm(model, batches(sorted_target(), 16))
    assert adapted is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m in model.modules():  # no hook left behind
        assert not m._forward_pre_hooks and not m._forward_hooks
    for k, v in adapted.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            assert not torch.equal(v, before[k]), k
        else:  # weights, affine parameters, num_batches_tracked
            assert torch.equal(v, before[k]), k
    assert [m.training for m in adapted.modules()] == [m.training for m in model.modules()]
    assert [getattr(m, "momentum", 0) for m in adapted.modules()] == [getattr(m, "momentum", 0) for m in
                                                                       model.modules()]
    assert all(not p.requires_grad or p.grad is None for p in adapted.parameters())


def test_deterministic_and_independent_of_batch_size_and_order():
    model = train_source(Shuffled())
    x = sorted_target()
    a = adapt_batchnorm(model, batches(x, 16)).state_dict()
    b = adapt_batchnorm(model, batches(x, 16)).state_dict()
    c = adapt_batchnorm(model, batches(x.flip(0), 50)).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-10)


def test_one_shot_iterators_and_empty_data_are_refused_unreached_layers_kept():
    model = train_source(Shuffled())
    with pytest.raises(TypeError, match="re-iterable"):
        adapt_batchnorm(model, (b for b in batches(sorted_target(), 16)))
    with pytest.raises(ValueError, match="no target samples"):
        adapt_batchnorm(model, [])
    unused = Unused().double()  # a BatchNorm no forward pass reaches keeps its statistics
    adapted = adapt_batchnorm(unused, [torch.randn(4, 3, dtype=torch.float64)])
    assert torch.equal(adapted.unused.running_mean, torch.full((3,), 5.0, dtype=torch.float64))
    assert not torch.equal(adapted.used.running_mean, unused.used.running_mean)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        self.unused.running_mean.fill_(5)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


# ---------------------------------------------------------------- the plug-in's split
def dataset(n: int, label: int = 0) -> ArrayDataset:
    return ArrayDataset(np.zeros((n, 32, 32, 3), np.uint8), np.full(n, label), np.zeros(n, int), 32)


def test_adaptation_split_options():
    da = DataModule(train=dataset(5), eval_splits={"target_test": dataset(3)}, selection_split=None,
                    unlabeled=dataset(7, -1))
    assert len(adaptation_split(da, "unlabeled")) == 7
    assert len(adaptation_split(da, "train")) == 5
    assert len(adaptation_split(da, "target_test")) == 3
    with pytest.raises(ConfigError, match=r"norm.adabn.split=target_val .*'target_test'"):
        adaptation_split(da, "target_val")
    dg = DataModule(train=dataset(5), eval_splits={"target_test": dataset(3)}, selection_split=None)
    with pytest.raises(ConfigError, match="only dataset.setting=da"):
        adaptation_split(dg, "unlabeled")
    with pytest.raises(ConfigError, match="--adapt-split unlabeled"):
        adaptation_split(dg, "unlabeled", option="--adapt-split ")


def test_yaml_composes_with_every_option():
    cfg = compose_config(["norm=adabn"])
    assert dict(cfg.norm.adabn) == {"_target_": "tllab.norm.adabn.AdaBNStrategy", "split": "unlabeled"}
    assert AdaBNStrategy.uses_target is False


# ---------------------------------------------------------------- end to end on the embedded digits
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mnist -> mnistm, 30 steps of batch 64 (half an epoch), one evaluation: source-only and norm=adabn
    (which also shows that the YAML composes and trains). Target accuracy over seeds 0-4:
    source-only 0.27-0.38, AdaBN 0.50-0.55 (gain +0.13 to +0.26)."""
    from tllab.train import run

    root = tmp_path_factory.mktemp("adabn")
    steps = ["trainer.max_steps=30", "trainer.eval_every=30"]
    for norm in ("none", "adabn"):
        run(compose_config([*FAST, *steps, f"norm={norm}"]), root / norm)
    return {norm: root / norm for norm in ("none", "adabn")}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_adabn_raises_target_accuracy_and_changes_evaluation_only(runs: dict[str, Path]):
    source_only, adabn = summary(runs["none"])["final"], summary(runs["adabn"])["final"]
    print(f"target_test/acc source-only {source_only['target_test/acc']:.4f}, AdaBN {adabn['target_test/acc']:.4f}")
    assert adabn["target_test/acc"] > source_only["target_test/acc"] + 0.05
    assert adabn["train/loss"] == source_only["train/loss"]  # identical training
    for split in ("source_val", "source_test"):  # source splits keep the model's own statistics
        assert adabn[f"{split}/acc"] == source_only[f"{split}/acc"]
    a, b = (load_checkpoint(runs[n] / "checkpoints" / "last.pt")["model"] for n in ("none", "adabn"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_analyze_adabn_on_a_source_only_checkpoint_matches_the_adabn_run(runs: dict[str, Path], capsys):
    from tllab.analysis import main as analyze

    analyze(["adabn", str(runs["none"])])
    record = json.loads((runs["none"] / "analysis" / "adabn.json").read_text())
    assert "before AdaBN" in capsys.readouterr().out
    assert record["before"]["acc"] == summary(runs["none"])["final"]["target_test/acc"]
    assert record["after"]["acc"] == summary(runs["adabn"])["final"]["target_test/acc"]
    assert record["after"]["loss"] == pytest.approx(summary(runs["adabn"])["final"]["target_test/loss"], rel=1e-6)
    assert record["gain"] == record["after"]["acc"] - record["before"]["acc"] > 0
    assert (record["split"], record["adapt_split"], record["num_adapt"]) == ("target_test", "unlabeled", 4000)


# ---------------------------------------------------------------- data parallelism
def _shard_worker(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    model = train_source(Shuffled())
    data = torch.utils.data.TensorDataset(sorted_target())
    uneven = adapt_batchnorm(model, eval_loader(data, 16, rank=rank, world=world))  # 51 + 52 samples
    only_rank0 = adapt_batchnorm(model, eval_loader(data, 16) if rank == 0 else [])  # rank 1 holds nothing
    torch.save({"uneven": uneven.state_dict(), "only_rank0": only_rank0.state_dict()}, f"{out}/rank{rank}.pt")


def test_two_processes_with_different_shards_equal_one_process(tmp_path: Path):
    run_gloo(_shard_worker, 2, tmp_path, str(tmp_path))
    torch.manual_seed(0)
    single = adapt_batchnorm(train_source(Shuffled()), batches(sorted_target(), 16)).state_dict()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for layout in ("uneven", "only_rank0"):
            for k, v in single.items():
                torch.testing.assert_close(result[layout][k], v, rtol=0, atol=1e-10, msg=f"{rank} {layout} {k}")

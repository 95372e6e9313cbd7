"""DELTA: hand-computed distances, channel attention, frozen source, caching, ranks, end to end."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tests.dist_helpers import run_gloo
from tllab.checkpoint import load_checkpoint
from tllab.models import Classifier
from tllab.models.cnn import DigitsCNN
from tllab.plugin import SetupContext, StepOutput
from tllab.regularizer import delta as delta_mod
from tllab.regularizer.delta import DELTA, LayerOutputs, estimate_channel_attention, feature_map_distance


def _tiny_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(DigitsCNN(widths=(4, 6, 8)), 3)


def _ctx(model: nn.Module, run_dir: Path, n: int = 12) -> SetupContext:
    g = torch.Generator().manual_seed(1)
    data = SimpleNamespace(train=TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 3))
    return SetupContext(model, data, torch.device("cpu"), run_dir, {})


def _step(model: nn.Module, plugin: DELTA, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    logits, f = model(x)
    out = StepOutput(0, 1, model, x, y, torch.zeros_like(y), logits, f)
    return {**plugin.loss(out), "ce": F.cross_entropy(logits, y)}


def test_plain_distance_is_half_the_squared_difference_per_sample():
    s1 = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]], [[[0.0, 1.0]], [[3.0, 0.0]]]])  # (2, 2, 1, 2)
    t1 = torch.tensor([[[[2.0, 2.0]], [[0.0, 1.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])
    s2, t2 = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    # layer 1: squared diffs 1 + 1 + 4 = 6; layer 2: 8 * 0.25 = 2; total 0.5 * 8 = 4 over 2 samples
    assert feature_map_distance([s1, s2], [t1, t2], reduction="sum").item() == pytest.approx(4.0)
    assert feature_map_distance([s1, s2], [t1, t2]).item() == pytest.approx(2.0)


def test_attention_distance_matches_hand_computation():
    s = torch.zeros(2, 2, 1, 2)
    t = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]], [[[0.0, 3.0]], [[1.0, 1.0]]]])
    a = torch.tensor([0.25, 0.75])
    # ||.||^2 / (h w), (b, c): (1, 2), (4.5, 1); sum_bc C a_c d = 2 * (0.25 * 5.5 + 0.75 * 3) = 7.25
    assert feature_map_distance([s], [t], [a], reduction="sum").item() == pytest.approx(0.5 * 7.25)
    assert feature_map_distance([s], [t], [a]).item() == pytest.approx(0.5 * 7.25 / 2)
    # uniform weights: the plain distance divided by h * w
    uniform = feature_map_distance([s], [t], [torch.full((2,), 0.5)])
    assert uniform.item() == pytest.approx(feature_map_distance([s], [t]).item() / 2)


def test_layer_outputs_records_named_layers_and_only_grad_passes():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2)))
    x = torch.randn(5, 4)
    lo = LayerOutputs(net, ["0", "2.0"], grad_only=True)
    with torch.no_grad():
        net(x)  # an evaluation pass is not kept
    net(x)
    net(x[:2])
    maps = lo.take()
    assert torch.allclose(maps["0"], torch.cat([net[0](x), net[0](x[:2])]))
    assert maps["2.0"].shape == (7, 2)
    lo.remove()
    net(x)
    with pytest.raises(RuntimeError, match="no output recorded"):
        lo.take()


class _Skip(nn.Module):
    """``conv(x) + 0 * x``: a skip connection around the conv, so replicas cannot start at its output."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + 0 * x


def _toy_attention_model(skip: bool) -> nn.Module:
    """Channel 0 decides the class (head weight 4), channel 1 helps a little (1), channel 2 is unused."""
    conv = nn.Conv2d(1, 3, 1)
    head = nn.Linear(3, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1, 1))
        conv.bias.zero_()
        head.weight.copy_(torch.tensor([[-4.0, -1.0, 0.0], [4.0, 1.0, 0.0]]))
        head.bias.zero_()
    return nn.Sequential(_Skip(conv) if skip else conv, nn.Flatten(), head)


@pytest.mark.parametrize("skip", [False, True], ids=["replicas-at-layer", "replicated-input"])
def test_attention_weights_sum_to_one_and_follow_the_loss_increase(skip):
    net = _toy_attention_model(skip)
    layer = "0.conv" if skip else "0"
    x = torch.tensor([-1.0, 1.0, -0.5, 0.5, -2.0, 2.0]).view(6, 1, 1, 1)
    y = (x.flatten() > 0).long()
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    a = estimate_channel_attention(net, [layer], batches, samples_per_pass=8)[0]  # 2 channels per pass
    assert a.sum().item() == pytest.approx(1.0)
    assert a[0] > a[1] > a[2]
    # the reference procedure by hand: zero filter j's weights, loss increase averaged over samples
    base = F.cross_entropy(net(x), y).item()
    deltas = []
    for j in range(3):
        edited = _toy_attention_model(skip)
        with torch.no_grad():
            edited.get_submodule(layer).weight[j] = 0
        deltas.append(F.cross_entropy(edited(x), y).item() - base)
    d = torch.tensor(deltas, dtype=torch.float64)
    expected = torch.softmax((d - d.mean()) / d.std(correction=0) / 5, 0)
    assert torch.allclose(a.double(), expected, atol=1e-6)
    assert net.training  # mode restored


def test_gradients_reach_only_the_trained_model_and_the_source_stays_frozen(tmp_path):
    model = _tiny_model()
    plugin = DELTA(weight=1.0, head_weight=0.5, attention=False)
    plugin.setup(_ctx(model, tmp_path))
    assert plugin.loss_layers == ["features.3", "features.7", "features.11"]
    source = plugin._source[0]
    before = {k: v.clone() for k, v in source.state_dict().items()}
    assert not any(p.requires_grad for p in source.parameters()) and not source.training
    assert plugin.state_dict() == {}  # checkpoints never hold the source
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        with torch.no_grad():
            head = sum(p.pow(2).sum() for m in (model.bottleneck, model.head) for p in m.parameters())
        terms = _step(model, plugin, x, y)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in source.parameters())
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())
    assert terms["feature_map"].item() > 0  # the model moved away from the source
    assert terms["head"].item() == pytest.approx(0.5 * 0.5 * head.item(), rel=1e-5)
    # the term is the hand distance between the maps of this step's forward and the source's
    with LayerOutputs(model.backbone, plugin.loss_layers) as lt:
        logits, f = model(x)
    with torch.no_grad(), LayerOutputs(source, plugin.loss_layers) as ls:
        source(x)
    t, s = lt.take(), ls.take()
    hand = sum(0.5 * (t[n] - s[n]).pow(2).sum() for n in plugin.loss_layers) / len(x)
    value = plugin.loss(StepOutput(0, 1, model, x, y, y, logits, f))["feature_map"]
    assert value.item() == pytest.approx(hand.item(), rel=1e-5)


def test_attention_is_estimated_once_and_cached(tmp_path, monkeypatch):
    first = DELTA(attention_batches=2, attention_batch_size=4, attention_steps=5, layers=["block1", "block3"])
    first.setup(_ctx(_tiny_model(), tmp_path))
    path = tmp_path / "delta_attention.pt"
    cached = load_checkpoint(path)
    assert cached["layers"] == ["features.3", "features.11"]
    assert [w.shape[0] for w in first._weights] == [4, 8]
    assert all(math.isclose(w.sum().item(), 1.0, rel_tol=1e-5) for w in first._weights)

    def fail(*args, **kwargs):
        raise AssertionError("the attention was estimated again")

    monkeypatch.setattr(delta_mod, "estimate_channel_attention", fail)
    second = DELTA(attention_batches=2, attention_batch_size=4, attention_steps=5, layers=["block1", "block3"])
    second.setup(_ctx(_tiny_model(), tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(first._weights, second._weights))
    with pytest.raises(AssertionError, match="estimated again"):  # other layers: estimated afresh
        DELTA(attention_steps=1, layers=["block2"]).setup(_ctx(_tiny_model(), tmp_path))


def _rank_setup(rank: int, world: int, run_dir: Path, out_dir: Path) -> None:
    if rank != 0:  # only rank 0 may estimate; the others must receive its result
        delta_mod.estimate_channel_attention = None
    plugin = DELTA(attention_batches=1, attention_batch_size=6, attention_steps=2)
    plugin.setup(_ctx(_tiny_model(seed=rank), run_dir / f"rank{rank}" if rank else run_dir))
    torch.save(plugin._weights, out_dir / f"weights{rank}.pt")


def test_rank0_estimates_and_other_ranks_receive_the_same_attention(tmp_path):
    run_gloo(_rank_setup, 2, tmp_path, tmp_path / "run", tmp_path)
    w0, w1 = torch.load(tmp_path / "weights0.pt"), torch.load(tmp_path / "weights1.pt")
    assert len(w0) == 3 and all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert (tmp_path / "run" / "delta_attention.pt").exists()
    assert not (tmp_path / "run" / "rank1").exists()  # rank 1 neither estimated nor wrote


def test_yaml_fine_tunes_digits_and_keeps_the_source_out_of_checkpoints(train_run, pretrained, tmp_path):
    summary = train_run("experiment=digits_finetune", f"backbone.pretrained={pretrained()}",
                        "regularizer=delta", "trainer.max_steps=2", "regularizer.delta.attention_steps=20",
                        "regularizer.delta.attention_batches=1", "regularizer.delta.attention_batch_size=8",
                        run_dir=tmp_path / "ft")
    assert summary["steps"] == 2
    final = summary["final"]
    assert final["train/regularizer.delta/feature_map"] >= 0 and final["train/regularizer.delta/head"] > 0
    assert (tmp_path / "ft" / "delta_attention.pt").exists()
    state = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")
    assert state["plugins"]["regularizer.delta"] == {}
    assert all(k.split(".")[0] in {"backbone", "bottleneck", "head"} for k in state["model"])


@pytest.mark.parametrize("attention", [False, True], ids=["plain", "attention"])
def test_float64_maps_give_a_float64_distance_and_half_maps_are_upcast(attention):
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(shape, dtype=torch.float64, generator=g) for shape in ((3, 2, 4, 4), (3, 5, 2, 2))]
    tgt = [torch.randn(s.shape, dtype=torch.float64, generator=g) for s in src]
    a = [torch.rand(s.shape[1], dtype=torch.float64, generator=g) for s in src] if attention else None
    sq = [(t - s).square().flatten(2) for s, t in zip(src, tgt)]  # (B, C, H*W)
    per_layer = ([d.sum() for d in sq] if a is None
                 else [d.shape[1] * (w[:, None] * d).sum() / d.shape[2] for d, w in zip(sq, a)])
    hand = 0.5 * sum(per_layer) / 3
    torch.testing.assert_close(feature_map_distance(src, tgt, a), hand, rtol=0, atol=1e-12)
    half = feature_map_distance([s.bfloat16() for s in src], [t.bfloat16() for t in tgt], a)
    assert half.dtype == torch.float32


def test_float64_model_gives_float64_terms(tmp_path):
    model = _tiny_model().double()
    plugin = DELTA(weight=1.0, head_weight=1.0, attention=False)
    plugin.setup(_ctx(model, tmp_path))
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    terms = _step(model, plugin, x, y)
    hand = 0.5 * sum(p.square().sum() for m in (model.bottleneck, model.head) for p in m.parameters())
    torch.testing.assert_close(terms["head"], hand, rtol=0, atol=1e-12)
    assert terms["feature_map"].dtype == torch.float64


def test_attention_of_a_float64_model_is_float64():
    net = _toy_attention_model(skip=False).double()
    x = torch.tensor([-1.0, 1.0, -0.5, 0.5, -2.0, 2.0], dtype=torch.float64).view(6, 1, 1, 1)
    y = (x.flatten() > 0).long()
    a = estimate_channel_attention(net, ["0"], [(x, y)])[0]
    base = F.cross_entropy(net(x), y)
    deltas = []
    for j in range(3):
        edited = _toy_attention_model(skip=False).double()
        with torch.no_grad():
            edited[0].weight[j] = 0
        deltas.append(F.cross_entropy(edited(x), y) - base)
    d = torch.stack(deltas)
    torch.testing.assert_close(a, torch.softmax((d - d.mean()) / d.std(correction=0) / 5, 0), rtol=0, atol=1e-12)

"""IBN-Net: the InstanceBatchNorm2d layer, IBN-a/IBN-b placement, weight carry-over, the
norm=ibn_a / norm=ibn_b strategy and synchronized BN halves."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import compose_config
from tests.dist_helpers import run_gloo
from tllab.errors import ConfigError
from tllab.models import TLLAB_MODELS, create_backbone
from tllab.models.cnn import DigitsCNN
from tllab.models.resnet import torchvision_resnet
from tllab.nn import SyncBatchNorm, convert_sync_batchnorm
from tllab.norm.ibn import (
    BasicBlockIBNb,
    BottleneckIBNb,
    InstanceBatchNorm2d,
    TimmBasicBlockIBNb,
    TimmBottleneckIBNb,
    ibn_variant,
    resnet18_ibn_a,
    resnet18_ibn_b,
    resnet50_ibn_a,
    resnet50_ibn_b,
    to_ibn_a,
    to_ibn_b,
)
from tllab.plugin import build_plugins
from tllab.train import resolve_config
from tllab.trainer import build_model

F64 = {"atol": 1e-10, "rtol": 0}


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial affine parameters and running statistics ("pretrained")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


def reference(ibn: InstanceBatchNorm2d) -> tuple[nn.InstanceNorm2d, nn.BatchNorm2d]:
    """Independent copies of the two halves, run on their own channels."""
    return copy.deepcopy(ibn.IN), copy.deepcopy(ibn.BN)


def grads(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad for m in modules for p in m.parameters()]


# --- the layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("planes", [5, 7, 65])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("train", [True, False])
def test_layer_is_concat_of_instance_and_batch_norm(planes, ratio, train):
    torch.manual_seed(planes)
    ibn = randomize(InstanceBatchNorm2d(planes, ratio).double()).train(train)
    half = int(planes * ratio)
    assert (ibn.half, ibn.IN.num_features, ibn.BN.num_features) == (half, half, planes - half)
    inorm, bnorm = reference(ibn)
    for step, n in enumerate([3, 1]):  # batch 1 with 4x5 maps trains too
        x = (torch.randn(n, planes, 4, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = torch.randn(n, planes, 4, 5, dtype=torch.float64)
        for m in (ibn, inorm, bnorm):
            m.zero_grad()
        y = ibn(x)
        y_ref = torch.cat([inorm(x_ref[:, :half]), bnorm(x_ref[:, half:])], 1)
        (y * dy).sum().backward()
        (y_ref * dy).sum().backward()
        assert y.shape == x.shape
        torch.testing.assert_close(y, y_ref, **F64)
        torch.testing.assert_close(x.grad, x_ref.grad, **F64)
        for got, want in zip(grads(ibn.IN, ibn.BN), grads(inorm, bnorm)):
            torch.testing.assert_close(got, want, **F64)
        torch.testing.assert_close(ibn.BN.running_mean, bnorm.running_mean, **F64)
        torch.testing.assert_close(ibn.BN.running_var, bnorm.running_var, **F64)
        assert ibn.BN.num_batches_tracked.item() == (step + 1 if train else 0)


def test_float32_cumulative_momentum_and_the_unfused_path_agree():
    torch.manual_seed(1)
    ibn = randomize(InstanceBatchNorm2d(64, 0.3, momentum=None))
    unfused = copy.deepcopy(ibn)
    unfused.BN = convert_sync_batchnorm(unfused.BN)  # a SyncBatchNorm half runs the two sub-modules
    inorm, bnorm = reference(ibn)
    for _ in range(3):
        x = torch.randn(8, 64, 8, 8) * 3 - 1
        y_ref = torch.cat([inorm(x[:, :19]), bnorm(x[:, 19:])], 1)
        torch.testing.assert_close(ibn(x), y_ref)
        torch.testing.assert_close(unfused(x), y_ref)
    for m in (ibn, unfused):
        torch.testing.assert_close(m.BN.running_var, bnorm.running_var)
        assert m.BN.num_batches_tracked.item() == 3
    ibn.eval(), bnorm.eval(), inorm.eval()
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    torch.testing.assert_close(ibn(x), torch.cat([inorm(x[:, :19]), bnorm(x[:, 19:])], 1))


def test_hooks_on_the_halves_see_their_channels():
    ibn = InstanceBatchNorm2d(7, 0.5)
    x = torch.randn(3, 7, 4, 4)
    y = ibn(x)
    seen = []
    handle = ibn.BN.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # as AdaBN collects inputs
    torch.testing.assert_close(ibn(x), y)
    torch.testing.assert_close(seen[0], x[:, 3:], atol=0, rtol=0)
    handle.remove()
    ibn(x)
    assert len(seen) == 1


def test_instance_half_is_per_sample_and_eval_keeps_instance_statistics():
    ibn = InstanceBatchNorm2d(6).eval()
    x = torch.randn(4, 6, 5, 5) * 5 + 3
    y = ibn(x)
    torch.testing.assert_close(y[:, :3].mean((2, 3)), torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, :3].std((2, 3), correction=0), torch.ones(4, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y[:, 3:], (x[:, 3:] / (1 + 1e-5) ** 0.5))  # fresh running stats: 0 mean, 1 var
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(ibn.train()(x[perm])[:, :3], ibn(x)[perm, :3])


@pytest.mark.parametrize("train", [True, False])
def test_one_by_one_maps_fail_clearly_in_train_and_eval(train):
    ibn = InstanceBatchNorm2d(8).train(train)
    with pytest.raises(ValueError, match="1x1 feature map"):
        ibn(torch.randn(4, 8, 1, 1))
    ibn.BN = convert_sync_batchnorm(ibn.BN)
    with pytest.raises(ValueError, match="1x1 feature map"):
        ibn(torch.randn(4, 8, 1, 1))
    assert ibn(torch.randn(1, 8, 2, 1)).shape == (1, 8, 2, 1)  # batch 1 with H*W = 2 is fine


@pytest.mark.parametrize(("planes", "ratio"), [(3, 0.25), (1, 0.5), (4, 0.0), (4, 1.0), (4, 1.5), (4, -0.5)])
def test_ratios_without_two_halves_are_refused(planes, ratio):
    with pytest.raises(ValueError, match="InstanceBatchNorm2d"):
        InstanceBatchNorm2d(planes, ratio)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"expects \(N, 8, H, W\)"):
        InstanceBatchNorm2d(8)(torch.randn(2, 6, 4, 4))


# --- weights carried over ------------------------------------------------------------------

def test_from_batchnorm_keeps_the_batchnorm_function_on_its_channels():
    bn = randomize(nn.BatchNorm2d(9)).double().eval()
    ibn = InstanceBatchNorm2d.from_batchnorm(bn, 0.5).eval()
    x = torch.randn(3, 9, 6, 6, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(ibn(x)[:, 4:], bn(x)[:, 4:], atol=1e-12, rtol=0)
    torch.testing.assert_close(ibn.IN.weight, bn.weight[:4], atol=0, rtol=0)
    torch.testing.assert_close(ibn.IN.bias, bn.bias[:4], atol=0, rtol=0)
    assert ibn.BN.eps == bn.eps and ibn.BN.momentum == bn.momentum and ibn.IN.eps == bn.eps
    with pytest.raises(ValueError, match="affine parameters and running statistics"):
        InstanceBatchNorm2d.from_batchnorm(nn.BatchNorm2d(4, affine=False))


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_ibn_a_conversion_keeps_pretrained_weights_and_bn_channel_outputs(library):
    plain = randomize(create_backbone(library, "resnet18")).eval()
    before = copy.deepcopy(plain.state_dict())
    seen: dict[str, torch.Tensor] = {}
    plain.layer1[0].bn1.register_forward_hook(lambda m, a, out: seen.__setitem__("plain", out))
    x = torch.randn(2, 3, 32, 32)
    plain(x)
    ibn = to_ibn_a(copy.deepcopy(plain)).eval()
    ibn.layer1[0].bn1.register_forward_hook(lambda m, a, out: seen.__setitem__("ibn", out))
    ibn(x)
    # the stem is unchanged, so the first IBN sees the same input: its BN half computes the same
    torch.testing.assert_close(seen["ibn"][:, 32:], seen["plain"][:, 32:], atol=1e-5, rtol=0)
    after = ibn.state_dict()
    for key, value in before.items():
        if key.split(".")[0] in ("layer1", "layer2", "layer3") and ".bn1." in key:
            stem, leaf = key.rsplit(".", 1)
            h = value.shape[0] // 2 if value.dim() else 0
            if leaf in ("weight", "bias"):
                torch.testing.assert_close(after[f"{stem}.IN.{leaf}"], value[:h], atol=0, rtol=0)
            torch.testing.assert_close(after[f"{stem}.BN.{leaf}"], value[h:] if value.dim() else value, atol=0, rtol=0)
        else:
            torch.testing.assert_close(after[key], value, atol=0, rtol=0)


def test_ibn_b_conversion_keeps_weights_and_the_stem_affine():
    plain = randomize(torchvision_resnet("resnet18"))
    before = copy.deepcopy(plain.state_dict())
    after = to_ibn_b(plain).state_dict()
    new = {"layer1.1.IN.weight", "layer1.1.IN.bias", "layer2.1.IN.weight", "layer2.1.IN.bias"}
    dropped = {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    assert set(after) == (set(before) - dropped) | new
    for key in set(before) - dropped:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)
    assert all(after[k].eq(1 if k.endswith("weight") else 0).all() for k in new)  # identity affine


# --- placement -----------------------------------------------------------------------------

BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet50": [3, 4, 6, 3]}
META = torch.device("meta")  # structure-only tests: no weight initialisation


def norm_names(backbone: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the IBN layers and of the InstanceNorm2d layers outside them."""
    ibn = [n for n, m in backbone.named_modules() if isinstance(m, InstanceBatchNorm2d)]
    ins = [n for n, m in backbone.named_modules()
           if type(m) is nn.InstanceNorm2d and not any(n.startswith(f"{i}.") for i in ibn)]
    return ibn, ins


def count_bn(backbone: nn.Module) -> int:
    return sum(type(m) is nn.BatchNorm2d for m in backbone.modules())


@pytest.mark.parametrize("library", ["torchvision", "timm"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_ibn_a_placement(library, name):
    with META:
        plain = create_backbone(library, name)
    n_bn = count_bn(plain)
    net = to_ibn_a(plain)
    ibn, ins = norm_names(net)
    # IBN-Net's ibn_cfg ('a', 'a', 'a', None): bn1 of every block of layer1-3 (13 in ResNet-50)
    assert ibn == [f"layer{s + 1}.{i}.bn1" for s in range(3) for i in range(BLOCKS[name][s])]
    assert len(ibn) == {"resnet18": 6, "resnet50": 13}[name]
    assert ins == [] and count_bn(net) == n_bn  # each IBN keeps a BN half
    assert all(m.half == m.planes // 2 for m in net.modules() if isinstance(m, InstanceBatchNorm2d))


@pytest.mark.parametrize(("library", "blocks"), [("torchvision", (BasicBlockIBNb, BottleneckIBNb)),
                                                  ("timm", (TimmBasicBlockIBNb, TimmBottleneckIBNb))])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_ibn_b_placement(library, blocks, name):
    with META:
        plain = create_backbone(library, name)
    n_bn = count_bn(plain)
    net = to_ibn_b(plain)
    ibn, ins = norm_names(net)
    last1, last2 = BLOCKS[name][0] - 1, BLOCKS[name][1] - 1
    # IBN-Net's ibn_cfg ('b', 'b', None, None): the stem's BN replaced, IN after the last block of layer1, layer2
    assert ibn == [] and ins == ["bn1", f"layer1.{last1}.IN", f"layer2.{last2}.IN"]
    assert net.layer1[-1].IN.num_features == 64 * (4 if name == "resnet50" else 1)
    subclass = blocks[name == "resnet50"]
    assert [n for n, m in net.named_modules() if type(m) is subclass] == [f"layer1.{last1}", f"layer2.{last2}"]
    assert count_bn(net) == n_bn - 1  # only the stem's BN is gone; downsample branches keep theirs


@pytest.mark.parametrize(("builder", "convert", "name"), [(resnet50_ibn_a, to_ibn_a, "resnet50"),
                                                          (resnet50_ibn_b, to_ibn_b, "resnet50"),
                                                          (resnet18_ibn_a, to_ibn_a, "resnet18"),
                                                          (resnet18_ibn_b, to_ibn_b, "resnet18")])
def test_named_constructor_equals_converter(builder, convert, name):
    with META:
        built, converted = builder(), convert(torchvision_resnet(name))
    assert str(built) == str(converted)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in
                                                                    converted.state_dict().items()}
    assert built.out_features == converted.out_features == {"resnet18": 512, "resnet50": 2048}[name]
    assert builder.__name__ in TLLAB_MODELS
    with META:
        assert str(create_backbone("tllab", builder.__name__)) == str(built)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_keys_match_the_official_checkpoints(variant):
    """The key set of IBN-Net's released resnet50_ibn_{a,b} checkpoints (without fc), so they load strictly."""
    with META:
        plain = torchvision_resnet("resnet50").state_dict()
        net = resnet50_ibn_a() if variant == "a" else resnet50_ibn_b()
    official = {}
    for key, value in plain.items():
        stem, leaf = key.rsplit(".", 1)
        if variant == "a" and stem.endswith(".bn1") and stem[:6] in ("layer1", "layer2", "layer3"):
            h = value.shape[0] // 2 if value.dim() else 0
            if leaf in ("weight", "bias"):
                official[f"{stem}.IN.{leaf}"] = value[:h]
            official[f"{stem}.BN.{leaf}"] = value[h:] if value.dim() else value
        elif not (variant == "b" and stem == "bn1" and leaf not in ("weight", "bias")):
            official[key] = value
    if variant == "b":
        official.update({f"{s}.IN.{leaf}": torch.ones(c) for s, c in (("layer1.2", 256), ("layer2.3", 512))
                         for leaf in ("weight", "bias")})
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in official.items()}


def test_digits_cnn_ibn_a_and_ibn_b():
    net = to_ibn_a(DigitsCNN())
    assert [type(m).__name__ for m in net.features[1:10:4]] == ["InstanceBatchNorm2d", "InstanceBatchNorm2d",
                                                              "BatchNorm2d"]
    assert [m.planes for m in net.features[1:6:4]] == [32, 64]
    assert ibn_variant(net) == "a"

    plain = randomize(DigitsCNN()).eval()
    net = to_ibn_b(copy.deepcopy(plain)).eval()
    assert list(net.norm_layers) == ["ibn_b_block1", "ibn_b_block2"]
    assert [m.num_features for m in net.norm_layers.values()] == [32, 64]
    randomize(net.norm_layers)
    x = torch.randn(3, 3, 32, 32)
    h = x
    for i, layer in enumerate(plain.features):  # IN on the output of block1 and block2 (after the pool)
        h = layer(h)
        if i in (3, 7):
            h = net.norm_layers[f"ibn_b_block{(i + 1) // 4}"](h)
    torch.testing.assert_close(net(x), h)
    assert ibn_variant(net) == "b"
    torch.testing.assert_close(copy.deepcopy(net)(x), h)  # the hook follows a copied model


def test_other_backbones_and_double_conversion_are_refused():
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for convert in (to_ibn_a, to_ibn_b):
        with pytest.raises(ConfigError, match="digits_cnn.*resnet18"):
            convert(other)
    for built in (resnet18_ibn_a(), resnet18_ibn_b(), to_ibn_b(DigitsCNN())):
        for convert in (to_ibn_a, to_ibn_b):
            with pytest.raises(ConfigError, match="already has IBN-"):
                convert(built)
    net = torchvision_resnet("resnet18")
    net.layer2[0].bn1 = SyncBatchNorm(128)
    with pytest.raises(ConfigError, match=r"layer2.0.bn1 to be a BatchNorm2d, found SyncBatchNorm"):
        to_ibn_a(net)


# --- the strategy ---------------------------------------------------------------------------

def build(*overrides: str) -> nn.Module:
    cfg, _ = resolve_config(compose_config(list(overrides)))
    return build_model(cfg, build_plugins("norm", cfg.norm).values())


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("backbone", [["backbone=digits_cnn"], ["backbone=resnet18"],
                                      ["backbone=timm", "backbone.name=resnet18"]])
def test_yamls_build_and_resnets_train_a_step(variant, backbone):
    model = build(f"norm=ibn_{variant}", *backbone)
    assert ibn_variant(model.backbone) == variant
    x = torch.randn(4, 3, 32, 32)
    logits, _ = model(x)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_strategy_options_are_checked():
    assert build_plugins("norm", {"x": {"_target_": "tllab.norm.ibn.IBNStrategy", "ratio": 0.25}})["x"].ratio == 0.25
    for bad, match in [({"variant": "c"}, "variant must be 'a'"), ({"ratio": 1.0}, r"ratio must be in \(0, 1\)"),
                       ({"variant": "b", "ratio": 0.3}, "IBN-a only")]:
        with pytest.raises(ConfigError, match=match):
            build_plugins("norm", {"x": {"_target_": "tllab.norm.ibn.IBNStrategy", **bad}})
    with pytest.raises(ConfigError, match="already has IBN-a"):
        build("norm=ibn_a", "backbone=resnet18", "backbone.library=tllab", "backbone.name=resnet18_ibn_a")
    model = build("backbone=resnet18", "backbone.library=tllab", "backbone.name=resnet18_ibn_b")
    assert ibn_variant(model.backbone) == "b"


def test_trains_end_to_end_on_digits(train_run):
    summary = train_run("norm=ibn_a", "trainer.max_steps=2")
    assert summary["norm"] == "ibn_a" and summary["steps"] == 2
    assert 0 <= summary["final"]["target_test/acc"] <= 1


# --- synchronized BN half ------------------------------------------------------------------

SPLIT = (5, 11)


def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 7, 4, 5, generator=g, dtype=torch.float64)
    x[8:] = 3 * x[8:] + 2
    return x, torch.randn(16, 7, 4, 5, generator=g, dtype=torch.float64)


def make_layer() -> InstanceBatchNorm2d:
    return randomize(InstanceBatchNorm2d(7, 0.5).double())


def sync_worker(rank: int, world: int, out_dir: str) -> None:
    layer = convert_sync_batchnorm(make_layer())
    assert type(layer.BN) is SyncBatchNorm and type(layer.IN) is nn.InstanceNorm2d
    lo = sum(SPLIT[:rank])
    for step in range(2):
        x, dy = make_batch(step)
        xs = x[lo:lo + SPLIT[rank]].clone().requires_grad_()
        layer.zero_grad()
        y = layer(xs)
        (y * dy[lo:lo + SPLIT[rank]]).sum().backward()
    torch.save({"y": y.detach(), "dx": xs.grad, "grads": grads(layer), "mean": layer.BN.running_mean,
                "var": layer.BN.running_var}, f"{out_dir}/rank{rank}.pt")


def test_sync_bn_half_over_two_processes_equals_one_process(tmp_path: Path):
    run_gloo(sync_worker, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = make_layer()
    for step in range(2):
        x, dy = make_batch(step)
        x.requires_grad_()
        ref.zero_grad()
        y = ref(x)
        (y * dy).sum().backward()
    for r, sl in enumerate([slice(0, 5), slice(5, 16)]):
        torch.testing.assert_close(ranks[r]["y"], y[sl].detach(), **F64)
        torch.testing.assert_close(ranks[r]["dx"], x.grad[sl], **F64)
        torch.testing.assert_close(ranks[r]["mean"], ref.BN.running_mean, **F64)
        torch.testing.assert_close(ranks[r]["var"], ref.BN.running_var, **F64)
    for g0, g1, want in zip(ranks[0]["grads"], ranks[1]["grads"], grads(ref)):  # data parallel sums them
        torch.testing.assert_close(g0 + g1, want, **F64)

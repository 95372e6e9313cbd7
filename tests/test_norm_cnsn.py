"""CrossNorm, SelfNorm and CNSN: the layers' statistics, crops, gradients and gates; the plug-ins'
per-step activation, placement on every backbone family and short training runs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tests.norm_helpers import styled_features
from tllab.errors import ConfigError
from tllab.models import Classifier, create_backbone
from tllab.norm.cnsn import (
    CNSN,
    CNSNStrategy,
    CrossNorm,
    CrossNormStrategy,
    SelfNorm,
    random_box,
)
from tllab.plugin import SetupContext, build_plugins
from tllab.trainer import build_model


def features(shape: tuple[int, ...] = (6, 4, 7, 8), seed: int = 0) -> torch.Tensor:
    return styled_features(shape, seed)


def stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x, dim=(2, 3))
    return mean, (var + eps).sqrt()


def active_crossnorm(crop: str = "neither", seed: int = 0) -> CrossNorm:
    cn = CrossNorm(crop, generator=torch.Generator().manual_seed(seed)).double()
    cn.active = True
    return cn


def box_slices(box: tuple[int, int, int, int]) -> tuple[slice, ...]:
    return slice(None), slice(None), slice(box[0], box[1]), slice(box[2], box[3])


# ---------------------------------------------------------------- CrossNorm
def test_crossnorm_is_the_identity_unless_active_in_training():
    x = features()
    assert CrossNorm()(x) is x  # not active
    assert active_crossnorm().eval()(x) is x
    tiny = features((4, 3, 1, 1))
    assert active_crossnorm("both")(tiny) is tiny  # 1x1: documented no-op


def test_crop_neither_takes_the_partners_mean_and_std():
    x = features()
    out = active_crossnorm(seed=4)(x)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))
    assert not torch.equal(perm, torch.arange(len(x)))
    mean, std = stats(x)
    out_mean, out_std = stats(out, eps=0.0)
    torch.testing.assert_close(out_mean, mean[perm], rtol=0, atol=1e-10)
    torch.testing.assert_close(out_std, std[perm], rtol=0, atol=1e-4)  # up to eps (1e-5) in the variances


def test_identity_permutation_gives_the_input():
    x = features((1, 3, 5, 5))  # randperm(1) is the identity
    torch.testing.assert_close(active_crossnorm()(x), x, rtol=0, atol=1e-12)


def test_content_crop_restyles_only_its_box():
    x = features((6, 4, 16, 16))
    out = active_crossnorm("content", seed=2)(x)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(len(x), generator=g)
    box = box_slices(random_box(16, 16, 1.0, g))
    outside = torch.ones_like(x, dtype=torch.bool)
    outside[box] = False
    assert torch.equal(out[outside], x[outside])  # bit-identical outside the box
    mean, std = stats(x)  # style: the partner's whole map
    out_mean, out_std = stats(out[box], eps=0.0)
    torch.testing.assert_close(out_mean, mean[perm], rtol=0, atol=1e-10)
    torch.testing.assert_close(out_std, std[perm], rtol=0, atol=1e-3)


def test_style_crop_takes_the_statistics_of_the_partners_box():
    x = features((6, 4, 16, 16))
    out = active_crossnorm("style", seed=5)(x)
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(len(x), generator=g)
    mean, _ = stats(x[box_slices(random_box(16, 16, 1.0, g))])
    torch.testing.assert_close(stats(out)[0], mean[perm], rtol=0, atol=1e-10)


def test_boxes_are_large_enough_and_tiny_maps_terminate():
    g = torch.Generator().manual_seed(0)
    for h in range(1, 9):
        for w in range(1, 9):
            for _ in range(20):
                top, bottom, left, right = random_box(h, w, 1.0, g)
                area = (bottom - top) * (right - left)
                assert 0 <= top < bottom <= h and 0 <= left < right <= w
                assert (top, bottom, left, right) == (0, h, 0, w) or (area > 0.1 * h * w and area >= 2)
    areas = {(b - t) * (r - lf) for t, b, lf, r in (random_box(32, 32, 1.0, g) for _ in range(100))}
    assert len(areas) > 20 and max(areas) < 32 * 32  # real random boxes on normal maps
    for shape in [(4, 3, 1, 1), (4, 3, 2, 2), (4, 3, 1, 2), (4, 3, 2, 1), (4, 3, 3, 3)]:
        out = active_crossnorm("both")(features(shape))
        assert out.shape == shape and torch.isfinite(out).all()


def test_crossnorm_gradient_flows_into_the_partner():
    x = features().requires_grad_()
    out = active_crossnorm(seed=4)(x)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))
    b = int((perm != torch.arange(len(x))).nonzero()[0, 0])
    out[b].pow(2).sum().backward()
    assert x.grad[perm[b]].abs().sum() > 0  # not detached, unlike MixStyle
    others = [i for i in range(len(x)) if i not in (b, int(perm[b]))]
    assert torch.equal(x.grad[others], torch.zeros_like(x.grad[others]))


@pytest.mark.parametrize("crop", ["neither", "style", "content", "both"])
def test_crossnorm_gradients_match_autograd_through_the_formula(crop: str):
    x = features((3, 2, 5, 5)).requires_grad_()
    cn = active_crossnorm(crop, seed=1)

    def f(t):
        cn.generator.manual_seed(1)
        return cn(t)

    assert torch.autograd.gradcheck(f, (x,))


# ---------------------------------------------------------------- SelfNorm
def selfnorm_by_hand(x: list[list[list[float]]], w, rm, rv, gamma, beta) -> list[list[list[float]]]:
    """Eval-mode SelfNorm on (N, C, L) lists: x * sigmoid(BN(w0 mean + w1 std))."""
    out = []
    for sample in x:
        row = []
        for c, values in enumerate(sample):
            n = len(values)
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) + 1e-12)
            z = w[c][0] * mean + w[c][1] * std
            gate = 1 / (1 + math.exp(-((z - rm[c]) / math.sqrt(rv[c] + 1e-5) * gamma[c] + beta[c])))
            row.append([v * gate for v in values])
        out.append(row)
    return out


def test_selfnorm_equals_the_hand_computation():
    x = [[[1.0, 2.0, 4.0], [0.0, 0.5, 3.0]], [[-1.0, 1.0, 3.0], [5.0, 5.0, 8.0]]]
    w, rm, rv = [[0.5, -0.25], [1.0, 2.0]], [0.1, -0.2], [2.0, 0.5]
    gamma, beta = [1.5, -1.0], [0.2, 0.3]
    sn = SelfNorm(2).double().eval()
    with torch.no_grad():
        for tensor, value in [(sn.g_fc.weight, w), (sn.g_bn.running_mean, rm), (sn.g_bn.running_var, rv),
                              (sn.g_bn.weight, gamma), (sn.g_bn.bias, beta)]:
            tensor.copy_(torch.tensor(value, dtype=torch.float64).view_as(tensor))
    out = sn(torch.tensor(x, dtype=torch.float64).unsqueeze(2))  # (2, 2, 1, 3)
    expected = torch.tensor(selfnorm_by_hand(x, w, rm, rv, gamma, beta), dtype=torch.float64).unsqueeze(2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_selfnorm_gates_of_one_half_and_the_mean_gate():
    x = features()
    sn = SelfNorm(4, mean_gate=True).double()
    with torch.no_grad():
        for p in sn.parameters():
            p.zero_()  # g = f = sigmoid(0) = 1/2, in training and in eval
    assert torch.equal(sn(x), 0.5 * x) and torch.equal(sn.eval()(x), 0.5 * x)
    with torch.no_grad():
        sn.f_bn.bias.fill_(math.log(3.0))  # f = sigmoid(log 3) = 3/4: y = x g + mean (f - g)
    mean = x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(sn(x), 0.5 * x + 0.25 * mean, rtol=0, atol=1e-12)


def test_selfnorm_parameters_get_gradients_and_tiny_inputs():
    x = features((3, 2, 3, 4)).requires_grad_()
    sn = SelfNorm(2, mean_gate=True).double()
    assert torch.autograd.gradcheck(lambda t, *p: sn(t), (x, *sn.parameters()))
    assert torch.isfinite(SelfNorm(3)(torch.randn(4, 3, 1, 1))).all()  # 1x1: sigma = 1e-6, not NaN
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SelfNorm(3)(torch.randn(1, 3, 4, 4))  # training needs a batch of 2 (BatchNorm1d), documented


@pytest.mark.parametrize("crop", ["neither", "style", "content"])
def test_cnsn_is_crossnorm_then_selfnorm(crop: str):
    x = features().requires_grad_()
    fused = CNSN(4, crop, mean_gate=True, generator=torch.Generator()).double()
    fused.crossnorm.active = True
    plain = copy.deepcopy(fused)
    fused.crossnorm.generator.manual_seed(3)
    plain.crossnorm.generator = torch.Generator().manual_seed(3)
    y, ref = fused(x), plain.selfnorm(plain.crossnorm(x))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, *fused.parameters()], grad),
                    torch.autograd.grad(ref, [x, *plain.parameters()], grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    fused.crossnorm.active = False
    torch.testing.assert_close(fused(x), fused.selfnorm(x), rtol=0, atol=0)


# ---------------------------------------------------------------- the plug-ins
def digits_model() -> Classifier:
    return Classifier(create_backbone("tllab", "digits_cnn"), 10)


def set_up(plugin, seed: int = 0):
    model = plugin.transform_model(digits_model())
    plugin.setup(SetupContext(model, None, torch.device("cpu"), Path("."), {"seed": seed}))
    return model


def activations(plugin, steps: int) -> list[list[int]]:
    draws = [plugin.active_indices()]
    for _ in range(steps):
        plugin.after_step(None)
        draws.append(plugin.active_indices())
    return draws


def test_cnsn_activates_exactly_active_num_modules_per_step_with_probability_p():
    plugin = CNSNStrategy(p=0.5, active_num=2)
    set_up(plugin)
    draws = activations(plugin, 600)
    assert {len(d) for d in draws} == {0, 2}
    assert sum(bool(d) for d in draws) / len(draws) == pytest.approx(0.5, abs=0.07)
    assert len({tuple(d) for d in draws if d}) == 3  # every pair of the 3 stages gets chosen
    again = CNSNStrategy(p=0.5, active_num=2)
    set_up(again)
    assert activations(again, 600) == draws  # deterministic for a fixed seed
    other = CNSNStrategy(p=0.5, active_num=2)
    set_up(other, seed=1)
    assert activations(other, 600) != draws


def test_only_the_active_modules_change_their_stage_output():
    plugin = CrossNormStrategy(p=1.0, active_num=1)
    model = set_up(plugin)
    changed = {}
    for name, module in model.norm_layers.items():
        module.register_forward_hook(lambda m, i, o, name=name: changed.__setitem__(name, o is not i[0]))
    model.train()(torch.randn(4, 3, 32, 32))
    assert sum(changed.values()) == 1 and changed[list(model.norm_layers)[plugin.active_indices()[0]]]
    model.eval()(torch.randn(4, 3, 32, 32))
    assert not any(changed.values())


def test_strategy_state_restores_generator_and_active_modules():
    a = CrossNormStrategy(p=0.5, active_num=2)
    set_up(a, seed=3)
    activations(a, 5)
    b = CrossNormStrategy(p=0.5, active_num=2)
    set_up(b, seed=9)
    b.load_state_dict(a.state_dict())
    assert b.active_indices() == a.active_indices() and activations(b, 50) == activations(a, 50)


def test_strategy_options_are_checked():
    with pytest.raises(ConfigError, match="active_num=4 but there are only 3 CrossNorm modules"):
        CrossNormStrategy(active_num=4).transform_model(digits_model())
    with pytest.raises(ConfigError, match=r"norm.cnsn.stages: unknown stage\(s\) \['layer4'\].*valid stages"):
        CNSNStrategy(stages=["layer4"]).transform_model(digits_model())
    for bad in ({"crop": "box"}, {"p": 2.0}, {"active_num": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_plugins("norm", {"crossnorm": {"_target_": "tllab.norm.cnsn.CrossNormStrategy", **bad}})


BACKBONES = [
    (["backbone=digits_cnn"], ["block1", "block2", "block3"]),
    (["backbone=resnet18"], ["layer1", "layer2", "layer3", "layer4"]),
    (["backbone=timm", "backbone.name=resnet18"], ["layer1", "layer2", "layer3", "layer4"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BACKBONES)
@pytest.mark.parametrize("name", ["crossnorm", "selfnorm", "cnsn"])
def test_yamls_build_one_module_after_every_stage(name: str, overrides: list[str], expected: list[str]):
    cfg = OmegaConf.to_object(compose_config([f"norm={name}", *overrides]))
    plugin = build_plugins("norm", cfg.norm)[name]
    assert plugin.stages is None
    if name != "selfnorm":
        assert (plugin.p, plugin.active_num, plugin.crop, plugin.beta) == (0.5, 1, "neither", 1.0)
    model = build_model(cfg, [plugin])
    assert list(model.norm_layers) == [f"{name}_{s}" for s in expected]
    if name != "crossnorm":  # SelfNorm lives in the model: saved with it and trained in its default groups
        keys = [k for k in model.state_dict() if k.startswith("norm_layers.")]
        assert f"norm_layers.{name}_{expected[0]}.{'selfnorm.' if name == 'cnsn' else ''}g_fc.weight" in keys
        grouped = {id(p) for g in model.get_parameters(1e-3) for p in g["params"]}
        assert all(id(p) in grouped for p in model.norm_layers.parameters())
    if name != "selfnorm":
        plugin.setup(SetupContext(model, None, torch.device("cpu"), Path("."), {"seed": 0}))
        for cn in plugin.crossnorms:
            cn.active = True  # including ResNet layer4's 1x1 maps at 32 px: a no-op, not NaN
    logits, _ = model.train()(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["crossnorm", "selfnorm", "cnsn"])
def test_trains_two_steps_on_digits(train_run, name: str):
    result = train_run(f"norm={name}", "trainer.max_steps=2")
    assert result["steps"] == 2 and math.isfinite(result["final"]["train/loss"])

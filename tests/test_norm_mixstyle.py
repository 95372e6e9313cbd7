"""MixStyle: the layer's statistics, detach, lambda distribution and cross-domain partners; the
plug-in's placement on every backbone family, its config checks and short training runs."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tests.norm_helpers import styled_features
from tllab.errors import ConfigError
from tllab.models import Classifier, create_backbone
from tllab.norm import mixstyle
from tllab.norm.mixstyle import MixStyle, MixStyleStrategy, sample_beta
from tllab.norm.placement import stages
from tllab.plugin import build_plugins
from tllab.trainer import build_model


def features(shape: tuple[int, ...] = (8, 4, 5, 6), seed: int = 0) -> torch.Tensor:
    return styled_features(shape, seed)


def stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True)
    return mean, (var + eps).sqrt()


def replay(seed: int, alpha: float, batch: int, layer: MixStyle) -> tuple[torch.Tensor, torch.Tensor]:
    """The lambda and permutation a seeded layer draws in its first mixing forward (after the coin)."""
    g = torch.Generator().manual_seed(seed)
    torch.rand((), generator=g)
    lam = sample_beta(alpha, batch, g).view(batch, 1, 1, 1)
    twin = MixStyle(mix=layer.mix, num_domains=layer.num_domains, generator=g)
    return lam, twin.partners(batch)


# ---------------------------------------------------------------- the layer
def test_identity_in_eval_with_p_zero_and_on_one_by_one_maps():
    x = features()
    assert MixStyle(p=1.0).eval()(x) is x
    assert torch.equal(MixStyle(p=0.0)(x), x)
    tiny = features((4, 3, 1, 1))
    out = MixStyle(p=1.0)(tiny)
    assert torch.equal(out, tiny) and torch.isfinite(out).all()  # 1x1: documented no-op, never NaN
    two = MixStyle(p=1.0, generator=torch.Generator().manual_seed(0))(features((4, 3, 1, 2)))
    assert torch.isfinite(two).all()


def test_output_is_the_mixed_statistics_of_the_replayed_draws():
    x, seed, alpha = features(), 3, 0.3
    layer = MixStyle(p=1.0, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    out = layer(x)
    lam, perm = replay(seed, alpha, len(x), layer)
    mu, sig = stats(x)
    expected = (x - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_gradient_is_sigma_mix_over_sigma_because_statistics_are_detached():
    x, seed, alpha = features().requires_grad_(), 1, 0.5
    layer = MixStyle(p=1.0, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    layer(x).sum().backward()
    lam, perm = replay(seed, alpha, len(x), layer)
    _, sig = stats(x.detach())
    expected = ((lam * sig + (1 - lam) * sig[perm]) / sig).expand_as(x)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(expected, torch.ones_like(expected))  # the check has teeth


def test_lambda_one_gives_the_input_and_an_identity_jacobian(monkeypatch):
    monkeypatch.setattr(mixstyle, "sample_beta", lambda alpha, n, generator=None: torch.ones(n, dtype=torch.float64))
    x = features().requires_grad_()
    out = MixStyle(p=1.0, generator=torch.Generator().manual_seed(0))(x)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(x)
    (grad_in,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(grad_in, grad_out, rtol=0, atol=1e-12)  # J = I: nothing flows through the stats


def test_lambda_is_beta_alpha_alpha():
    g = torch.Generator().manual_seed(0)
    lam = sample_beta(0.1, 100_000, g)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert ((lam > 0.1) & (lam < 0.9)).double().mean().item() == pytest.approx(0.187, abs=0.005)
    for alpha in (0.1, 2.0):  # mean 1/2, variance 1 / (4 (2 alpha + 1))
        lam = sample_beta(alpha, 100_000, g)
        assert lam.mean().item() == pytest.approx(0.5, abs=0.005)
        assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.02)


def test_coin_mixes_a_fraction_p_of_the_calls():
    layer = MixStyle(p=0.5, generator=torch.Generator().manual_seed(0))
    x = features((4, 2, 2, 2))
    changed = sum(not torch.equal(layer(x), x) for _ in range(2000))
    assert changed / 2000 == pytest.approx(0.5, abs=0.04)


def test_same_seed_same_output_and_half_precision():
    x = features()
    a = MixStyle(p=1.0, generator=torch.Generator().manual_seed(7))(x)
    b = MixStyle(p=1.0, generator=torch.Generator().manual_seed(7))(x)
    c = MixStyle(p=1.0, generator=torch.Generator().manual_seed(8))(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    half = MixStyle(p=1.0, generator=torch.Generator().manual_seed(7))(x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


@pytest.mark.parametrize(("domains", "per_domain"), [(3, 3), (2, 4), (4, 1)])
def test_crossdomain_partners_are_a_permutation_into_other_domains(domains: int, per_domain: int):
    layer = MixStyle(mix="crossdomain", num_domains=domains, generator=torch.Generator().manual_seed(0))
    own = torch.arange(domains * per_domain) // per_domain
    for _ in range(50):
        perm = layer.partners(domains * per_domain)
        assert sorted(perm.tolist()) == list(range(domains * per_domain))
        assert (own[perm] != own).all()


def test_crossdomain_output_style_comes_from_another_domain(monkeypatch):
    # lambda = 0: each output takes its partner's style, which identifies the partner's domain
    monkeypatch.setattr(mixstyle, "sample_beta", lambda alpha, n, generator=None: torch.zeros(n, dtype=torch.float64))
    domains, per_domain = 3, 3  # an odd batch of 9
    content = torch.randn(9, 4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    content = (content - content.mean((2, 3), keepdim=True)) / content.std(dim=(2, 3), keepdim=True)
    style_mean = torch.tensor([-3.0, 0.0, 5.0], dtype=torch.float64)  # one constant style per domain
    style_std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    own = torch.arange(9) // per_domain
    x = content * style_std[own].view(9, 1, 1, 1) + style_mean[own].view(9, 1, 1, 1)
    layer = MixStyle(p=1.0, mix="crossdomain", num_domains=domains, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        out = layer(x)
        assert out.shape == x.shape
        mean = out.mean((2, 3))
        source = (mean[:, :1] - style_mean).abs().argmin(dim=1)  # the domain whose style the sample took
        torch.testing.assert_close(mean, style_mean[source].view(9, 1).expand_as(mean), rtol=0, atol=1e-9)
        assert (source != own).all()


def test_crossdomain_batch_not_a_multiple_of_the_domains_fails_naming_the_sampler():
    layer = MixStyle(p=1.0, mix="crossdomain", num_domains=3)
    with pytest.raises(ValueError, match="dataset.sampler=domain_balanced"):
        layer(features((10, 2, 3, 3)))


@pytest.mark.parametrize(("option", "value"), [("p", 1.5), ("alpha", 0.0), ("mix", "domain"), ("num_domains", 1)])
def test_bad_options_are_refused(option: str, value):
    with pytest.raises(ValueError, match=option):
        MixStyle(**{option: value})


# ---------------------------------------------------------------- the plug-in
BACKBONES = [
    (["backbone=digits_cnn"], ["block1", "block2"]),
    (["backbone=resnet18"], ["layer1", "layer2", "layer3"]),
    (["backbone=timm", "backbone.name=resnet18"], ["layer1", "layer2", "layer3"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BACKBONES)
def test_yaml_builds_one_module_after_each_default_stage(overrides: list[str], expected: list[str]):
    cfg = OmegaConf.to_object(compose_config(["norm=mixstyle", *overrides]))
    plugin = build_plugins("norm", cfg.norm)["mixstyle"]
    assert (plugin.p, plugin.alpha, plugin.eps, plugin.mix, plugin.stages) == (0.5, 0.1, 1e-6, "random", None)
    model = build_model(cfg, [plugin])
    assert list(model.norm_layers) == [f"mixstyle_{s}" for s in expected]
    assert all(isinstance(m, MixStyle) for m in model.norm_layers.values())
    calls: dict[str, int] = {}
    for name, module in model.norm_layers.items():
        module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x = torch.randn(4, 3, 32, 32)
    plugin.generator.manual_seed(0)
    model.train()
    for m in model.norm_layers.values():
        m.p = 0.0
    plain, _ = model(x)
    for m in model.norm_layers.values():
        m.p = 1.0
    mixed, _ = model(x)
    assert calls == {f"mixstyle_{s}": 2 for s in expected}  # exactly one module per stage, once per forward
    assert not torch.allclose(plain, mixed)  # the hooks change the stages' outputs in training
    passed_through = []
    for module in model.norm_layers.values():
        module.register_forward_hook(lambda m, i, o: passed_through.append(o is i[0]))
    model.eval()(x)
    assert passed_through == [True] * len(expected)  # identity in eval


def test_configured_stages_and_unknown_stage_names():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    MixStyleStrategy(stages=["block3"]).transform_model(model)
    assert list(model.norm_layers) == ["mixstyle_block3"]
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    valid = r"valid stages: \['block1', 'block2', 'block3'\]"
    with pytest.raises(ConfigError, match=r"norm.mixstyle.stages: unknown stage\(s\) \['layer1'\].*" + valid):
        MixStyleStrategy(stages=["layer1"]).transform_model(model)
    assert list(stages(model.backbone)) == ["block1", "block2", "block3"]


def test_yaml_option_errors_fail_before_data():
    with pytest.raises(ConfigError, match="mix"):
        build_plugins("norm", {"mixstyle": {"_target_": "tllab.norm.mixstyle.MixStyleStrategy", "mix": "cross"}})


def test_generator_state_is_saved_and_restored():
    a = MixStyleStrategy()
    a.generator.manual_seed(5)
    torch.rand(3, generator=a.generator)
    state = a.state_dict()
    b = MixStyleStrategy()
    b.load_state_dict(state)
    assert torch.equal(torch.rand(5, generator=a.generator), torch.rand(5, generator=b.generator))


def test_trains_two_steps_on_digits(train_run):
    result = train_run("norm=mixstyle", "trainer.max_steps=2")
    assert result["steps"] == 2 and math.isfinite(result["final"]["train/loss"])


def test_crossdomain_trains_in_dg_with_balanced_batches(train_run, monkeypatch):
    seen: list[tuple[int, int | None]] = []
    partners = MixStyle.partners

    def spy(self, batch):
        seen.append((batch, self.num_domains))
        return partners(self, batch)

    monkeypatch.setattr(MixStyle, "partners", spy)
    result = train_run("experiment=digits_dg", "norm=mixstyle", "norm.mixstyle.mix=crossdomain", "norm.mixstyle.p=1.0",
                       "dataset.sampler=domain_balanced", "trainer.batch_size=27", "trainer.max_steps=2",
                       "dataset.image_size=16", "dataset.val_fraction=0")  # smaller maps and evaluation: faster
    assert result["steps"] == 2
    assert seen and set(seen) == {(27, 3)}  # three domain chunks of 9 in every training batch


@pytest.mark.parametrize("overrides", [["experiment=digits_dg"], ["dataset.sampler=domain_balanced"]])
def test_crossdomain_without_balanced_dg_batches_fails_clearly(train_run, overrides: list[str]):
    with pytest.raises(ConfigError, match="dataset.setting=dg and dataset.sampler=domain_balanced"):
        train_run("norm=mixstyle", "norm.mixstyle.mix=crossdomain", *overrides, "trainer.max_steps=2")

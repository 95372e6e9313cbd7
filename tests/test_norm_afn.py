"""AFN: the stepwise feature-norm loss, L2-preserved dropout, the AFN head and the plug-in."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.conftest import compose_config
from tllab.models import Classifier, create_backbone
from tllab.norm.afn import AdaptiveFeatureNorm, AFNHead, AFNStrategy, Block
from tllab.plugin import StepOutput, build_plugins


def features(n: int = 6, dim: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.arange(1, n + 1, dtype=torch.float64)[:, None]


# ---------------------------------------------------------------- the loss
@pytest.mark.parametrize("delta", [1.0, 0.3])
def test_loss_value_equals_the_hand_computation(delta: float):
    f = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], dtype=torch.float64)  # norms 5, 1, 10
    by_hand = sum((r - (r + delta)) ** 2 for r in (5.0, 1.0, 10.0)) / 3
    loss = AdaptiveFeatureNorm(delta)(f)
    assert loss.item() == pytest.approx(by_hand, abs=1e-12) and by_hand == pytest.approx(delta ** 2)
    assert AdaptiveFeatureNorm(delta)(features()).item() == pytest.approx(delta ** 2, abs=1e-12)


def test_gradient_is_minus_two_delta_f_over_norm_over_n():
    f = features().requires_grad_()
    delta, n = 0.7, f.shape[0]
    AdaptiveFeatureNorm(delta)(f).backward()
    expected = -2 * delta * f.detach() / f.detach().norm(dim=1, keepdim=True) / n
    torch.testing.assert_close(f.grad, expected, rtol=0, atol=1e-12)
    zero = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)  # all-zero rows (dead ReLUs): no NaN
    AdaptiveFeatureNorm(1.0)(zero).backward()
    assert torch.equal(zero.grad, torch.zeros_like(zero))


def test_one_sgd_step_increases_every_norm_by_a_fixed_step():
    f = nn.Parameter(features())
    before = f.detach().norm(dim=1)
    lr, weight, delta, n = 0.5, 0.05, 1.0, f.shape[0]
    optimizer = torch.optim.SGD([f], lr=lr)
    (weight * AdaptiveFeatureNorm(delta)(f)).backward()
    optimizer.step()
    after = f.detach().norm(dim=1)
    assert (after > before).all()
    torch.testing.assert_close(after - before, torch.full_like(before, lr * 2 * weight * delta / n), rtol=0,
                               atol=1e-12)


def test_half_precision_features_give_a_float32_loss():
    loss = AdaptiveFeatureNorm(1.0)(features().bfloat16())
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.0, abs=1e-2)


# ---------------------------------------------------------------- L2-preserved dropout and the head
@pytest.mark.parametrize("p", [0.5, 0.2])
def test_block_dropout_preserves_the_expected_squared_norm_and_is_identity_in_eval(p: float):
    torch.manual_seed(0)
    block = Block(8, 64, dropout_p=p).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    with torch.no_grad():
        hidden = torch.relu(block.eval().bn(block.fc(x)))  # the block without its dropout
        assert torch.equal(block(x), hidden)  # eval: the dropout is the identity
        block.train().bn.eval()  # fixed BatchNorm statistics: only the dropout is random
        draws = 4000
        outs = block(x.repeat(draws, 1)).view(draws, *hidden.shape)
    ratio = outs.square().sum(-1).mean(0) / hidden.square().sum(-1)  # per sample: E||h||^2 / ||h||^2
    assert ratio.sub(1).abs().max() < 0.02 and ratio.mean().sub(1).abs() < 0.005
    dropped = (outs == 0) & (hidden != 0)
    assert dropped.double().mean() / (hidden != 0).double().mean() == pytest.approx(p, abs=0.01)
    kept = outs[outs != 0] / hidden.expand_as(outs)[outs != 0]  # kept units are scaled by 1/sqrt(1-p)
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / math.sqrt(1 - p)))
    with pytest.raises(ValueError, match="dropout_p"):
        Block(8, 4, dropout_p=1.0)


def test_afn_head_shapes_and_initialisation():
    torch.manual_seed(0)
    head = AFNHead(300, 7, num_blocks=2, bottleneck_dim=200, dropout_p=0.5)
    logits, f = head.eval()(torch.randn(5, 300))
    assert logits.shape == (5, 7) and f.shape == (5, 200)
    assert [type(b) for b in head.bottleneck] == [Block, Block] and head.bottleneck[1].fc.in_features == 200
    w = head.bottleneck[0].fc.weight
    assert abs(w.std().item() - 0.01) < 1e-3 and abs(head.bottleneck[0].fc.bias.std().item() - 0.01) < 3e-3
    assert abs(head.bottleneck[0].bn.weight.mean().item() - 1) < 3e-3 and torch.all(head.bottleneck[0].bn.bias == 0)


# ---------------------------------------------------------------- the plug-in
def digits_model() -> Classifier:
    return Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=256)


def test_plugin_replaces_bottleneck_and_head_and_model_returns_logits_and_features():
    plugin = AFNStrategy(bottleneck_dim=100, num_blocks=2)
    model = plugin.transform_model(digits_model())
    assert isinstance(model, Classifier) and model.features_dim == 100
    assert [type(b) for b in model.bottleneck] == [Block, Block] and model.head.in_features == 100
    logits, f = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10) and f.shape == (4, 100)
    assert (f >= 0).all()  # the last block's output (ReLU, dropout), not the logits
    names = [g["name"] for g in model.get_parameters(1e-3)]
    assert names == ["backbone", "head"] and not any(k.startswith("bottleneck.0.0") for k in model.state_dict())


def test_plugin_loss_has_a_weighted_term_for_source_and_target():
    plugin = AFNStrategy(delta=2.0, weight=0.1)
    f_s, f_t = features().requires_grad_(), features(4, seed=1).requires_grad_()
    out = StepOutput(step=0, total_steps=1, model=nn.Identity(), x_s=torch.zeros(6), y_s=torch.zeros(6),
                     d_s=torch.zeros(6), logits_s=torch.zeros(6, 2), f_s=f_s, x_t=torch.zeros(4),
                     logits_t=torch.zeros(4, 2), f_t=f_t)
    terms = plugin.loss(out)
    assert set(terms) == {"norm_s", "norm_t"}
    assert terms["norm_s"].item() == pytest.approx(0.1 * 4) and terms["norm_t"].item() == pytest.approx(0.1 * 4)
    sum(terms.values()).backward()
    torch.testing.assert_close(f_t.grad, -2 * 0.1 * 2.0 * f_t.detach() / f_t.detach().norm(dim=1, keepdim=True) / 4)
    assert f_s.grad is not None and AFNStrategy.uses_target and AFNStrategy.exclusive == "head"


def test_entropy_term_is_tllibs_mean_target_entropy():
    logits_t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = StepOutput(step=0, total_steps=1, model=nn.Identity(), x_s=torch.zeros(2), y_s=torch.zeros(2),
                     d_s=torch.zeros(2), logits_s=torch.zeros(2, 3), f_s=features(2), x_t=torch.zeros(2),
                     logits_t=logits_t, f_t=features(2, seed=1))
    terms = AFNStrategy(entropy_weight=0.1).loss(out)
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits_t.tolist()]
    hand = sum(-sum(q * math.log(q + 1e-5) for q in row) for row in p) / 2
    assert terms["entropy"].dtype == torch.float64 and terms["entropy"].item() == pytest.approx(0.1 * hand, rel=1e-12)
    assert "entropy" not in AFNStrategy().loss(out)


def test_yaml_defaults_and_bad_options():
    cfg = compose_config(["norm=afn"])
    assert dict(cfg.norm.afn) == {"_target_": "tllab.norm.afn.AFNStrategy", "delta": 1.0, "weight": 0.05,
                                  "num_blocks": 1, "bottleneck_dim": 1000, "dropout_p": 0.5, "entropy_weight": 0.0}
    plugin = build_plugins("norm", cfg.norm)["afn"]
    assert (plugin.afn.delta, plugin.weight, plugin.num_blocks, plugin.bottleneck_dim, plugin.dropout_p) == (
        1.0, 0.05, 1, 1000, 0.5)
    from tllab.errors import ConfigError

    with pytest.raises(ConfigError, match="dropout_p"):
        build_plugins("norm", {"afn": {**cfg.norm.afn, "dropout_p": 1.0}})


def test_trains_two_steps_on_digits(train_run):
    result = train_run("norm=afn", "trainer.max_steps=2")
    assert result["steps"] == 2 and 0 <= result["final"]["target_test/acc"] <= 1
    assert result["final"]["train/norm.afn/norm_s"] == pytest.approx(0.05) == result["final"]["train/norm.afn/norm_t"]


def test_builds_on_resnet18_forward_backward_at_32px():
    torch.manual_seed(0)
    model = AFNStrategy().transform_model(Classifier(create_backbone("torchvision", "resnet18"), 10))
    logits, f = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10) and f.shape == (4, 1000) and model.bottleneck[0].fc.in_features == 512
    (nn.functional.cross_entropy(logits, torch.arange(4)) + 0.05 * AdaptiveFeatureNorm()(f)).backward()
    assert model.backbone.conv1.weight.grad is not None and model.bottleneck[0].fc.weight.grad.abs().sum() > 0

"""Domain alignment (align=dann|cdan|mcc|dan|jan|mdd|mcd): gradient reversal and its schedule, DANN's
reversed gradients and undecidable discriminator, CDAN's maps and CDAN+E weights, MCC's and MDD's losses by
hand, the Gaussian kernel and MK-MMD by hand, JAN's joint kernel and thetas, MCD's three updates and the
parameters each moves, and 2-step trainings of every align YAML."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tllab.align.cdan import CDAN, MultiLinearMap, RandomizedMultiLinearMap, entropy_weights
from tllab.align.dann import DANN
from tllab.align.discriminator import DomainDiscriminator, domain_adversarial_loss
from tllab.align.grl import GradientReverseFunction, WarmStartGradientReverseLayer, warm_start_coeff
from tllab.align.jan import JointMultipleKernelMaximumMeanDiscrepancy, Theta
from tllab.align.mcc import MinimumClassConfusionLoss
from tllab.align.mcd import class_balance_entropy, classifier_discrepancy
from tllab.align.mdd import MDD, margin_disparity_loss
from tllab.align.mmd import (
    GaussianKernel,
    MultipleKernelMaximumMeanDiscrepancy,
    default_alphas,
    mmd,
    multi_kernel,
    squared_distances,
)
from tllab.checkpoint import load_checkpoint
from tllab.errors import ConfigError
from tllab.models import Classifier, create_backbone
from tllab.plugin import StepOutput

from .conftest import interrupt_then_resume
from .test_configs import options


def _out(f_s, f_t, logits_s=None, logits_t=None, step=0):
    n = len(f_s)
    return StepOutput(step=step, total_steps=10, model=nn.Identity(), x_s=f_s, y_s=torch.zeros(n, dtype=torch.long),
                      d_s=torch.zeros(n, dtype=torch.long), logits_s=logits_s, f_s=f_s, logits_t=logits_t, f_t=f_t)


def test_gradient_reversal_is_identity_forward_and_minus_lambda_grad_backward():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 4, dtype=torch.float64)
    y = GradientReverseFunction.apply(x, 0.3)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.3 * upstream)


def test_warm_start_schedule_is_tllibs():
    assert warm_start_coeff(0) == 0.0
    assert warm_start_coeff(1000) == pytest.approx(2 / (1 + math.exp(-1)) - 1)  # 0.4621
    assert warm_start_coeff(10 ** 6) == pytest.approx(1.0)
    assert warm_start_coeff(0, lo=0.2, hi=0.8) == pytest.approx(0.2)
    assert warm_start_coeff(500, alpha=10, lo=0.2, hi=0.8, max_iters=100) == pytest.approx(
        1.2 / (1 + math.exp(-50)) - 0.6 + 0.2)
    x = torch.ones(2, requires_grad=True)
    WarmStartGradientReverseLayer()(x, step=1000).sum().backward()
    assert torch.allclose(x.grad, torch.full((2,), -warm_start_coeff(1000)))


def test_dann_gives_the_features_minus_lambda_times_the_discriminator_gradient():
    torch.manual_seed(0)
    dann = DANN(trade_off=0.7, hidden_size=8).double()
    dann.discriminator = DomainDiscriminator(4, 8).double()
    f = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    dann.loss(_out(f[:6], f[6:], step=1500))["transfer"].backward()
    reversed_grad, f.grad = f.grad, None
    d = dann.discriminator(f)
    (0.7 * domain_adversarial_loss(d[:6], d[6:])).backward()  # the same loss without reversal
    assert torch.allclose(reversed_grad, -warm_start_coeff(1500) * f.grad)
    assert all(p.grad is not None for p in dann.discriminator.parameters())  # the discriminator itself descends


@pytest.mark.parametrize("shift, accuracy", [(0.0, (0.4, 0.6)), (3.0, (0.9, 1.0))])
def test_dann_discriminator_cannot_tell_identically_distributed_domains(shift, accuracy):
    """Trained on fresh source and target batches of one distribution, the discriminator is at
    chance (accuracy ~0.5, loss ~log 2); a shifted target it tells apart (the control)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dann = DANN(hidden_size=16)
    dann.discriminator = DomainDiscriminator(4, 16)
    opt = torch.optim.Adam(dann.parameters(), lr=1e-2)
    for _ in range(150):
        f_s, f_t = torch.randn(64, 4, generator=gen), torch.randn(64, 4, generator=gen) + shift
        loss = dann.loss(_out(f_s, f_t))["transfer"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    dann.eval()
    with torch.no_grad():
        f_s, f_t = torch.randn(2000, 4, generator=gen), torch.randn(2000, 4, generator=gen) + shift
        acc = 0.5 * ((dann.discriminator(f_s) > 0).float().mean() + (dann.discriminator(f_t) <= 0).float().mean())
    assert accuracy[0] <= acc.item() <= accuracy[1]
    if not shift:
        assert loss.item() == pytest.approx(math.log(2), abs=0.05)


def test_cdan_multilinear_map_is_the_outer_product():
    f, g = torch.randn(5, 3), torch.randn(5, 4)
    out = MultiLinearMap()(f, g)
    assert out.shape == (5, 12)
    for i in range(5):
        assert torch.allclose(out[i].view(4, 3), torch.outer(g[i], f[i]))


def test_cdan_randomized_map_preserves_inner_products_in_expectation():
    torch.manual_seed(0)
    rmap = RandomizedMultiLinearMap(3, 2, output_dim=200_000).double()
    f, g = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64).softmax(1)
    t = rmap(f, g)
    exact = MultiLinearMap()(f, g)
    assert t.shape == (2, 200_000)
    assert (t[0] @ t[1]).item() == pytest.approx((exact[0] @ exact[1]).item(), rel=0.05)
    assert (t[0] @ t[0]).item() == pytest.approx((exact[0] @ exact[0]).item(), rel=0.05)
    assert set(rmap.state_dict()) == {"Rf", "Rg"}  # saved with the run: a resume maps as before


def test_cdan_entropy_weights_and_weighted_loss_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    h = [-sum(q * math.log(q + 1e-5) for q in row) for row in p.tolist()]
    assert torch.allclose(entropy_weights(p), torch.tensor([1 + math.exp(-e) for e in h], dtype=torch.float64))
    d_s, d_t, w = torch.tensor([[0.5]]), torch.tensor([[-1.0]]), torch.tensor([2.0, 1.0])
    by_hand = (2 * math.log(1 + math.exp(-0.5)) + 1 * math.log(1 + math.exp(-1.0))) / 3  # sum(w l) / sum(w)
    assert domain_adversarial_loss(d_s, d_t, w).item() == pytest.approx(by_hand)


def test_cdan_conditions_on_detached_softmax_with_entropy_weights():
    torch.manual_seed(0)
    backbone = nn.Identity()
    backbone.out_features = 4
    model = Classifier(backbone, 3)
    cdan = CDAN(entropy=True, hidden_size=8)
    cdan.transform_model(model)
    assert cdan.discriminator[0].in_features == 12
    f, logits = torch.randn(6, 4), torch.randn(6, 3, requires_grad=True)
    h_s, h_t, w = cdan.inputs(_out(f[:3], f[3:], logits[:3], logits[3:]))
    g = logits.softmax(1)
    assert torch.allclose(torch.cat([h_s, h_t]), MultiLinearMap()(f, g))
    assert torch.allclose(w, entropy_weights(g)) and not h_s.requires_grad  # g detached, f constant here


def test_mcc_loss_by_hand():
    logits, t = torch.tensor([[2.0, 0.0], [0.5, 1.5], [0.0, 0.0]], dtype=torch.float64), 2.5
    p = [[math.exp(a / t) / sum(math.exp(b / t) for b in row) for a in row] for row in logits.tolist()]
    w = [1 + math.exp(sum(q * math.log(q + 1e-5) for q in row)) for row in p]
    w = [3 * x / sum(w) for x in w]
    m = [[sum(w[i] * p[i][j] * p[i][k] for i in range(3)) for k in range(2)] for j in range(2)]
    m = [[m[j][k] / sum(m[j]) for k in range(2)] for j in range(2)]
    by_hand = (m[0][1] + m[1][0]) / 2
    assert MinimumClassConfusionLoss(t)(logits).item() == pytest.approx(by_hand)


def test_gaussian_kernel_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    d2 = [[0, 1, 4], [1, 0, 5], [4, 5, 0]]
    sigma2 = 0.5 * sum(map(sum, d2)) / 9  # alpha * mean over all 9 pairs, diagonal included (tllib)
    k = GaussianKernel(alpha=0.5)(squared_distances(z))
    assert torch.allclose(k, torch.tensor([[math.exp(-d / (2 * sigma2)) for d in row] for row in d2],
                                          dtype=torch.float64))
    k = GaussianKernel(sigma=0.92, track_running_stats=False)(squared_distances(z))
    assert k[0, 2].item() == pytest.approx(math.exp(-4 / (2 * 0.92 ** 2)))
    with pytest.raises(ValueError, match="either sigma"):
        GaussianKernel(sigma=1.0)


def test_mk_mmd_by_hand_on_two_source_and_two_target_samples():
    """Fixed bandwidths, z_s = (0, 1), z_t = (3, 5) in one dimension."""
    kernels = [GaussianKernel(sigma=s, track_running_stats=False) for s in (1.0, 2.0)]
    z_s, z_t = torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.tensor([[3.0], [5.0]], dtype=torch.float64)

    def k(a, b):
        return sum(math.exp(-(a - b) ** 2 / (2 * s ** 2)) for s in (1.0, 2.0))

    quadratic = k(0, 1) + k(3, 5) - (k(0, 3) + k(0, 5) + k(1, 3) + k(1, 5)) / 2  # 1/(2*1) twice, -2/(2*2) * sum
    # linear, cyclic pairs i=0: (s0, s1, t0, t1), i=1: (s1, s0, t1, t0); h = k(s,s') + k(t,t') - k(s,t') - k(s',t)
    linear = sum(k(a, b) + k(c, d) - k(a, d) - k(b, c) for a, b, c, d in ((0, 1, 3, 5), (1, 0, 5, 3))) / 2
    for lin, by_hand in ((False, quadratic), (True, linear)):
        assert MultipleKernelMaximumMeanDiscrepancy(kernels, lin)(z_s, z_t).item() == pytest.approx(by_hand)


@pytest.mark.parametrize("linear", [False, True])
def test_mk_mmd_is_about_zero_on_one_distribution_and_positive_on_shifted_ones(linear):
    gen = torch.Generator().manual_seed(0)
    mkmmd = MultipleKernelMaximumMeanDiscrepancy([GaussianKernel(alpha=a) for a in default_alphas()], linear)
    z_s, z_t = torch.randn(256, 4, generator=gen), torch.randn(256, 4, generator=gen)
    assert abs(mkmmd(z_s, z_t).item()) < 0.05
    assert mkmmd(z_s, z_t + 2).item() > 0.5


def test_jan_joint_kernel_is_the_product_of_the_layer_kernels_and_thetas_maximise_it():
    torch.manual_seed(0)
    f, g = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64).softmax(1)
    f_kernels, g_kernels = [GaussianKernel(alpha=a) for a in default_alphas()], [
        GaussianKernel(sigma=0.92, track_running_stats=False)]
    jmmd = JointMultipleKernelMaximumMeanDiscrepancy((f_kernels, g_kernels))
    product = multi_kernel(f_kernels, f) * multi_kernel(g_kernels, g)
    assert jmmd((f[:3], g[:3]), (f[3:], g[3:])).item() == pytest.approx(mmd(product, 3).item())
    # JAN-A: identity forward; the features get the plain gradient, the thetas its reverse
    f.requires_grad_(True)
    jmmd((f[:3], g[:3]), (f[3:], g[3:])).backward()
    plain = f.grad.clone()
    f.grad = None
    thetas = [Theta(4).double(), Theta(3).double()]
    adversarial = JointMultipleKernelMaximumMeanDiscrepancy((f_kernels, g_kernels), thetas=thetas)
    adversarial((f[:3], g[:3]), (f[3:], g[3:])).backward()
    assert torch.allclose(f.grad, plain)
    # d loss / dA = (d loss / dz) z^T for theta(z) = A z + b at A = I, reversed
    z = torch.cat([f[:3], f[3:]]).detach()
    assert torch.allclose(thetas[0].layer.weight.grad, -(plain.T @ z))


def test_align_needs_domain_adaptation(train_run):
    with pytest.raises(ConfigError, match="need unlabelled target data; set dataset.setting=da"):
        train_run("experiment=digits_dg", "align=mcc")


def test_mdd_loss_by_hand():
    y_s, y_t = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    y_s_adv, y_t_adv = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 2.0]])
    p_s = [math.exp(1) / (math.exp(1) + math.exp(2) + 1), 1 / (math.exp(0.5) + 2)]  # adversarial prob of h(y_s)
    p_t = math.exp(2) / (1 + math.e + math.exp(2))  # of h(y_t) = 2
    expected = 4 * -(math.log(p_s[0]) + math.log(p_s[1])) / 2 - math.log(1 - p_t + 1e-6)
    assert margin_disparity_loss(y_s, y_s_adv, y_t, y_t_adv).item() == pytest.approx(expected, rel=1e-6)
    # the main head's logits only choose the labels: no gradient reaches them
    y_s.requires_grad_(True)
    margin_disparity_loss(y_s, y_s_adv.requires_grad_(True), y_t, y_t_adv).backward()
    assert y_s.grad is None and y_s_adv.grad is not None


def test_mdd_builds_tllibs_classifier_and_reverses_the_adversarial_gradient_at_its_warm_start(caplog):
    with pytest.raises(ConfigError, match=r"^align.mdd works on a tllab Classifier .*not on a Linear\.$"):
        MDD().transform_model(nn.Linear(2, 2))
    mdd = MDD(bottleneck_dim=16, width=8)
    with caplog.at_level("WARNING", logger="tllab"):
        model = mdd.transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=32))
    assert "align.mdd replaces the backbone's bottleneck (backbone.bottleneck_dim)" in caplog.text
    assert model.features_dim == 16 and isinstance(model.bottleneck[3], nn.Dropout)
    assert model.bottleneck[0].bias.eq(0.1).all() and model.head[0].bias.eq(0).all()
    assert [m.out_features for m in mdd.adv_head if isinstance(m, nn.Linear)] == [8, 10]
    f = torch.randn(6, 16, requires_grad=True)
    logits = torch.randn(6, 10)
    out = _out(f[:3], f[3:], logits[:3], logits[3:], step=500)
    mdd.eval()  # no dropout: the gradient is then comparable
    mdd.loss(out)["transfer"].backward()
    reversed_grad = f.grad.clone()
    f.grad = None
    g = f.detach().requires_grad_(True)
    margin_disparity_loss(logits[:3], mdd.adv_head(g[:3]), logits[3:], mdd.adv_head(g[3:])).backward()
    assert torch.allclose(reversed_grad, -warm_start_coeff(500, hi=0.1) * g.grad, atol=1e-7)


def test_mcd_terms_by_hand():
    p1, p2 = torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    assert classifier_discrepancy(p1, p2).item() == pytest.approx((0.2 + 0.2 + 0.4 + 0.4) / 4)
    assert class_balance_entropy(p1).item() == pytest.approx(-(math.log(0.45 + 1e-6) + math.log(0.55 + 1e-6)) / 2)


def test_mcd_three_updates_move_only_their_parameters(train_run, monkeypatch):
    """B moves the two heads only and C (num_k times) everything else of the model, through the
    trainer's update (checked on the weights before and after each call)."""
    from tllab.trainer import Trainer

    moved: list[set[str]] = []
    update = Trainer._update

    def spy(self, loss, params):
        named = {**{f"model.{k}": v for k, v in self.model.named_parameters()},
                 **{f"mcd.{k}": v for k, v in self.plugins["align.mcd"].named_parameters()}}
        before = {k: v.detach().clone() for k, v in named.items()}
        update(self, loss, params)
        moved.append({k for k, v in named.items() if not torch.equal(v, before[k])})
        spy.named = named

    monkeypatch.setattr(Trainer, "_update", spy)
    train_run("align=mcd", "align.mcd.bottleneck_dim=16", "align.mcd.num_k=2", "optim=sgd",
              "trainer.max_steps=1", "trainer.eval_every=1")
    heads = {k for k in spy.named if k.startswith(("model.head.", "mcd.head2."))}
    assert len(moved) == 3 and moved[0] == heads
    assert moved[1] == moved[2] == set(spy.named) - heads


# Small discriminators and heads: the default ones (CDAN's reads features x classes) make the checkpoint writes
# the cost.
SMALL = ["align.dann.hidden_size=64", "align.cdan.hidden_size=64", "align.cdan.randomized=true",
         "align.cdan.randomized_dim=64", "align.cdan.entropy=true", "align.jan.adversarial=true",
         "align.mcd.bottleneck_dim=16", "align.mdd.bottleneck_dim=16", "align.mdd.width=16"]
HEADS = ("mcd", "mdd")  # each replaces the head: one per run


def _small(*methods: str) -> list[str]:
    return [o for o in SMALL if o.split(".")[1] in methods]


@pytest.mark.parametrize("overrides, method", [
    ([f"align=[{','.join(n for n in options('align') if n not in ('none', *HEADS))}]",
      *_small("cdan", "dan", "dann", "jan", "mcc")], "cdan+dan+dann+jan+mcc"),
    (["norm=adabn", "norm.adabn.split=source_val", "align=[dann,mcd]", *_small("dann", "mcd")], "adabn+dann+mcd"),
    (["regularizer=l2", "align=[dann,mdd]", *_small("dann", "mdd")], "l2+dann+mdd"),
])
def test_every_align_yaml_trains_and_stacks(train_run, tmp_path, overrides, method):
    summary = train_run(*overrides, "trainer.max_steps=2", "trainer.eval_every=2")
    assert summary["steps"] == 2 and summary["method"] == method
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert "discriminator.0.weight" in state["plugins"]["align.dann"]  # the discriminator is saved
    assert not any("discriminator" in k for k in state["model"])  # and is no part of the model
    if "jan" in method:  # JAN-A's thetas too
        assert "jmmd.thetas.0.layer.weight" in state["plugins"]["align.jan"]
    if "mcd" in method:  # the second head, outside the model
        assert "head2.1.weight" in state["plugins"]["align.mcd"] and "head.1.weight" in state["model"]
    if "mdd" in method:
        assert "adv_head.0.weight" in state["plugins"]["align.mdd"] and "bottleneck.0.weight" in state["model"]


def test_alignment_resumes_bit_identically(train_run, tmp_path, monkeypatch):
    """The discriminator, CDAN's random maps, MCD's second head and its extra updates resume exactly."""
    args = ["align=[cdan,mcd]", *_small("cdan", "mcd"), "trainer.max_steps=4", "trainer.eval_every=2"]
    train_run(*args, run_dir=tmp_path / "whole")
    interrupt_then_resume(lambda d: train_run(*args, run_dir=d), tmp_path / "resumed", monkeypatch, at_step=2)
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("whole", "resumed"))
    assert a["step"] == b["step"] == 4
    for x, y in [(a["model"], b["model"]), *((a["plugins"][n], b["plugins"][n]) for n in a["plugins"])]:
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_two_head_replacing_methods_are_refused_by_name(train_run):
    with pytest.raises(ConfigError, match="align.mcd and align.mdd both replace the model's head"):
        train_run("align=[mcd,mdd]")

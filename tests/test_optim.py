"""Tests of tllab.optim: lr factors (hand-computed), the LambdaLR scheduler and the optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tllab.optim import build_optimizer, build_scheduler, lr_factor
from tllab.schema import OptimConfig, OptimName, SchedulerConfig, SchedulerName

# ------------------------------------------------------------------------------------------------ lr_factor


@pytest.mark.parametrize(
    ("cfg", "at_10"),
    [
        (SchedulerConfig(name=SchedulerName.cosine), 1.0),  # cosine starts at 1 when warmup ends
        (SchedulerConfig(name=SchedulerName.step, milestones=[10, 50]), 0.1),  # milestone reached
        (SchedulerConfig(name=SchedulerName.inv), 1.01 ** -0.75),  # inv counts steps from 0
        (SchedulerConfig(name=SchedulerName.none), 1.0),
    ],
    ids=["cosine", "step", "inv", "none"],
)
def test_linear_warmup(cfg, at_10):
    cfg.warmup_steps, cfg.warmup_start_factor = 10, 0.1
    assert lr_factor(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 1, 110) == pytest.approx(0.19)
    assert lr_factor(cfg, 5, 110) == pytest.approx(0.55)
    assert lr_factor(cfg, 9, 110) == pytest.approx(0.91)
    assert lr_factor(cfg, 10, 110) == pytest.approx(at_10)


def test_warmup_default_start_factor():
    cfg = SchedulerConfig(warmup_steps=4)
    assert cfg.warmup_start_factor == 0.01
    assert [lr_factor(cfg, s, 10) for s in range(6)] == pytest.approx([0.01, 0.2575, 0.505, 0.7525, 1, 1])


def test_step_schedule():
    cfg = SchedulerConfig(name=SchedulerName.step, milestones=[3, 6])
    assert cfg.gamma == 0.1
    factors = [lr_factor(cfg, s, 100) for s in range(7)]
    assert factors == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    assert lr_factor(cfg, 1000, 100) == pytest.approx(0.01)


def test_step_schedule_other_gamma_and_unsorted_milestones():
    cfg = SchedulerConfig(name=SchedulerName.step, milestones=[4, 2], gamma=0.5)
    assert [lr_factor(cfg, s, 10) for s in range(6)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])


def test_cosine_schedule():
    cfg = SchedulerConfig(name=SchedulerName.cosine, min_lr_factor=0.1)
    assert lr_factor(cfg, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 25, 100) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # 0.868198
    assert lr_factor(cfg, 50, 100) == pytest.approx(0.55)
    assert lr_factor(cfg, 75, 100) == pytest.approx(0.1 + 0.45 * (1 - math.sqrt(0.5)))  # 0.231802
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 150, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 10**6, 100) == pytest.approx(0.1)


def test_cosine_schedule_after_warmup_spans_remaining_steps():
    cfg = SchedulerConfig(name=SchedulerName.cosine, warmup_steps=20, warmup_start_factor=0.0)
    assert cfg.min_lr_factor == 0.0
    assert lr_factor(cfg, 0, 120) == 0.0
    assert lr_factor(cfg, 20, 120) == pytest.approx(1.0)
    assert lr_factor(cfg, 70, 120) == pytest.approx(0.5)  # half of the 100 post-warmup steps
    assert lr_factor(cfg, 120, 120) == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_is_monotone():
    cfg = SchedulerConfig(name=SchedulerName.cosine, min_lr_factor=0.1)
    values = [lr_factor(cfg, s, 100) for s in range(120)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_inv_schedule():
    cfg = SchedulerConfig(name=SchedulerName.inv)
    assert (cfg.inv_gamma, cfg.inv_power) == (0.001, 0.75)
    assert lr_factor(cfg, 0, 5000) == pytest.approx(1.0)
    assert lr_factor(cfg, 1000, 5000) == pytest.approx(2 ** -0.75)  # 0.594604
    assert lr_factor(cfg, 1000, 5000) == pytest.approx(0.5946035575)
    assert lr_factor(cfg, 3000, 5000) == pytest.approx(4 ** -0.75)  # independent of total_steps
    cfg = SchedulerConfig(name=SchedulerName.inv, inv_gamma=0.01, inv_power=1.0)
    assert lr_factor(cfg, 100, 10) == pytest.approx(0.5)


def test_none_schedule():
    cfg = SchedulerConfig()
    assert cfg.name == SchedulerName.none
    assert {lr_factor(cfg, s, t) for s in (0, 1, 7, 100, 10**6) for t in (0, 1, 100)} == {1.0}


def test_plain_string_names_are_accepted():
    """OmegaConf may hand over names as plain strings."""
    cfg = SchedulerConfig(name="step", milestones=[1])  # type: ignore[arg-type]
    assert lr_factor(cfg, 1, 10) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ build_scheduler


def _two_group_sgd() -> torch.optim.SGD:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(2, 1)
    return torch.optim.SGD([{"params": a.parameters(), "lr": 0.1}, {"params": b.parameters(), "lr": 0.01}],
                           lr=0.5, momentum=0.9)


def _lrs(optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


def _assert_history(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w)


def _advance(optimizer, scheduler, n: int) -> list[list[float]]:
    """``n`` optimizer + scheduler steps; the group lrs after each."""
    out = []
    for _ in range(n):
        optimizer.step()
        scheduler.step()
        out.append(_lrs(optimizer))
    return out


def test_scheduler_drives_every_group_lr():
    cfg = SchedulerConfig(name=SchedulerName.step, milestones=[3, 6])
    opt = _two_group_sgd()
    sched = build_scheduler(cfg, opt, total_steps=10)
    assert _lrs(opt) == pytest.approx([0.1, 0.01])  # factor(0) = 1 applied at construction
    history = _advance(opt, sched, 7)
    expected = [[0.1 * f, 0.01 * f] for f in (1, 1, 0.1, 0.1, 0.1, 0.01, 0.01)]  # steps 1..7
    for got, want in zip(history, expected):
        assert got == pytest.approx(want)
        assert got[0] / got[1] == pytest.approx(10.0)
    assert sched.get_last_lr() == pytest.approx(expected[-1])


def test_scheduler_with_warmup_and_cosine_keeps_group_ratio():
    cfg = SchedulerConfig(name=SchedulerName.cosine, warmup_steps=5, warmup_start_factor=0.2, min_lr_factor=0.1)
    opt = _two_group_sgd()
    sched = build_scheduler(cfg, opt, total_steps=25)
    assert _lrs(opt) == pytest.approx([0.02, 0.002])
    history = _advance(opt, sched, 30)
    for step, lrs in enumerate(history, start=1):
        f = lr_factor(cfg, step, 25)
        assert lrs == pytest.approx([0.1 * f, 0.01 * f])
        assert lrs[0] / lrs[1] == pytest.approx(10.0)
    assert history[4] == pytest.approx([0.1, 0.01])  # step 5: warmup over, cosine at 1
    assert history[14] == pytest.approx([0.055, 0.0055])  # step 15: cosine half-way
    assert history[-1] == pytest.approx([0.01, 0.001])  # past the end: min_lr_factor


@pytest.mark.parametrize("name", list(SchedulerName))
def test_scheduler_state_round_trip_resumes_the_same_lr_sequence(name):
    cfg = SchedulerConfig(name=name, warmup_steps=3, warmup_start_factor=0.1, milestones=[5, 8],
                          inv_gamma=0.1, min_lr_factor=0.05)
    total = 12
    ref_opt = _two_group_sgd()
    ref_sched = build_scheduler(cfg, ref_opt, total)
    full = _advance(ref_opt, ref_sched, 15)

    opt = _two_group_sgd()
    sched = build_scheduler(cfg, opt, total)
    first = _advance(opt, sched, 6)
    assert first == full[:6]
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    assert sched_state["last_epoch"] == 6

    # a fresh run (new objects) restored from the saved state
    opt2 = _two_group_sgd()
    sched2 = build_scheduler(cfg, opt2, total)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert _lrs(opt2) == pytest.approx(full[5])
    assert sched2.get_last_lr() == pytest.approx(full[5])
    resumed = _advance(opt2, sched2, 9)
    _assert_history(resumed, full[6:])


def test_scheduler_state_alone_restores_the_schedule():
    """Even without the optimizer state the next lr is right: LambdaLR multiplies the saved base lrs."""
    cfg = SchedulerConfig(name=SchedulerName.step, milestones=[3, 6])
    opt = _two_group_sgd()
    sched = build_scheduler(cfg, opt, 10)
    _advance(opt, sched, 4)
    state = sched.state_dict()
    assert state["base_lrs"] == pytest.approx([0.1, 0.01])

    opt2 = _two_group_sgd()
    sched2 = build_scheduler(cfg, opt2, 10)
    sched2.load_state_dict(state)
    _assert_history(_advance(opt2, sched2, 3), [[0.01, 0.001], [0.001, 0.0001], [0.001, 0.0001]])


# ------------------------------------------------------------------------------------------ build_optimizer


def _param(value: float = 1.0, grad: float = 2.0) -> nn.Parameter:
    p = nn.Parameter(torch.tensor([value]))
    p.grad = torch.tensor([grad])
    return p


def test_sgd_nesterov_hyperparameters_and_one_step():
    cfg = OptimConfig(name=OptimName.sgd, lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-4)
    p = _param()
    opt = build_optimizer(cfg, [{"params": [p]}])
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.8, True, 5e-4)
    opt.step()
    # g = 2 + 5e-4 * 1; first step: buf = g; nesterov direction g + 0.8 * buf = 1.8 g
    assert p.item() == pytest.approx(1 - 0.05 * 1.8 * 2.0005)  # 0.819955


def test_sgd_without_nesterov():
    cfg = OptimConfig(name=OptimName.sgd, lr=0.1, momentum=0.9)
    p = _param()
    opt = build_optimizer(cfg, [{"params": [p]}])
    assert opt.param_groups[0]["nesterov"] is False
    opt.step()
    opt.step()  # the gradient stays 2: buf = 2, then 0.9 * 2 + 2 = 3.8
    assert p.item() == pytest.approx(1 - 0.1 * 2 - 0.1 * 3.8)


@pytest.mark.parametrize(("name", "cls", "betas", "expected"), [
    # L2 decay is added to the gradient; Adam's first step moves by lr * sign(g)
    (OptimName.adam, torch.optim.Adam, [0.8, 0.99], 0.99),
    # decoupled decay p *= 1 - lr * wd, then the sign step: 0.989
    (OptimName.adamw, torch.optim.AdamW, [0.85, 0.95], 1 * (1 - 0.01 * 0.1) - 0.01),
])
def test_adam_family_hyperparameters_and_weight_decay(name, cls, betas, expected):
    cfg = OptimConfig(name=name, lr=0.01, betas=betas, weight_decay=0.1)
    p = _param()
    opt = build_optimizer(cfg, [{"params": [p]}])
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["betas"] == tuple(betas)
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.1)
    opt.step()
    assert p.item() == pytest.approx(expected, abs=1e-7)


def test_default_optimizer_is_adam():
    cfg = OptimConfig()
    opt = build_optimizer(cfg, [{"params": [_param()]}])
    assert type(opt) is torch.optim.Adam
    assert opt.param_groups[0]["lr"] == 1e-3
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("name", list(OptimName))
def test_group_lr_and_weight_decay_override_config(name):
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=1e-3)
    a, b, c = _param(), _param(), _param()
    opt = build_optimizer(cfg, [{"params": [a], "lr": 0.005, "name": "backbone"},
                                {"params": [b], "name": "head"},
                                {"params": [c], "lr": 0.2, "weight_decay": 0.0}])
    assert _lrs(opt) == [0.005, 0.1, 0.2]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 1e-3, 0.0]
    assert [g.get("name") for g in opt.param_groups] == ["backbone", "head", None]


def test_optimizer_and_scheduler_together_from_classifier_groups():
    """The trainer's path: Classifier.get_parameters -> build_optimizer -> build_scheduler."""
    from tllab.models import Classifier, create_backbone

    model = Classifier(create_backbone("tllab", "digits_cnn", widths=(4, 4, 4)), 3)
    cfg = OptimConfig(name=OptimName.sgd, lr=0.1, backbone_lr_mult=0.1,
                      scheduler=SchedulerConfig(name=SchedulerName.inv, inv_gamma=1.0, inv_power=1.0))
    opt = build_optimizer(cfg, model.get_parameters(cfg.lr, cfg.backbone_lr_mult))
    sched = build_scheduler(cfg.scheduler, opt, total_steps=10)
    assert _lrs(opt) == pytest.approx([0.01, 0.1])
    _advance(opt, sched, 3)  # factor (1 + 3)^-1
    assert _lrs(opt) == pytest.approx([0.0025, 0.025])

"""L2 and L2-SP: hand-computed values and gradients on a tiny classifier, the starting point's
storage in checkpoints, and 2-step runs of each YAML."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import compose_config
from tllab.models import Classifier, create_backbone
from tllab.plugin import SetupContext, StepOutput, build_plugins
from tllab.regularizer.l2 import L2, L2SP
from tllab.train import resolve_config


def tiny_classifier() -> Classifier:
    """Backbone Linear(2, 3) (w0: weight 0..5, bias 6..8), bottleneck Linear(3, 2)+BN+ReLU, head Linear(2, 2);
    float64, every bottleneck/head parameter 2."""
    backbone = nn.Sequential(nn.Linear(2, 3))
    backbone.out_features = 3
    model = Classifier(backbone, num_classes=2, bottleneck_dim=2).double()
    with torch.no_grad():
        backbone[0].weight.copy_(torch.arange(6.0).view(3, 2))
        backbone[0].bias.copy_(torch.arange(6.0, 9.0))
        for m in (model.bottleneck, model.head):
            for p in m.parameters():
                p.fill_(2.0)
    return model


def setup(plugin, model: nn.Module, config: dict | None = None) -> None:
    plugin.setup(SetupContext(model, None, torch.device("cpu"), Path("."), config or {}))


def step_output(model: nn.Module) -> StepOutput:
    z = torch.zeros(1, dtype=torch.float64)
    return StepOutput(0, 1, model, z, z, z, z, z)


def grads(model: nn.Module, term: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    term.backward()
    return {name: p.grad for name, p in model.named_parameters()}


HEAD_PARAMS = 6 + 2 + 2 + 2 + 4 + 2  # bottleneck Linear(3, 2) weight+bias, BN weight+bias, head Linear(2, 2)


def test_l2sp_is_zero_at_the_start_and_the_hand_sum_after_moving():
    model, l2sp = tiny_classifier(), L2SP(backbone_weight=0.1, head_weight=0.01)
    setup(l2sp, model)
    terms = l2sp.loss(step_output(model))
    assert terms["backbone"].item() == 0.0
    assert terms["head"].item() == pytest.approx(0.01 * 0.5 * 4.0 * HEAD_PARAMS)  # 18 values of 2
    with torch.no_grad():
        model.backbone[0].weight += 1.0  # 6 entries moved by 1
        model.backbone[0].bias -= 2.0  # 3 entries moved by 2
    assert l2sp.loss(step_output(model))["backbone"].item() == pytest.approx(0.1 * 0.5 * (6 * 1 + 3 * 4))


def test_l2sp_gradients_reach_only_their_parameters():
    model, l2sp = tiny_classifier(), L2SP(backbone_weight=0.1, head_weight=0.01)
    setup(l2sp, model)
    w0 = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    g = grads(model, l2sp.loss(step_output(model))["backbone"])
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            torch.testing.assert_close(g[name], 0.1 * (p.detach() - w0[name.removeprefix("backbone.")]))
        else:
            assert g[name] is None, name
    g = grads(model, l2sp.loss(step_output(model))["head"])
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert g[name] is None, name
        else:
            torch.testing.assert_close(g[name], 0.01 * p.detach())


def test_frozen_parameters_are_left_out():
    model, l2sp = tiny_classifier(), L2SP(backbone_weight=1.0, head_weight=1.0)
    setup(l2sp, model)
    with torch.no_grad():
        model.backbone[0].weight += 1.0
    model.backbone[0].weight.requires_grad_(False)
    model.head.requires_grad_(False)
    terms = l2sp.loss(step_output(model))
    assert terms["backbone"].item() == 0.0
    assert terms["head"].item() == pytest.approx(0.5 * 4.0 * (HEAD_PARAMS - 6))


def test_l2sp_starting_point_survives_a_checkpoint_round_trip_once():
    model, l2sp = tiny_classifier(), L2SP()
    setup(l2sp, model)
    state = l2sp.state_dict()
    # Exactly one entry per backbone parameter, named like it: nothing of bottleneck/head, nothing twice.
    assert list(state) == ["w0.0.weight", "w0.0.bias"]
    for name, p in model.backbone.named_parameters():
        assert torch.equal(state[f"w0.{name}"], p.detach()) and state[f"w0.{name}"].data_ptr() != p.data_ptr()
    with torch.no_grad():
        model.backbone[0].weight += 1.0  # trained a little: the checkpoint's weights moved off w0
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "plugin": l2sp.state_dict()}, buffer)
    buffer.seek(0)

    # Resume as the trainer does: build the model (its pretrained file has changed since: other
    # biases), setup, then restore the checkpoint. The original anchor comes back.
    resumed_model, resumed = tiny_classifier(), L2SP()
    with torch.no_grad():
        resumed_model.backbone[0].bias.zero_()
    setup(resumed, resumed_model)
    ckpt = torch.load(buffer, weights_only=True)
    resumed_model.load_state_dict(ckpt["model"])
    resumed.load_state_dict(ckpt["plugin"])
    assert resumed.loss(step_output(resumed_model))["backbone"].item() == pytest.approx(0.01 * 0.5 * 6)


def test_l2_is_the_hand_sum_over_all_parameters_and_stores_nothing():
    model, l2 = tiny_classifier(), L2(weight=0.1)
    setup(l2, model)
    # backbone: 0^2 + ... + 8^2 = 204; bottleneck and head: 18 values of 2.
    assert l2.loss(step_output(model))["weights"].item() == pytest.approx(0.1 * 0.5 * (204 + 4.0 * HEAD_PARAMS))
    g = grads(model, l2.loss(step_output(model))["weights"])
    for name, p in model.named_parameters():
        torch.testing.assert_close(g[name], 0.1 * p.detach())
    assert l2.state_dict() == {}


@pytest.mark.parametrize("plugin", [L2(), L2SP()])
def test_nonzero_weight_decay_warns(plugin, caplog):
    with caplog.at_level(logging.WARNING, logger="tllab"):
        setup(plugin, tiny_classifier(), {"optim": {"weight_decay": 0.0}})
        assert not caplog.records
        setup(type(plugin)(), tiny_classifier(), {"optim": {"weight_decay": 5e-4}})
    assert "optim.weight_decay=0.0005" in caplog.text and "sets optim.weight_decay=0" in caplog.text


@pytest.mark.parametrize("name, defaults", [("l2", {"weight": 0.01}),
                                            ("l2sp", {"backbone_weight": 0.01, "head_weight": 0.01})])
def test_yaml_composes_with_the_defaults(name, defaults):
    cfg, resolved = resolve_config(compose_config(["experiment=digits_finetune", f"regularizer={name}"]))
    assert {k: v for k, v in resolved["regularizer"][name].items() if k != "_target_"} == defaults
    assert type(build_plugins("regularizer", cfg.regularizer)[name]) is {"l2": L2, "l2sp": L2SP}[name]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tllab-style checkpoint of a digits classifier whose weights differ from any run's own init."""
    torch.manual_seed(1234)
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    path = tmp_path_factory.mktemp("src") / "last.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_l2_trains_two_steps(train_run):
    final = train_run("experiment=digits_finetune", "regularizer=l2", "trainer.max_steps=2")["final"]
    assert final["train/regularizer.l2/weights"] > 0


def test_l2sp_trains_two_steps_and_checkpoints_its_starting_point_once(train_run, tmp_path, pretrained):
    summary = train_run("experiment=digits_finetune", "regularizer=l2sp", "trainer.max_steps=2",
                        f"backbone.pretrained={pretrained}")
    assert summary["steps"] == 2
    assert summary["final"]["train/regularizer.l2sp/backbone"] > 0  # moved off w0 after the first step
    assert summary["final"]["train/regularizer.l2sp/head"] > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    source = torch.load(pretrained, weights_only=False)["model"]
    w0 = ckpt["plugins"]["regularizer.l2sp"]
    backbone = [k.removeprefix("backbone.") for k, v in ckpt["model"].items()
                if k.startswith("backbone.") and v.is_floating_point() and "running_" not in k]
    assert sorted(w0) == sorted(f"w0.{k}" for k in backbone)  # the parameters, no BatchNorm statistics
    for k in backbone:
        assert torch.equal(w0[f"w0.{k}"], source[f"backbone.{k}"])  # the pretrained weights, not the run's init

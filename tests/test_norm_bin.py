"""Batch-Instance Normalization: BatchNorm at gate 1, InstanceNorm at gate 0, gates, DDP, plug-in."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import FAST, compose_config
from tests.dist_helpers import run_gloo
from tests.norm_helpers import (
    BACKBONES,
    assert_shards_match,
    check_bfloat16_under_float32_parameters,
    make_data,
    random_batchnorm,
    step,
)
from tllab.nn import convert_sync_batchnorm
from tllab.norm.bin import BatchInstanceNorm2d, BINStrategy
from tllab.plugin import build_plugins
from tllab.train import resolve_config
from tllab.trainer import Trainer, build_model

C = 5
GATES = [0.0, 0.25, 0.5, 0.9, 1.0]


def bin_layer(gate: float | list[float]) -> BatchInstanceNorm2d:
    layer = BatchInstanceNorm2d.from_batchnorm(random_batchnorm(C))
    with torch.no_grad():
        layer.gate.copy_(torch.as_tensor(gate, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("training", [True, False])
def test_gate_one_is_batchnorm(training):
    bn, layer = random_batchnorm(C).train(training), bin_layer(1.0).train(training)
    for i in range(2):
        x, grad = make_data(200 + i, C)
        for a, b in zip(step(layer, x, grad), step(bn, x, grad)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(bn, name).grad, atol=1e-10, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(bn, name), atol=1e-12, rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_gate_zero_is_instance_norm_then_affine(training):
    layer = bin_layer(0.0).train(training)
    x, grad = make_data(200, C)
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    expected = step(lambda t: F.instance_norm(t, weight=w, bias=b), x, grad)
    for a, e in zip(step(layer, x, grad), expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.weight.grad, w.grad, atol=1e-10, rtol=0)


def test_mixed_gates_follow_the_formula_with_gate_gradients():
    layer = bin_layer(GATES)
    bn = random_batchnorm(C)
    x, grad = make_data(200, C)
    rho = layer.gate.detach().clone().requires_grad_()
    gamma, beta = bn.weight, bn.bias

    def formula(t):
        x_bn = F.batch_norm(t, bn.running_mean, bn.running_var, training=True)
        x_in = F.instance_norm(t)
        r = rho.view(1, -1, 1, 1)
        return (r * x_bn + (1 - r) * x_in) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)

    for a, e in zip(step(layer, x, grad), step(formula, x, grad)):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.gate.grad, rho.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.weight.grad, gamma.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.running_var, bn.running_var, atol=1e-12, rtol=0)


def test_eval_output_of_a_sample_does_not_depend_on_the_others():
    layer = bin_layer(GATES).eval()
    x = make_data(200, C)[0]
    other = x.clone()
    other[1:] = torch.randn_like(other[1:])
    torch.testing.assert_close(layer(x)[0], layer(other)[0], atol=1e-12, rtol=0)


def test_one_by_one_inputs_raise_a_clear_error_in_training_and_eval():
    layer = BatchInstanceNorm2d(3)
    for mode in (True, False):
        with pytest.raises(ValueError, match="more than one spatial position.*dataset.image_size=64"):
            layer.train(mode)(torch.randn(4, 3, 1, 1))
    assert layer.train()(torch.randn(1, 3, 2, 2)).shape == (1, 3, 2, 2)  # batch 1 is fine with H W > 1


def test_without_affine_and_with_cumulative_momentum():
    layer = BatchInstanceNorm2d(3, affine=False, momentum=None)
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.no_grad():
        layer.gate.fill_(0.3)
    y = layer(x)
    expected = 0.3 * F.batch_norm(x, None, None, training=True) + 0.7 * F.instance_norm(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.running_mean, x.detach().mean((0, 2, 3)), atol=1e-6, rtol=0)
    y.sum().backward()
    assert layer.gate.grad is not None and layer.weight is None
    assert BatchInstanceNorm2d.from_batchnorm(nn.BatchNorm2d(3)).gate.tolist() == [1.0, 1.0, 1.0]


def test_bfloat16_inputs_with_float32_parameters_as_under_amp():
    check_bfloat16_under_float32_parameters(BatchInstanceNorm2d(4))


def test_sync_conversion_keeps_the_gates_and_is_plain_outside_a_process_group():
    model, reference = nn.Sequential(bin_layer(GATES)), nn.Sequential(bin_layer(GATES))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "BatchNorm subclass without supports_sync" warning
        convert_sync_batchnorm(model)
    assert type(model[0]) is BatchInstanceNorm2d and model[0].sync and model[0].gate.tolist() == GATES
    x = make_data(200, C)[0]
    torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


# ---------------------------------------------------------------- data parallel
SPLITS = [(5, 11)]
STEPS = 2


def bin_worker(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for split in SPLITS:
        model = convert_sync_batchnorm(nn.Sequential(bin_layer(GATES)))
        layer = model[0]
        assert type(layer) is BatchInstanceNorm2d and layer.sync
        lo = sum(split[:rank])
        outs = []
        for i in range(STEPS):
            x, grad = make_data(200 + i, C)
            layer.zero_grad()
            outs.append(step(layer, x[lo:lo + split[rank]], grad[lo:lo + split[rank]]))
        results[split] = {"outs": outs, "mean": layer.running_mean, "var": layer.running_var,
                          **{name: p.grad for name, p in layer.named_parameters()}}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_sync_bin_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    run_gloo(bin_worker, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for split in SPLITS:
        ref = bin_layer(GATES)
        outs = []
        for i in range(STEPS):
            ref.zero_grad()
            outs.append(step(ref, *make_data(200 + i, C)))
        assert_shards_match(ranks, split, outs, ref)
        for name, param in ref.named_parameters():  # data-parallel training sums the per-rank gradients
            torch.testing.assert_close(ranks[0][split][name] + ranks[1][split][name], param.grad, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- plug-in and config
def test_gates_have_their_own_group_and_stay_in_the_unit_interval(tmp_path):
    cfg, resolved = resolve_config(compose_config([*FAST, "norm=bin", "optim=sgd", "optim.lr=0.01"]))
    trainer = Trainer(cfg, tmp_path, resolved)
    gates = BINStrategy.gates(trainer.model)
    assert len(gates) == 3
    groups = {g.get("name"): g for g in trainer.optimizer.param_groups}
    assert [id(p) for p in groups["bin_gates"]["params"]] == [id(g) for g in gates]
    assert groups["bin_gates"]["lr"] == pytest.approx(0.1) and groups["bin_gates"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == cfg.optim.weight_decay
    others = {id(p) for name, g in groups.items() if name != "bin_gates" for p in g["params"]}
    assert not others & {id(g) for g in gates}
    # A step that pushes the gates out of [0, 1]; the plug-in's after_step clamps them back.
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        gates[0].fill_(0.05)
    gates[0].grad = torch.full_like(gates[0], 10.0)
    gates[1].grad = torch.full_like(gates[1], -10.0)
    trainer.optimizer.step()
    assert (gates[0] < 0).all() and (gates[1] > 1).all()
    trainer.plugins["norm.bin"].after_step(trainer.model)
    assert (gates[0] == 0).all() and (gates[1] == 1).all()
    trainer.train_step()  # the trainer calls after_step itself
    assert all(((g >= 0) & (g <= 1)).all() for g in gates)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_config_builds_on_every_backbone(backbone):
    cfg, _ = resolve_config(compose_config(["norm=bin", *backbone, "backbone.bottleneck_dim=16"]))
    assert cfg.norm["bin"] == {"_target_": "tllab.norm.bin.BINStrategy", "gate_lr_mult": 10.0,
                               "gate_weight_decay": 0.0}
    model = build_model(cfg, build_plugins("norm", cfg.norm).values())
    assert not any(type(m) is nn.BatchNorm2d for m in model.backbone.modules())
    assert sum(isinstance(m, BatchInstanceNorm2d) for m in model.backbone.modules()) == (3 if "digits" in
                                                                                          backbone[0] else 20)
    assert type(model.bottleneck[1]) is nn.BatchNorm1d  # only the backbone is converted
    logits, _ = model(torch.randn(2, 3, 64, 64))  # 64x64: the last ResNet stage is 2x2
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

"""StochNorm: BatchNorm's training/eval branches per channel, conversion, masks, DDP, plug-in."""

from __future__ import annotations

import io
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
from tllab.errors import ConfigError
from tllab.models import Classifier, create_backbone
from tllab.nn import convert_sync_batchnorm
from tllab.norm.stochnorm import StochNorm1d, StochNorm2d, StochNorm3d, StochNormStrategy, convert_model
from tllab.plugin import build_plugins
from tllab.train import resolve_config
from tllab.trainer import Trainer, build_model

C = 6


def test_p1_is_batchnorm_training_outputs_gradients_and_running_stats():
    bn = random_batchnorm(C, seed=2)
    stoch = StochNorm2d.from_batchnorm(bn, p=1.0)
    for i in range(3):
        x, grad = make_data(100 + i, C)
        y_ref, dx_ref = step(bn, x, grad)
        y, dx = step(stoch, x, grad)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(dx, dx_ref, atol=1e-12, rtol=0)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(stoch, name).grad, getattr(bn, name).grad, atol=1e-10, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(stoch, name), getattr(bn, name), atol=1e-12, rtol=0)


def test_p0_normalizes_with_the_pre_step_running_stats_and_still_updates_them():
    bn = random_batchnorm(C, seed=2)
    stoch = StochNorm2d.from_batchnorm(bn, p=0.0)
    x, grad = make_data(100, C)
    frozen = random_batchnorm(C, seed=2).eval()  # BatchNorm evaluation with the statistics before this step
    y_ref, dx_ref = step(frozen, x, grad)
    y, dx = step(stoch, x, grad)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-12, rtol=0)  # the running stats are constants
    torch.testing.assert_close(stoch.weight.grad, frozen.weight.grad, atol=1e-10, rtol=0)
    bn(x)  # a BatchNorm training step updates the statistics the same way
    torch.testing.assert_close(stoch.running_mean, bn.running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(stoch.running_var, bn.running_var, atol=1e-12, rtol=0)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_eval_is_batchnorm_eval(p):
    bn = random_batchnorm(C, seed=2).eval()
    stoch = StochNorm2d.from_batchnorm(bn, p)
    x, grad = make_data(100, C)
    for a, b in zip(step(stoch, x, grad), step(bn, x, grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert stoch.num_batches_tracked.item() == 0


def reference(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TLlib's formula (1 - s) z0 + s z1, with z0 on the pre-step running statistics."""
    z0 = F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, False)
    z1 = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum)
    s = mask.to(x.dtype).view(1, -1, 1, 1)
    return (1 - s) * z0 + s * z1


def test_each_channel_is_one_branch_with_the_reference_gradients():
    bn = random_batchnorm(C, seed=2)
    stoch = StochNorm2d.from_batchnorm(bn, p=0.5, generator=torch.Generator().manual_seed(3))
    masks = []
    sample = stoch._sample_mask
    stoch._sample_mask = lambda device: (masks.append(sample(device)), masks[-1])[1]
    for i in range(3):
        x, grad = make_data(100 + i, C)
        y, dx = step(stoch, x, grad)
        y_ref, dx_ref = step(lambda t: reference(bn, t, masks[-1]), x, grad)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(dx, dx_ref, atol=1e-12, rtol=0)
    assert any(0 < m.sum() < C for m in masks)  # both branches were exercised
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(stoch, name).grad, getattr(bn, name).grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(stoch.running_var, bn.running_var, atol=1e-12, rtol=0)


def test_gradcheck_with_a_fixed_mask():
    stoch = StochNorm2d.from_batchnorm(random_batchnorm(C, seed=2), p=0.5, generator=torch.Generator())
    stats = [stoch.running_mean.clone(), stoch.running_var.clone()]

    def fn(x: torch.Tensor) -> torch.Tensor:
        stoch.generator.manual_seed(1)  # the same mask and statistics at every call
        with torch.no_grad():
            stoch.running_mean.copy_(stats[0])
            stoch.running_var.copy_(stats[1])
        return stoch(x)

    mask = torch.rand(C, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < mask.sum() < C
    x = make_data(100, C, n=2)[0][..., :2, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


def test_masks_follow_the_generator_state_and_p():
    x = make_data(100, C)[0]
    outs = []
    for _ in range(2):  # two layer objects whose generators are in the same state
        layer = StochNorm2d.from_batchnorm(random_batchnorm(C, seed=2), p=0.5,
                                           generator=torch.Generator().manual_seed(7))
        outs.append([layer(x) for _ in range(3)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    layer = StochNorm2d(512, p=0.3, generator=torch.Generator().manual_seed(0))
    fraction = torch.stack([layer._sample_mask(torch.device("cpu")) for _ in range(100)]).double().mean()
    assert abs(fraction.item() - 0.3) < 0.01


def test_batch_of_one_works_unless_a_channel_has_a_single_value():
    layer = StochNorm2d(C)
    assert layer(torch.randn(1, C, 2, 2)).shape == (1, C, 2, 2)
    for layer, shape in ((StochNorm2d(C), (1, C, 1, 1)), (StochNorm1d(C), (1, C))):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got 1"):
            layer(torch.randn(*shape))
        assert layer.eval()(torch.randn(*shape)).shape == shape  # evaluation uses the running statistics


def test_convert_model_gives_every_layer_its_p_and_copies_parameters_and_statistics():
    inner = nn.Sequential(random_batchnorm(C, 2, seed=2), random_batchnorm(C, 3, seed=3))
    model = nn.Sequential(random_batchnorm(C, 1, seed=1), inner, nn.Linear(C, C))
    model[1][1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator()
    converted = convert_model(model, p=0.3, generator=gen)
    assert converted is model
    assert [type(m) for m in (model[0], *model[1])] == [StochNorm1d, StochNorm2d, StochNorm3d]
    layers = [model[0], *model[1]]
    assert all(m.p == 0.3 and m.generator is gen and m.track_running_stats for m in layers)
    assert [m.training for m in layers] == [True, True, False]
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert model[0].running_mean.data_ptr() != before["0.running_mean"].data_ptr()
    # A torchvision BatchNorm checkpoint (with num_batches_tracked) loads strictly.
    model.load_state_dict(before, strict=True)
    single = convert_model(random_batchnorm(C, 2, seed=2), p=0.7)
    assert isinstance(single, StochNorm2d) and single.p == 0.7
    assert "p=0.7" in repr(single)
    with pytest.raises(ValueError, match="probability"):
        StochNorm2d(3, p=1.5)


def test_forward_and_backward_on_float32_and_without_affine():
    cases = [(StochNorm2d(4), torch.randn(8, 4, 3, 3)), (StochNorm3d(4, affine=False), torch.randn(2, 4, 2, 2, 2)),
             (StochNorm1d(4, momentum=None), torch.randn(8, 4, 5))]
    for layer, x in cases:
        x.requires_grad_()
        layer(x).square().sum().backward()
        assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="expected 4D input"):
        StochNorm2d(4)(torch.randn(2, 4))


def test_bfloat16_inputs_with_float32_parameters_as_under_amp():
    check_bfloat16_under_float32_parameters(StochNorm2d(4))


def test_sync_conversion_keeps_the_layers_and_is_plain_outside_a_process_group():
    def make() -> nn.Module:
        layers = nn.Sequential(random_batchnorm(C, 2, seed=2), nn.Flatten(), nn.BatchNorm1d(C * 20).double())
        return convert_model(layers, p=0.5, generator=torch.Generator().manual_seed(2))

    model, reference = make(), make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "BatchNorm subclass without supports_sync" warning
        assert convert_sync_batchnorm(model) is model
    assert [type(m) for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [StochNorm2d, StochNorm1d]
    assert model[0].sync and model[2].sync
    x = make_data(100, C)[0]
    torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


# ---------------------------------------------------------------- data parallel
SPLITS = [(5, 11), (0, 16)]
STEPS = 3


def stoch_layer() -> StochNorm2d:
    return StochNorm2d.from_batchnorm(random_batchnorm(C, seed=2), p=0.5, generator=torch.Generator().manual_seed(5))


def stoch_worker(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for split in SPLITS:
        layer = convert_sync_batchnorm(stoch_layer())
        assert type(layer) is StochNorm2d and layer.sync
        masks = []
        sample = layer._sample_mask
        layer._sample_mask = lambda device, _s=sample, _m=masks: (_m.append(_s(device)), _m[-1])[1]
        lo = sum(split[:rank])
        outs = []
        for i in range(STEPS):
            x, grad = make_data(100 + i, C)
            layer.zero_grad()
            outs.append(step(layer, x[lo:lo + split[rank]], grad[lo:lo + split[rank]]))
        results[split] = {"outs": outs, "masks": masks, "weight": layer.weight.grad, "bias": layer.bias.grad,
                          "mean": layer.running_mean, "var": layer.running_var}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_sync_stochnorm_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    run_gloo(stoch_worker, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for split in SPLITS:
        ref = stoch_layer()
        outs = []
        for i in range(STEPS):
            ref.zero_grad()
            outs.append(step(ref, *make_data(100 + i, C)))
        for a, b in zip(ranks[0][split]["masks"], ranks[1][split]["masks"]):
            assert torch.equal(a, b)  # every rank draws the same masks
        assert_shards_match(ranks, split, outs, ref)
        for name in ("weight", "bias"):  # data-parallel training sums the per-rank parameter gradients
            total = ranks[0][split][name] + ranks[1][split][name]
            torch.testing.assert_close(total, getattr(ref, name).grad, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- plug-in and config
def test_strategy_converts_backbone_and_bottleneck_and_checkpoints_its_generator():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=16)
    plugin = StochNormStrategy(p=0.3)
    model = plugin.transform_model(model)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in layers] == [StochNorm2d] * 3 + [StochNorm1d]
    assert all(m.p == 0.3 and m.generator is plugin.generator for m in layers)
    plugin.generator.manual_seed(11)
    model(torch.randn(4, 3, 32, 32))
    buffer = io.BytesIO()
    torch.save(plugin.state_dict(), buffer)
    expected = torch.rand(8, generator=plugin.generator)
    restored = StochNormStrategy(p=0.3)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(torch.rand(8, generator=restored.generator), expected)
    with pytest.raises(ConfigError, match="no BatchNorm1d/2d/3d"):
        StochNormStrategy().transform_model(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_config_builds_on_every_backbone(backbone):
    cfg, _ = resolve_config(compose_config(["norm=stochnorm", *backbone, "backbone.bottleneck_dim=16"]))
    assert cfg.norm["stochnorm"]["p"] == 0.5
    model = build_model(cfg, build_plugins("norm", cfg.norm).values())
    types = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert types == {StochNorm2d, StochNorm1d}
    x = torch.randn(2, 3, 32, 32)
    logits, _ = model(x)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trains_end_to_end_and_the_generator_is_seeded_from_the_run(train_run, tmp_path):
    summary = train_run("norm=stochnorm", "trainer.max_steps=2", "seed=4")
    assert summary["steps"] == 2 and 0.0 <= summary["final"]["target_test/acc"] <= 1.0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    generator = torch.Generator().manual_seed(4)
    for _ in range(2):  # one mask per step and layer of the digits CNN (32, 64, 128 channels)
        for channels in (32, 64, 128):
            torch.rand(channels, generator=generator)
    assert torch.equal(state["plugins"]["norm.stochnorm"]["_extra_state"], generator.get_state())


def test_two_batchnorm_replacements_cannot_be_stacked(tmp_path):
    cfg, resolved = resolve_config(compose_config([*FAST, "norm=[stochnorm,bin]"]))
    with pytest.raises(ConfigError, match="norm.stochnorm and norm.bin both replace the model's batchnorm"):
        Trainer(cfg, tmp_path, resolved)

"""Where strategies go: stages, their channels, insertion after a stage, BatchNorm swaps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tllab.errors import ConfigError
from tllab.models import Classifier, create_backbone
from tllab.norm.placement import attach_after, replace_batchnorm, resolve_stages, stage_channels, stages


@pytest.mark.parametrize("library, name, names, channels", [
    ("tllab", "digits_cnn", ["block1", "block2", "block3"], [32, 64, 128]),
    ("torchvision", "resnet18", ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
    ("torchvision", "resnet50", ["layer1", "layer2", "layer3", "layer4"], [256, 512, 1024, 2048]),
    ("timm", "resnet18", ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
])
def test_stages_and_their_channels(library, name, names, channels):
    backbone = create_backbone(library, name)
    found = stages(backbone)
    assert list(found) == names
    assert [stage_channels(backbone, s) for s in found.values()] == channels


def test_unknown_structure_and_stage_names_fail_clearly():
    with pytest.raises(ConfigError, match="no ResNet stages"):
        stages(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['layer9'\].*valid stages: \['layer1'"):
        resolve_stages(create_backbone("torchvision", "resnet18"), ["layer9"], "norm.x")


class Double(nn.Module):
    def forward(self, x):
        return 2 * x


def test_attach_after_changes_the_stage_output_keeps_keys_and_survives_deepcopy():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10).eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    before = model.backbone.features[:4](x)
    stage = stages(model.backbone)["block1"]
    attach_after(model, stage, "double_block1", Double())
    assert set(model.state_dict()) == keys  # no parameters added, none renamed
    torch.testing.assert_close(model.backbone.features[:4](x), 2 * before)
    clone = copy.deepcopy(model)
    clone.norm_layers["double_block1"].forward = lambda t: 3 * t  # the copy's hook calls the copy's module
    torch.testing.assert_close(clone.backbone.features[:4](x), 3 * before)
    torch.testing.assert_close(model.backbone.features[:4](x), 2 * before)
    with pytest.raises(ConfigError, match="already attached"):
        attach_after(model, stage, "double_block1", Double())


def test_replace_batchnorm_swaps_exact_types_only():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(4)), nn.SyncBatchNorm(2))
    count = replace_batchnorm(model, lambda bn: nn.GroupNorm(1, bn.num_features), (nn.BatchNorm2d, nn.BatchNorm1d))
    assert count == 2 and isinstance(model[0], nn.GroupNorm) and isinstance(model[1][0], nn.GroupNorm)
    assert isinstance(model[2], nn.SyncBatchNorm)

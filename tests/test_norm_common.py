"""What the BatchNorm-replacing strategies share: they train end to end and refuse a model
without BatchNorm."""

from __future__ import annotations

import pytest
from torch import nn

from tllab.errors import ConfigError
from tllab.norm.bin import BINStrategy
from tllab.norm.domainnorm import DomainNormStrategy
from tllab.norm.stochnorm import StochNormStrategy


@pytest.mark.parametrize("name", ["bin", "domainnorm"])
def test_trains_end_to_end(train_run, name):
    summary = train_run(f"norm={name}", "trainer.max_steps=2")
    assert summary["steps"] == 2 and 0.0 <= summary["final"]["target_test/acc"] <= 1.0


@pytest.mark.parametrize("strategy, match", [
    (BINStrategy(), "norm.bin: the backbone Sequential has no BatchNorm2d"),
    (DomainNormStrategy(), "norm.domainnorm: the backbone Sequential has no BatchNorm2d"),
    (StochNormStrategy(), "no BatchNorm1d/2d/3d"),
])
def test_a_model_without_batchnorm_is_refused(strategy, match):
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ConfigError, match=match):
        strategy.transform_model(model)

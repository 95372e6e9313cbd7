"""Row (method) and column (task) names of runs, from their configs."""

from __future__ import annotations

import pytest

from tllab.keys import group_keys
from tllab.train import resolve_config

from .conftest import compose_config


@pytest.mark.parametrize("overrides, method, task", [
    ([], "source only", "mnist→mnistm"),
    (["dataset.target=[uci,mnist-rot30]"], "source only", "mnist→uci+mnist-rot30"),
    (["experiment=digits_dg"], "erm", "mnistm"),
    (["experiment=digits_finetune"], "scratch", "mnistm 5/class"),
    (["experiment=digits_finetune", "backbone.pretrained=x.pt", "dataset.labels_per_class=null",
      "dataset.sample_rate=15"], "fine-tune", "mnistm 15%"),
    (["experiment=digits_finetune", "backbone.pretrained=x.pt", "regularizer=noisy"], "noisy", "mnistm 5/class"),
    (["experiment=digits_finetune", "regularizer=noisy"], "scratch+noisy", "mnistm 5/class"),
    (["norm=recorder", "regularizer=[noisy,recorder]"], "recorder+noisy+recorder", "mnist→mnistm"),
    (["label=my method", "norm=recorder"], "my method", "mnist→mnistm"),
    (["align=[mcc,dann]", "norm=adabn", "regularizer=noisy"], "adabn+noisy+mcc+dann", "mnist→mnistm"),
])
def test_method_and_task_names(overrides, method, task):
    cfg, _ = resolve_config(compose_config(overrides))
    keys = group_keys(cfg)
    assert (keys["method"], keys["task"]) == (method, task)

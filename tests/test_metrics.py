"""Evaluation metrics: accuracy, mean per-class accuracy and the per-class side file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import FAST, compose_config
from tests.image_fixtures import write_jpeg, write_list
from tllab.data.loaders import eval_loader
from tllab.train import resolve_config
from tllab.trainer import Trainer


def _lists(root, per_class: dict[str, list[int]]) -> None:
    for d, (name, counts) in enumerate(per_class.items()):
        rows = []
        for label, n in enumerate(counts):
            for k in range(n):
                write_jpeg(root / name / f"{label}_{k}.jpg", seed=1000 * d + 10 * label + k)
                rows.append((f"{name}/{label}_{k}.jpg", label))
        write_list(root / f"{name}.txt", rows)


def test_mean_per_class_accuracy_equals_a_hand_computation(tmp_path):
    """Target classes with 1, 3 and 6 images and one class without any (left out of the mean)."""
    _lists(tmp_path / "data", {"src": [3, 3, 3, 3], "tgt": [1, 3, 6, 0]})
    cfg, resolved = resolve_config(compose_config([
        *FAST, "trainer.max_steps=3", "dataset=image_list", f"dataset.root={tmp_path / 'data'}",
        "dataset.source=[src.txt]", "dataset.target=[tgt.txt]", "dataset.num_classes=4", "dataset.val_fraction=0.34",
        "backbone=digits_cnn", "dataset.image_size=32", "trainer.batch_size=4"]))
    trainer = Trainer(cfg, tmp_path / "run", resolved)
    trainer.fit()
    metrics, per_class = trainer.evaluate()

    model = trainer.model.eval()
    labels, preds = [], []
    with torch.no_grad():
        for x, y, _ in eval_loader(trainer.data.eval_splits["target_test"], 256, 0, 0, 1, False):
            labels.append(y.numpy())
            preds.append(model(x)[0].argmax(1).numpy())
    y, p = np.concatenate(labels), np.concatenate(preds)
    assert np.bincount(y, minlength=4).tolist() == [1, 3, 6, 0]
    by_class = [float((p[y == c] == c).mean()) for c in range(3)]
    assert metrics["target_test/acc"] == pytest.approx(float((p == y).mean()), abs=1e-12)
    assert metrics["target_test/acc_per_class_mean"] == pytest.approx(np.mean(by_class), abs=1e-12)
    assert per_class["target_test"][:3] == pytest.approx(by_class, abs=1e-12)
    assert per_class["target_test"][3] is None

    lines = [json.loads(line) for line in (tmp_path / "run" / "per_class.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3]
    assert lines[-1]["classes"] == [f"class_{c}" for c in range(4)]
    assert lines[-1]["target_test"] == per_class["target_test"]
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    assert record["source_val/acc_per_class_mean"] == pytest.approx(
        np.mean([a for a in lines[-1]["source_val"] if a is not None]), abs=1e-12)

"""Tiny image datasets on disk in the real layouts of the benchmarks (generated, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (28, 22)) -> None:
    """A small random-colour JPEG (a smooth gradient plus noise, so it compresses like a photo)."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 80, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    img = np.clip(base + ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def write_list(path: Path, rows: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p} {y}\n" for p, y in rows))


def office31_tree(root: Path, classes: list[str], per_class: dict[str, int]) -> dict[str, int]:
    """Office-31 as tllib lays it out: ``<root>/<domain>/images/<class>/frame_XXXX.jpg`` and
    ``<root>/image_list/<domain>.txt``; ``per_class`` images of each class per domain. Returns the
    images per list file."""
    counts = {}
    for d, (domain, n) in enumerate(per_class.items()):
        rows = []
        for label, name in enumerate(classes):
            for k in range(n):
                rel = f"{domain}/images/{name}/frame_{k + 1:04d}.jpg"
                write_jpeg(root / rel, seed=1000 * d + 10 * label + k)
                rows.append((rel, label))
        write_list(root / "image_list" / f"{domain}.txt", rows)
        counts[f"image_list/{domain}.txt"] = len(rows)
    return counts


def finetune_tree(root: Path, num_classes: int, train_per_class: int, test_per_class: int,
                  rates: tuple[int, ...] = (15, 30, 50)) -> dict[str, list[tuple[str, int]]]:
    """A CUB-200-shaped fine-tuning set: ``image_list/train_100.txt``, ``train_{rate}.txt`` (fixed
    subsets: the first ``ceil(rate% * n)`` images of each class) and ``test.txt``."""
    lists: dict[str, list[tuple[str, int]]] = {"train_100": [], "test": []}
    for label in range(num_classes):
        for k in range(train_per_class + test_per_class):
            split = "train" if k < train_per_class else "test"
            rel = f"images/{label:03d}.class_{label}/img_{k:03d}.jpg"
            write_jpeg(root / rel, seed=50_000 + 100 * label + k)
            lists["train_100" if split == "train" else "test"].append((rel, label))
    for rate in rates:
        keep = int(np.ceil(rate / 100 * train_per_class))
        lists[f"train_{rate}"] = [row for row in lists["train_100"] if int(row[0].rsplit("_", 1)[1][:3]) < keep]
    for name, rows in lists.items():
        write_list(root / "image_list" / f"{name}.txt", rows)
    return lists


def catalog_tree(root: Path, cfg, num_classes: int = 3, per_class: int = 2) -> None:
    """Any image-list entry of the benchmark catalog in its own layout: every list file its domains
    name (train, test, val, fixed subsets), each with ``per_class`` images of the first
    ``num_classes`` classes, labels written as the lists count them (``dataset.label_offset``)."""
    from tllab.data.layout import domain_spec

    for d, key in enumerate(cfg.domains):
        rows = []
        for label in range(num_classes):
            for k in range(per_class):
                rel = f"{key}/{label}/{k}.jpg"
                write_jpeg(root / rel, seed=10_000 * d + 100 * label + k)
                rows.append((rel, label + cfg.label_offset))
        for file in domain_spec(key, cfg).files():
            write_list(root / file, rows)

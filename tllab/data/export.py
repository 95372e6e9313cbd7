"""Writing datasets as files: the embedded digits (``tllab-data export digits``) and tllib-format
lists for a folder tree of one's own images (``tllab-data prepare image-list``).

``export_digits(out)`` writes every image once, as a lossless PNG, in both layouts::

    <out>/<domain>/{train,test}/<label>/<index>.png     image_folder (split folders)
    <out>/image_list/<domain>_{train,test}.txt          image_list, in the arrays' order
    <out>/classes.txt                                   0 .. 9

so ``dataset=digits_files dataset.root=<out>`` (or ``$TLLAB_DATA_DIR/digits_files``) trains on exactly
the pixels and the order of ``dataset=digits``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tllab.data.files import class_folders, scan_image_folder

__all__ = ["export_digits", "prepare_image_lists"]

DIGITS_DOMAINS = ("mnist", "uci", "mnistm", "synth")


def _write_list(path: Path, rows: Sequence[tuple[str, int]]) -> None:
    """Write ``<path> <label>`` lines; paths as the file system's bytes (any file name survives)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(os.fsencode(p) + f" {y}\n".encode() for p, y in rows))


def export_digits(out: Path, domains: Sequence[str] = DIGITS_DOMAINS, seed: int = 0,
                  cache_dir: str | None = None) -> dict[str, int]:
    """Write digits domains as PNG files plus lists (see the module docstring); return images per list."""
    from PIL import Image

    from tllab.data.digits import load_domain

    counts = {}
    for name in domains:
        d = load_domain(name, seed=seed, cache_dir=cache_dir)
        for split, images, labels in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
            rows = []
            for i, (image, label) in enumerate(zip(images, labels)):
                rel = f"{name}/{split}/{label}/{i:05d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(out / rel, compress_level=1)
                rows.append((rel, int(label)))
            _write_list(out / "image_list" / f"{name}_{split}.txt", rows)
            counts[f"image_list/{name}_{split}.txt"] = len(rows)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in range(10)))
    return counts


def prepare_image_lists(tree: Path, out: Path, test_fraction: float = 0.0, seed: int = 0) -> dict[str, dict[str, int]]:
    """tllib-format lists for ``<tree>/<domain>/<class>/<image>``: ``<out>/<domain>.txt`` (all images), and
    with ``test_fraction`` also ``<domain>_train.txt`` / ``<domain>_test.txt`` (a seeded per-class draw);
    ``<out>/classes.txt`` holds the sorted union of the class folders. Paths are relative to ``tree``.
    Returns, per domain, the images per list file."""
    domains = class_folders(tree)
    classes = sorted(set().union(*(class_folders(tree / d) for d in domains)))
    counts = {}
    for domain in domains:
        index = scan_image_folder(tree / domain, classes)
        rows = [(os.path.join(domain, index.paths[i]), int(index.targets[i])) for i in range(len(index.targets))]
        if not rows:
            continue
        _write_list(out / f"{domain}.txt", rows)
        counts[domain] = {f"{domain}.txt": len(rows)}
        if test_fraction > 0:
            rng = np.random.default_rng([seed, *domain.encode()])
            is_test = np.zeros(len(rows), bool)
            for c in np.unique(index.targets):
                members = rng.permutation(np.flatnonzero(index.targets == c))
                is_test[members[:int(round(test_fraction * len(members)))]] = True
            for split, wanted in (("train", False), ("test", True)):
                part = [row for row, t in zip(rows, is_test) if t == wanted]
                _write_list(out / f"{domain}_{split}.txt", part)
                counts[domain][f"{domain}_{split}.txt"] = len(part)
    (out / "classes.txt").write_bytes(b"".join(os.fsencode(c) + b"\n" for c in classes))
    return counts

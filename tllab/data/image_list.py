"""``dataset=image_list`` and the benchmark catalog: domains as tllib-format list files.

Every catalog dataset (``configs/dataset/office31.yaml``, ...) is this family with its domain keys,
list files, class names and published image counts filled in; data prepared for tllib works as it
is. Layout rules (root, domains, splits): :mod:`tllab.data.layout`; list format and loading:
:mod:`tllab.data.files`.

Example:
    ``tllab-train dataset=office31 dataset.root=~/data/office31 dataset.source=[A] dataset.target=[W]``
    ``tllab-train dataset=image_list dataset.root=~/data/mine dataset.num_classes=5
    dataset.source=[lists/a.txt] dataset.target=[lists/b.txt]``
"""

from __future__ import annotations

import logging

import numpy as np

from tllab.data.files import FileDataset, label_problems, read_image_list
from tllab.data.layout import check_root, class_names_from_config, data_root, domain_spec, resolve, transform_of
from tllab.errors import ConfigError, DataError
from tllab.schema import DatasetConfig

log = logging.getLogger(__name__)


def check_domain(name: str, cfg: DatasetConfig) -> None:
    check_root(cfg, domain_spec(name, cfg))


def class_names(cfg: DatasetConfig) -> list[str]:
    """``dataset.classes``, else ``class_<i>`` for ``dataset.num_classes``."""
    names = class_names_from_config(cfg, data_root(cfg))
    if names is None:
        if cfg.num_classes is None:
            raise ConfigError(f"dataset {cfg.name}: set dataset.num_classes=<N> or dataset.classes=<file with one "
                              "name a line>; a list file has only label numbers.")
        return [f"class_{i}" for i in range(cfg.num_classes)]
    if cfg.num_classes is not None and cfg.num_classes != len(names):
        raise ConfigError(f"dataset.num_classes={cfg.num_classes} but dataset.classes names {len(names)} classes; "
                          "set dataset.num_classes=null (counted from the names) or fix one of them.")
    return names


def read_list(path: str, cfg: DatasetConfig) -> FileDataset:
    """One list file as a dataset (evaluation transforms, domain 0); labels are checked against the
    number of classes and the image count against the published list (a warning)."""
    root = data_root(cfg)
    list_file = resolve(path, root)
    index = read_image_list(list_file, root or list_file.parent, label_offset=cfg.label_offset)
    num_classes = len(class_names(cfg))
    bad = label_problems(index, num_classes, cfg.label_offset)
    if bad:
        raise DataError(f"{list_file} line {bad[0][0]}: {bad[0][1]}, {cfg.name} has {num_classes} classes "
                        f"({len(bad)} such lines); fix the list or set dataset.num_classes (or dataset.label_offset).")
    expected = cfg.counts.get(path)
    if expected is not None and expected != len(index.targets):
        log.warning("%s lists %d images, the published list %d: check the download (`tllab-data check %s`)",
                    list_file, len(index.targets), expected, cfg.name)
    return FileDataset(index, np.zeros(len(index.targets), np.int64), transform_of(cfg), cfg.skip_bad_images)


def load_domain(name: str, cfg: DatasetConfig):
    from tllab.data import Splits

    spec = domain_spec(name, cfg)
    train = read_list(spec.train, cfg)
    test = train if spec.test == spec.train else read_list(spec.test, cfg)
    return Splits(train, test, read_list(spec.val, cfg) if spec.val else None)


def fixed_subset(name: str, rate: float, cfg: DatasetConfig) -> FileDataset | None:
    """The official fine-tuning subset for ``dataset.sample_rate`` (tllib's ``train_{rate}.txt``), or
    None when the domain has no fixed subsets (a per-class draw is made instead)."""
    spec = domain_spec(name, cfg)
    if not spec.subsets:
        return None
    if float(rate) not in spec.subsets:
        rates = ", ".join(f"{r:g}" for r in sorted(spec.subsets))
        raise ConfigError(f"dataset.sample_rate={rate:g}: {cfg.name} {spec.key} ships fixed subsets for {rates} "
                          "percent; use one of them (or dataset.labels_per_class).")
    return read_list(spec.subsets[float(rate)], cfg)

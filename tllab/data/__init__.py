"""Datasets as domains, and the one data layout every setting shares.

A dataset family (``dataset.family``: ``digits`` in memory, ``image_list`` and ``image_folder`` on
disk) maps a domain name to its :class:`Splits` (train, test, and an official validation split where
the benchmark has one). :func:`build_data` turns the ``dataset`` config into a :class:`DataModule`:

=========  ===========================================  ===================================
setting    labelled training set                          evaluation splits
=========  ===========================================  ===================================
da         source train splits minus a validation part  source_val, source_test, target_test
           (+ the target train split, unlabelled)
dg         the same (several sources; target unseen)    source_val, source_test, target_test
finetune   a labelled subset of the target train split  target_val, target_test, source_test
           (``labels_per_class`` or ``sample_rate``)
=========  ===========================================  ===================================

Training sets draw random transforms (file datasets' ``tllib`` preset), evaluation sets do not.

With several domains in a role, each also gets its own split (``target_test/uci``).
Model selection uses ``selection_split`` (``source_val``, or ``target_val`` when fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tllab.data import image_folder, image_list
from tllab.data.arrays import ArrayDataset
from tllab.data.base import ImageSet
from tllab.errors import ConfigError
from tllab.schema import DatasetConfig, is_path

__all__ = ["DATASETS", "DataModule", "DatasetFamily", "Splits", "build_data", "check_dataset_config",
           "resolve_num_classes"]


@dataclass(frozen=True)
class Splits:
    """A domain's splits; ``val`` is an official validation split (else ``val_fraction`` of train)."""

    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None


def _no_fixed_subset(name: str, rate: float, cfg: DatasetConfig) -> None:
    return None


@dataclass(frozen=True)
class DatasetFamily:
    """How one kind of data is read (``dataset.family``).

    Args:
        check_domain: validate a domain name cheaply, before anything loads (raises ValueError).
        load_domain: a domain's :class:`Splits`.
        class_names: the class names by label (``dataset.num_classes=null`` counts them).
        fixed_subset: the official fine-tuning subset of a domain for ``dataset.sample_rate``, or None
            (a per-class random draw is made instead).
    """

    check_domain: Callable[[str, DatasetConfig], None]
    load_domain: Callable[[str, DatasetConfig], Splits]
    class_names: Callable[[DatasetConfig], list[str]]
    fixed_subset: Callable[[str, float, DatasetConfig], ImageSet | None] = _no_fixed_subset


def _digits_check(name: str, cfg: DatasetConfig) -> None:
    from tllab.data.digits import parse_domain

    parse_domain(name)


def _digits_load(name: str, cfg: DatasetConfig) -> Splits:
    from tllab.data.digits import load_domain

    d = load_domain(name, seed=cfg.data_seed, cache_dir=cfg.root)
    zeros = np.zeros
    return Splits(ArrayDataset(d.train_x, d.train_y, zeros(len(d.train_y), np.int64), cfg.image_size, cfg.mean,
                               cfg.std),
                  ArrayDataset(d.test_x, d.test_y, zeros(len(d.test_y), np.int64), cfg.image_size, cfg.mean, cfg.std))


def _digits_classes(cfg: DatasetConfig) -> list[str]:
    return [str(c) for c in range(cfg.num_classes or 10)]  # the labels are the names


# Dataset families by ``dataset.family``.
DATASETS: dict[str, DatasetFamily] = {
    "digits": DatasetFamily(_digits_check, _digits_load, _digits_classes),
    "image_list": DatasetFamily(image_list.check_domain, image_list.load_domain, image_list.class_names,
                                image_list.fixed_subset),
    "image_folder": DatasetFamily(image_folder.check_domain, image_folder.load_domain, image_folder.class_names),
}


@dataclass
class DataModule:
    """The datasets of one run (see the module docstring)."""

    train: ImageSet
    eval_splits: dict[str, ImageSet]
    selection_split: str | None  # split that picks the ``best`` checkpoint; None: the last one
    unlabeled: ImageSet | None = None
    train_domains: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # class names by label (saved with checkpoints)


def family_of(cfg: DatasetConfig) -> DatasetFamily:
    if cfg.family not in DATASETS:
        raise ConfigError(f"unknown dataset.family {cfg.family!r}; available: {sorted(DATASETS)}.")
    return DATASETS[cfg.family]


def check_dataset_config(cfg: DatasetConfig) -> DatasetFamily:
    """Validate the dataset config without loading data; return its family."""
    family = family_of(cfg)
    setting = cfg.setting  # a str-valued enum: compares equal to "da", "dg", "finetune"
    source, target = [cfg.domain_key(n) for n in cfg.source], [cfg.domain_key(n) for n in cfg.target]
    named: dict[str, str] = {}
    for name, key in zip([*cfg.source, *cfg.target], source + target):
        other = named.setdefault(key, name)
        if other != name and (is_path(name) or is_path(other)):
            raise ConfigError(f"{other} and {name} are both domain {key!r} (a list or folder is named by its file "
                              "name); give them distinct file names, or keys in dataset.domains.")
    if cfg.skip_bad_images and cfg.sampler == "domain_balanced":
        raise ConfigError("dataset.skip_bad_images=true leaves images out of their batch, so batches cannot stay "
                          "domain-balanced; fix the files (`tllab-data check`) or use dataset.sampler=random.")
    if not target:
        raise ConfigError("dataset.target is empty; name the target domain(s), e.g. dataset.target=[mnistm].")
    if setting in ("da", "dg") and not source:
        raise ConfigError(f"dataset.source is empty; setting={setting} trains on labelled source domains.")
    if setting == "dg" and set(source) & set(target):
        raise ConfigError(f"dataset.setting=dg holds the target out, but {sorted(set(source) & set(target))} "
                          "is both a source and a target.")
    if setting == "finetune":
        if len(target) != 1:
            raise ConfigError("dataset.setting=finetune trains on exactly one target domain.")
        if cfg.labels_per_class is not None and cfg.sample_rate is not None:
            raise ConfigError("set only one of dataset.labels_per_class and dataset.sample_rate.")
        if cfg.sample_rate is not None and not 0 < cfg.sample_rate <= 100:
            raise ConfigError(f"dataset.sample_rate={cfg.sample_rate} is a percentage in (0, 100].")
        if cfg.labels_per_class is not None and cfg.labels_per_class < 1:
            raise ConfigError("dataset.labels_per_class must be >= 1.")
    elif cfg.labels_per_class is not None or cfg.sample_rate is not None:
        raise ConfigError("dataset.labels_per_class / sample_rate select fine-tuning data; "
                          "set dataset.setting=finetune or leave them null.")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"dataset.val_fraction={cfg.val_fraction} must be in [0, 1).")
    for name in [*cfg.source, *cfg.target]:
        try:
            family.check_domain(name, cfg)
        except ValueError as e:
            raise ConfigError(f"dataset {cfg.name}: {e}") from e
    return family


def resolve_num_classes(cfg: DatasetConfig) -> int:
    """``dataset.num_classes``, counted from the class names when it is null."""
    if cfg.num_classes is None:
        family = check_dataset_config(cfg)
        return len(family.class_names(cfg))
    return cfg.num_classes


def _split_per_class(targets: np.ndarray, take: Callable[[int], int], rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per class, move ``take(n_class)`` random indices to the second part (both empty for no targets:
    a fixed subset that is the whole train list, e.g. ``train_100.txt``, leaves nothing to validate on)."""
    rest, taken = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = take(len(idx))
        taken.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(taken))


def _eval_entries(role: str, names: list[str], parts: list[ImageSet]) -> dict[str, ImageSet]:
    """The pooled split (accuracy over all its images) and, with several domains, one per domain;
    empty parts are left out."""
    named = [(n, p) for n, p in zip(names, parts) if len(p)]
    if not named:
        return {}
    out = {role: ImageSet.concat([p for _, p in named])}
    if len(parts) > 1:
        out.update({f"{role}/{n}": p for n, p in named})
    return out


def _check_labels(data: DataModule, cfg: DatasetConfig, family: DatasetFamily) -> DataModule:
    num_classes = cfg.num_classes
    top = max(int(ds.targets.max()) for ds in [data.train, *data.eval_splits.values()])
    if top >= num_classes:
        raise ConfigError(f"dataset.num_classes={num_classes} but the labels go up to {top}; "
                          f"set dataset.num_classes={top + 1}.")
    data.classes = family.class_names(cfg)
    return data


def build_data(cfg: DatasetConfig, seed: int) -> DataModule:
    """Load the domains named in ``cfg`` and lay them out for ``cfg.setting``.

    Validation parts are drawn per class with ``cfg.data_seed`` (the same for every run seed)
    unless the domain has an official validation split; the fine-tuning subset is the official one
    for ``sample_rate`` where the dataset ships it (its validation part then comes from the rest of
    the train list), else drawn with ``seed`` (deterministic per run seed). Training sets use the
    random training transforms, evaluation sets the evaluation ones.
    """
    family = check_dataset_config(cfg)
    setting = cfg.setting
    source, target = [cfg.domain_key(n) for n in cfg.source], [cfg.domain_key(n) for n in cfg.target]
    names = dict(zip(source + target, [*cfg.source, *cfg.target]))  # key -> name as configured
    cache: dict[str, Splits] = {}

    def load(key: str) -> Splits:
        if key not in cache:
            cache[key] = family.load_domain(names[key], cfg)
        return cache[key]

    def train_and_val(train: ImageSet, official_val: ImageSet | None, key: str) -> tuple[ImageSet, ImageSet]:
        if official_val is not None:
            return train, official_val
        rng = np.random.default_rng([cfg.data_seed, *key.encode()])
        keep, val = _split_per_class(train.targets, lambda n: int(round(cfg.val_fraction * n)), rng)
        return train.subset(keep), train.subset(val)

    if setting == "finetune":
        (key,) = target
        splits = load(key)
        fixed = family.fixed_subset(names[key], cfg.sample_rate, cfg) if cfg.sample_rate is not None else None
        if fixed is None:
            pool, val = train_and_val(splits.train, splits.val, key)
        else:  # the published subset stays whole; a validation part comes from the rest of the train list
            taken = {fixed.path(i) for i in range(len(fixed))}
            rest = np.array([i for i in range(len(splits.train)) if splits.train.path(i) not in taken], np.int64)
            pool, (_, val) = fixed, train_and_val(splits.train.subset(rest), splits.val, key)
        rng = np.random.default_rng([seed, 7919])
        if cfg.labels_per_class is not None:
            k = cfg.labels_per_class
            small = min(np.bincount(pool.targets))
            if small < k:
                raise ConfigError(f"dataset.labels_per_class={k} but a class of {key} has only {small} images.")
            take = lambda n: k  # noqa: E731
        elif cfg.sample_rate is not None and fixed is None:
            take = lambda n: max(1, int(round(cfg.sample_rate / 100 * n)))  # noqa: E731
        else:
            take = lambda n: n  # noqa: E731
        _, chosen = _split_per_class(pool.targets, take, rng)
        evals = {**_eval_entries("target_val", [key], [val]),
                 **_eval_entries("target_test", [key], [splits.test]),
                 **_eval_entries("source_test", source, [load(s).test for s in source])}
        return _check_labels(DataModule(train=pool.subset(chosen).augmented(), eval_splits=evals,
                                        selection_split="target_val" if "target_val" in evals else None,
                                        train_domains=[key]), cfg, family)

    train_parts, val_parts = [], []
    for i, key in enumerate(source):
        splits = load(key)
        train, val = train_and_val(splits.train, splits.val, key)
        train_parts.append(train.with_domain(i))
        val_parts.append(val.with_domain(i))
    evals = {**_eval_entries("source_val", source, val_parts),
             **_eval_entries("source_test", source, [load(s).test for s in source]),
             **_eval_entries("target_test", target, [load(t).test for t in target])}
    unlabeled = None
    if setting == "da":
        unlabeled = ImageSet.concat([load(t).train.unlabeled() for t in target]).augmented()
    return _check_labels(DataModule(train=ImageSet.concat(train_parts).augmented(), eval_splits=evals,
                                    selection_split="source_val" if "source_val" in evals else None,
                                    unlabeled=unlabeled, train_domains=source), cfg, family)

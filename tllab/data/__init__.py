"""Datasets as domains, and the one data layout every setting shares.

A dataset family maps a domain name to its ``(train, test)`` splits. :func:`build_data` turns the
``dataset`` config into a :class:`DataModule`:

=========  ===========================================  ===================================
setting    labelled training set                          evaluation splits
=========  ===========================================  ===================================
da         source train splits minus a validation part  source_val, source_test, target_test
           (+ the target train split, unlabelled)
dg         the same (several sources; target unseen)    source_val, source_test, target_test
finetune   a labelled subset of the target train split  target_val, target_test, source_test
           (``labels_per_class`` or ``sample_rate``)
=========  ===========================================  ===================================

With several domains in a role, each also gets its own split (``target_test/uci``).
Model selection uses ``selection_split`` (``source_val``, or ``target_val`` when fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tllab.data.arrays import ArrayDataset
from tllab.errors import ConfigError
from tllab.schema import DatasetConfig

__all__ = ["DATASETS", "DataModule", "DatasetFamily", "build_data", "check_dataset_config"]


@dataclass(frozen=True)
class DatasetFamily:
    """How to check a domain name (cheap, before loading) and load a domain's train/test splits."""

    check_domain: Callable[[str], None]
    load_domain: Callable[[str, DatasetConfig], tuple[ArrayDataset, ArrayDataset]]


def _digits_check(name: str) -> None:
    from tllab.data.digits import parse_domain

    parse_domain(name)


def _digits_load(name: str, cfg: DatasetConfig) -> tuple[ArrayDataset, ArrayDataset]:
    from tllab.data.digits import load_domain

    d = load_domain(name, seed=cfg.data_seed, cache_dir=cfg.root)
    zeros = np.zeros
    return (ArrayDataset(d.train_x, d.train_y, zeros(len(d.train_y), np.int64), cfg.image_size, cfg.mean, cfg.std),
            ArrayDataset(d.test_x, d.test_y, zeros(len(d.test_y), np.int64), cfg.image_size, cfg.mean, cfg.std))


# Dataset families by ``dataset.name``; file-based benchmarks register here.
DATASETS: dict[str, DatasetFamily] = {"digits": DatasetFamily(_digits_check, _digits_load)}


@dataclass
class DataModule:
    """The datasets of one run (see the module docstring)."""

    train: ArrayDataset
    eval_splits: dict[str, ArrayDataset]
    selection_split: str | None  # split that picks the ``best`` checkpoint; None: the last one
    unlabeled: ArrayDataset | None = None
    train_domains: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # class names by label (saved with checkpoints)


def check_dataset_config(cfg: DatasetConfig) -> DatasetFamily:
    """Validate the dataset config without loading data; return its family."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.name!r}; available: {sorted(DATASETS)}.")
    family = DATASETS[cfg.name]
    setting = cfg.setting  # a str-valued enum: compares equal to "da", "dg", "finetune"
    if not cfg.target:
        raise ConfigError("dataset.target is empty; name the target domain(s), e.g. dataset.target=[mnistm].")
    if setting in ("da", "dg") and not cfg.source:
        raise ConfigError(f"dataset.source is empty; setting={setting} trains on labelled source domains.")
    if setting == "dg" and set(cfg.source) & set(cfg.target):
        raise ConfigError(f"dataset.setting=dg holds the target out, but {sorted(set(cfg.source) & set(cfg.target))} "
                          "is both a source and a target.")
    if setting == "finetune":
        if len(cfg.target) != 1:
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
            family.check_domain(name)
        except ValueError as e:
            raise ConfigError(f"dataset {cfg.name}: {e}") from e
    return family


def _split_per_class(targets: np.ndarray, take: Callable[[int], int], rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per class, move ``take(n_class)`` random indices to the second part."""
    rest, taken = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = take(len(idx))
        taken.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(taken))


def _with_domain(ds: ArrayDataset, index: int) -> ArrayDataset:
    ds.domains = np.full(len(ds), index, dtype=np.int64)
    return ds


def _eval_entries(role: str, names: list[str], parts: list[ArrayDataset]) -> dict[str, ArrayDataset]:
    """The pooled split (accuracy over all its images) and, with several domains, one per domain;
    empty parts are left out."""
    named = [(n, p) for n, p in zip(names, parts) if len(p)]
    if not named:
        return {}
    out = {role: ArrayDataset.concat([p for _, p in named])}
    if len(parts) > 1:
        out.update({f"{role}/{n}": p for n, p in named})
    return out


def _check_labels(data: DataModule, num_classes: int) -> DataModule:
    top = max(int(ds.targets.max()) for ds in [data.train, *data.eval_splits.values()])
    if top >= num_classes:
        raise ConfigError(f"dataset.num_classes={num_classes} but the labels go up to {top}; "
                          f"set dataset.num_classes={top + 1}.")
    data.classes = data.classes or [str(c) for c in range(num_classes)]  # digits: the labels are the names
    return data


def build_data(cfg: DatasetConfig, seed: int) -> DataModule:
    """Load the domains named in ``cfg`` and lay them out for ``cfg.setting``.

    Validation parts are drawn per class with ``cfg.data_seed`` (the same for every run seed);
    the fine-tuning subset is drawn with ``seed`` (deterministic per run seed).
    """
    family = check_dataset_config(cfg)
    setting = cfg.setting
    cache: dict[str, tuple[ArrayDataset, ArrayDataset]] = {}

    def load(name: str) -> tuple[ArrayDataset, ArrayDataset]:
        if name not in cache:
            cache[name] = family.load_domain(name, cfg)
        return cache[name]

    def val_split(ds: ArrayDataset, name: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([cfg.data_seed, *name.encode()])
        return _split_per_class(ds.targets, lambda n: int(round(cfg.val_fraction * n)), rng)

    if setting == "finetune":
        (name,) = cfg.target
        train, test = load(name)
        pool, val = val_split(train, name)
        rng = np.random.default_rng([seed, 7919])
        if cfg.labels_per_class is not None:
            k = cfg.labels_per_class
            small = min(np.bincount(train.targets[pool]))
            if small < k:
                raise ConfigError(f"dataset.labels_per_class={k} but a class of {name} has only {small} images.")
            take = lambda n: k  # noqa: E731
        elif cfg.sample_rate is not None:
            take = lambda n: max(1, int(round(cfg.sample_rate / 100 * n)))  # noqa: E731
        else:
            take = lambda n: n  # noqa: E731
        _, chosen = _split_per_class(train.targets[pool], take, rng)
        evals = {**_eval_entries("target_val", [name], [train.subset(val)]),
                 **_eval_entries("target_test", [name], [test]),
                 **_eval_entries("source_test", list(cfg.source), [load(s)[1] for s in cfg.source])}
        return _check_labels(DataModule(train=train.subset(pool[chosen]), eval_splits=evals,
                                        selection_split="target_val" if "target_val" in evals else None,
                                        train_domains=[name]), cfg.num_classes)

    train_parts, val_parts = [], []
    for i, name in enumerate(cfg.source):
        train, _ = load(name)
        keep, val = val_split(train, name)
        train_parts.append(_with_domain(train.subset(keep), i))
        val_parts.append(_with_domain(train.subset(val), i))
    evals = {**_eval_entries("source_val", list(cfg.source), val_parts),
             **_eval_entries("source_test", list(cfg.source), [load(s)[1] for s in cfg.source]),
             **_eval_entries("target_test", list(cfg.target), [load(t)[1] for t in cfg.target])}
    unlabeled = None
    if setting == "da":
        unlabeled = ArrayDataset.concat([load(t)[0].unlabeled() for t in cfg.target])
    return _check_labels(DataModule(train=ArrayDataset.concat(train_parts), eval_splits=evals,
                                    selection_split="source_val" if "source_val" in evals else None,
                                    unlabeled=unlabeled, train_domains=list(cfg.source)), cfg.num_classes)

"""Where a file dataset lives and how its domains map to lists or folders (shared by the
``image_list`` and ``image_folder`` families).

- **Root**: ``dataset.root``, else ``$TLLAB_DATA_DIR/<dataset.name>`` (named datasets only, not the
  generic ``image_list`` / ``image_folder``). Relative list files, folders,
  image paths and a ``dataset.classes`` file are joined to it. Without a root (only for domains named
  by path), list files and folders are relative to the working directory and the image paths of a
  list to the list's folder.
- **Domains**: ``dataset.domains`` maps a key to one list/folder (train = test = all its images) or to
  ``{train, test, val, subsets}``: official splits, an official validation split (used instead of
  ``dataset.val_fraction``) and fine-tuning subsets by sample rate (``{15: train_15.txt, ...}``).
  ``dataset.aliases`` maps full names to keys (``amazon`` -> ``A``); a name with a ``/`` (or ending in
  ``.txt``) that is no key is itself a list file or folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tllab.data.transforms import ImageTransform
from tllab.errors import ConfigError, DataError
from tllab.schema import DatasetConfig, is_path

_SPLIT_KEYS = {"train", "test", "val", "subsets"}


@dataclass(frozen=True)
class DomainSpec:
    """One domain's files: lists (``image_list``) or folders (``image_folder``), relative to the root."""

    key: str
    train: str
    test: str
    val: str | None = None
    subsets: dict[float, str] = field(default_factory=dict)  # sample rate (%) -> fixed training subset

    def files(self) -> list[str]:
        """Every list or folder the domain names, each once."""
        return list(dict.fromkeys([self.train, self.test, *([self.val] if self.val else []),
                                   *self.subsets.values()]))


def domain_spec(name: str, cfg: DatasetConfig, bare_names: bool = False) -> DomainSpec:
    """The files of domain ``name`` (a key, a full name or a path; see the module docstring);
    with ``bare_names`` (image folders without ``dataset.domains``) any other name is a sub-folder of
    the root.

    Raises:
        ValueError: an unknown domain (the message lists the valid keys and full names).
        ConfigError: a malformed ``dataset.domains`` entry.
    """
    key = cfg.domain_key(name)
    if key in cfg.domains:
        entry = cfg.domains[key]
        if isinstance(entry, str):
            return DomainSpec(key, entry, entry)
        if isinstance(entry, Mapping) and "train" in entry and not set(entry) - _SPLIT_KEYS:
            subsets = {float(rate): str(path) for rate, path in (entry.get("subsets") or {}).items()}
            return DomainSpec(key, entry["train"], entry.get("test") or entry["train"], entry.get("val"), subsets)
        raise ConfigError(f"dataset.domains.{key} must be a path or a mapping with train (and test, val, subsets), "
                          f"got {entry!r}.")
    if is_path(name) or bare_names:
        return DomainSpec(key, name, name)
    if not cfg.domains:
        raise ValueError(f"unknown domain {name!r}: dataset.domains is empty; name a list file "
                         f"(dataset.source=[lists/a.txt]) or set dataset.domains")
    full = f" (or the full names {', '.join(cfg.aliases)})" if cfg.aliases else ""
    raise ValueError(f"unknown domain {name!r}; valid domains: {', '.join(cfg.domains)}{full}")


def data_root(cfg: DatasetConfig) -> Path | None:
    """``dataset.root``, else ``$TLLAB_DATA_DIR/<name>`` for a named dataset (not the generic
    ``image_list`` / ``image_folder``, whose data lives wherever the user says), else None."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    env = os.environ.get("TLLAB_DATA_DIR")
    return Path(env).expanduser() / cfg.name if env and cfg.name != cfg.family else None


def check_root(cfg: DatasetConfig, spec: DomainSpec | None = None) -> Path | None:
    """The root, which must exist when it is set, and be set for a domain of ``dataset.domains``; the
    error names the command that fetches the data."""
    root = data_root(cfg)
    if root is None and spec is not None and spec.key in cfg.domains:
        raise ConfigError(f"dataset {cfg.name}: dataset.root is not set (nor $TLLAB_DATA_DIR); set "
                          f"dataset.root=<folder holding {cfg.name}> or export TLLAB_DATA_DIR=<folder of datasets>.")
    if root is not None and not root.is_dir():
        fetch = (f"`tllab-data download {cfg.name} --root {root}` fetches it (on a machine with internet), or "
                 if cfg.download else "")
        raise DataError(f"dataset root {root} does not exist; {fetch}set dataset.root=<folder holding the data> "
                        "(or $TLLAB_DATA_DIR=<folder of datasets>).")
    return root


def resolve(path: str, root: Path | None) -> Path:
    """``path`` joined to the root (without a root: to the working directory; absolute paths as they are)."""
    return (root or Path.cwd()) / Path(path).expanduser()


def class_names_from_config(cfg: DatasetConfig, root: Path | None) -> list[str] | None:
    """``dataset.classes`` as a list: given inline, or read from a file (one name a line)."""
    if cfg.classes is None:
        return None
    if isinstance(cfg.classes, str):
        path = resolve(cfg.classes, root)
        if not path.is_file():
            raise DataError(f"dataset.classes file {path} does not exist; give a file with one class name a line, "
                            "or the names as a list.")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [str(c) for c in cfg.classes]


def transform_of(cfg: DatasetConfig) -> ImageTransform:
    return ImageTransform(str(getattr(cfg.transform, "value", cfg.transform)), cfg.image_size, cfg.resize_size,
                          cfg.crop_scale, cfg.color_jitter, cfg.mean, cfg.std)

"""``dataset=image_folder``: torchvision's ``ImageFolder`` layout, one folder per domain.

``<root>/<domain>/<class>/<image>``: every sub-folder of the root is a domain (or
``dataset.domains`` maps keys to folders, or to ``{train: <folder>, test: <folder>}`` for official
splits). A domain folder that holds exactly ``train`` and ``test`` (and ``val``) is split so:
``<root>/<domain>/{train,test,val}/<class>/<image>`` (``val``: an official validation split, used
instead of ``dataset.val_fraction``). The classes are the sorted class folders, the same
in every domain used; a domain whose class folders differ from the others is refused by name, unless
``dataset.classes`` fixes the class list (a domain may then lack some classes). Image extensions as
torchvision's ``IMG_EXTENSIONS``.

Example:
    ``tllab-train dataset=image_folder dataset.root=~/photos dataset.source=[studio] dataset.target=[phone]``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tllab.data.files import FileDataset, class_folders, scan_image_folder
from tllab.data.layout import check_root, class_names_from_config, data_root, domain_spec, resolve, transform_of
from tllab.errors import DataError
from tllab.schema import DatasetConfig


def folders(name: str, cfg: DatasetConfig) -> tuple[Path, Path, Path | None]:
    """The domain's train, test and validation folders: as ``dataset.domains`` says, else
    ``<domain>/{train,test[,val]}`` when the domain folder holds exactly these, else the domain folder
    itself (train = test, no validation folder)."""
    spec, root = domain_spec(name, cfg, bare_names=not cfg.domains), data_root(cfg)
    train, test = resolve(spec.train, root), resolve(spec.test, root)
    val = resolve(spec.val, root) if spec.val else None
    if train == test and train.is_dir() and set(class_folders(train)) in ({"train", "test"}, {"train", "val", "test"}):
        return train / "train", train / "test", train / "val" if (train / "val").is_dir() else None
    return train, test, val


def check_domain(name: str, cfg: DatasetConfig) -> None:
    root = check_root(cfg, domain_spec(name, cfg, bare_names=not cfg.domains))
    for folder in {f for f in folders(name, cfg) if f is not None}:
        if not folder.is_dir():
            domains = sorted(e.name for e in (root or Path.cwd()).iterdir() if e.is_dir())
            raise ValueError(f"domain {name!r}: there is no folder {folder}; domains under {root or Path.cwd()}: "
                             f"{domains}")


def class_names(cfg: DatasetConfig) -> list[str]:
    """``dataset.classes``, else the class folders, which must be the same in every domain used."""
    names = class_names_from_config(cfg, data_root(cfg))
    if names is not None:
        return names
    return common_classes([f for name in [*cfg.source, *cfg.target] for f in folders(name, cfg) if f is not None])


def common_classes(paths: list[Path]) -> list[str]:
    """The class folders of ``paths``, which must be the same in each (else DataError naming the folder
    that lacks some, and one that has them)."""
    found = {folder: set(class_folders(folder)) for folder in paths}
    union = set().union(*found.values())
    for folder, classes in found.items():
        if classes != union:
            missing = sorted(union - classes)
            other = next(f for f, c in found.items() if missing[0] in c)
            raise DataError(f"{folder} lacks the class folders {missing[:10]} that {other} has; give every domain "
                            "the same classes, or fix the class list with dataset.classes=[...] (a domain may then "
                            "lack some).")
    return sorted(union)


def _read(folder: Path, classes: list[str], cfg: DatasetConfig) -> FileDataset:
    extra = sorted(set(class_folders(folder)) - set(classes))
    if extra:
        raise DataError(f"{folder} has class folders {extra[:10]} that are not in dataset.classes; add them to it "
                        "or move the folders out.")
    index = scan_image_folder(folder, classes)
    if not len(index.targets):
        raise DataError(f"{folder} holds no images in its class folders (extensions: .jpg .png .bmp .webp ...).")
    return FileDataset(index, np.zeros(len(index.targets), np.int64), transform_of(cfg), cfg.skip_bad_images)


def load_domain(name: str, cfg: DatasetConfig):
    from tllab.data import Splits

    classes = class_names(cfg)
    train_folder, test_folder, val_folder = folders(name, cfg)
    train = _read(train_folder, classes, cfg)
    return Splits(train, train if test_folder == train_folder else _read(test_folder, classes, cfg),
                  _read(val_folder, classes, cfg) if val_folder else None)

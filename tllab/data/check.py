"""``tllab-data check``: is a file dataset on disk whole and readable?

Every list of every domain (train, test, val and fine-tuning subsets) is parsed without stopping at
the first bad line; labels are checked against the classes, line counts against the published
counts, and every listed image is opened and decoded, in parallel worker processes. Image folders
are scanned the same way. The result is one :class:`ListReport` per list or folder and one
:class:`Problem` per defect.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tllab.data.files import (
    ImageIndex,
    class_folders,
    decode_error_reason,
    label_problems,
    read_image,
    read_image_list,
    scan_image_folder,
)
from tllab.data.layout import class_names_from_config, data_root, domain_spec, resolve
from tllab.errors import DataError
from tllab.schema import DatasetConfig

__all__ = ["ListReport", "Problem", "check_dataset"]


@dataclass(frozen=True)
class Problem:
    """One defect: the file (and list line) it is in, and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ListReport:
    """What one list (or folder) holds: lines read, images that decode, and the defects."""

    source: str
    expected: int | None
    samples: int = 0
    readable: int = 0
    problems: list[Problem] = field(default_factory=list)


def _probe(path: str) -> str | None:
    try:
        read_image(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, RuntimeError) as e:
        return f"cannot be decoded ({decode_error_reason(e)})"
    return None


def _domain_names(cfg: DatasetConfig, domains: list[str] | None) -> list[str]:
    """The domains to check: ``domains``, else the configured ones, else (a plain image folder) every
    sub-folder of the root that holds folders."""
    if domains or cfg.domains:
        return list(domains or cfg.domains)
    root = data_root(cfg)
    if root is None or not root.is_dir():
        raise DataError(f"dataset root {root} does not exist; give --root <folder with one folder per domain>.")
    return [e.name for e in sorted(os.scandir(root), key=lambda e: e.name) if e.is_dir() and class_folders(Path(e))]


def _sources(cfg: DatasetConfig, domains: list[str] | None) -> list[tuple[str, Path]]:
    """Every ``(configured path, resolved path)`` to check: each domain's lists, or its folders."""
    from tllab.data import image_folder

    out: dict[Path, str] = {}
    for name in _domain_names(cfg, domains):
        try:
            if cfg.family == "image_folder":
                out.update({f: str(f) for f in image_folder.folders(name, cfg) if f is not None})
            else:
                out.update({resolve(p, data_root(cfg)): p for p in domain_spec(name, cfg).files()})
        except ValueError as e:
            raise DataError(str(e)) from None
    return [(shown, path) for path, shown in out.items()]


def _index(path: Path, cfg: DatasetConfig, classes: list[str], report: ListReport) -> ImageIndex | None:
    if cfg.family == "image_folder":
        if not path.is_dir():
            report.problems.append(Problem(str(path), "folder missing"))
            return None
        found = set(class_folders(path))
        if found - set(classes):
            report.problems.append(Problem(str(path), f"class folders not in the class list: "
                                                      f"{sorted(found - set(classes))[:10]}"))
        if cfg.classes is None and set(classes) - found:
            report.problems.append(Problem(str(path), f"lacks the class folders {sorted(set(classes) - found)[:10]} "
                                                      "that other domains have"))
        return scan_image_folder(path, classes)
    if not path.is_file():
        report.problems.append(Problem(str(path), "list file missing"))
        return None
    garbled: list[tuple[int, str]] = []
    index = read_image_list(path, data_root(cfg) or path.parent, garbled, cfg.label_offset)
    report.problems += [Problem(f"{path} line {line}", message) for line, message in garbled]
    report.problems += [Problem(f"{path} line {line}", message)
                        for line, message in label_problems(index, len(classes), cfg.label_offset)]
    return index


def _classes(cfg: DatasetConfig, sources: list[tuple[str, Path]]) -> list[str]:
    """``dataset.classes``; for folders without it, the union of their class folders."""
    from tllab.data import DATASETS

    names = class_names_from_config(cfg, data_root(cfg))
    if names is not None:
        return names
    if cfg.family == "image_folder":
        return sorted(set().union(*(class_folders(p) for _, p in sources if p.is_dir())))
    return DATASETS[cfg.family].class_names(cfg)


def check_dataset(cfg: DatasetConfig, workers: int | None = None, domains: list[str] | None = None
                  ) -> list[ListReport]:
    """Check every list or folder of ``cfg``, or of its ``domains`` (see the module docstring)."""
    sources = _sources(cfg, domains)
    classes = _classes(cfg, sources)
    reports, jobs = [], []
    for shown, path in sources:
        report = ListReport(shown, cfg.counts.get(shown))
        index = _index(path, cfg, classes, report)
        if index is not None:
            report.samples = len(index.targets)
            if report.expected is not None and report.expected != report.samples:
                report.problems.append(Problem(shown, f"{report.samples} images listed, the published list has "
                                                      f"{report.expected}"))
            paths = [os.path.join(index.root, index.paths[i]) for i in range(len(index.paths))]
            jobs.append((report, index, paths))
        reports.append(report)
    flat = [p for _, _, paths in jobs for p in paths]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        results = pool.map(_probe, flat, chunksize=64)
        for report, index, paths in jobs:
            for i, (path, error) in enumerate(zip(paths, results)):
                if error is None:
                    report.readable += 1
                else:
                    line = int(index.lines[i])
                    report.problems.append(Problem(f"{path} ({index.source} line {line})" if line else path, error))
    return reports


def format_report(reports: list[ListReport]) -> str:
    """A table (one row per list or folder) and then one line per problem."""
    rows = [("list / folder", "images", "readable", "published", "problems")]
    rows += [(r.source, str(r.samples), str(r.readable), "" if r.expected is None else str(r.expected),
              str(len(r.problems))) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    problems = [str(p) for r in reports for p in r.problems]
    return "\n".join(lines + ([""] + problems if problems else []))


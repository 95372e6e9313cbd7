"""Finished, failed and unfinished runs, read from their run dirs (never from a tracker)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tllab.io import read_jsonl
from tllab.keys import group_keys
from tllab.launch import RESUMABLE_KEYS, flatten
from tllab.schema import TrainConfig
from tllab.sweep import MANIFEST, load_jobs

# Keys that place a run in a table cell or that do not change results: never a variant of a method.
PLACEMENT_KEYS = ("seed", "experiment", "label", "dataset.source", "dataset.target", "dataset.labels_per_class",
                  "dataset.sample_rate", "dataset.root", *RESUMABLE_KEYS)


@dataclass
class Run:
    """One run dir: its state (``done``, ``failed`` or ``incomplete``), group keys (``method``,
    ``task``, ``dataset``, ``setting``, ``seed``...), flat resolved config and records."""

    dir: Path
    state: str
    keys: dict[str, Any]
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    provenance: list[dict[str, Any]] = field(default_factory=list)  # one entry per start/resume
    duplicate_of: Path | None = None  # set by the tables: a run of the same config and seed counted instead

    @property
    def commits(self) -> list[str]:
        """The git commits (``abc1234``, ``+dirty`` when the checkout had changes) that trained it."""
        return list(dict.fromkeys(f"{c['git_commit'][:7]}{'+dirty' if c.get('git_dirty') else ''}"
                                  for c in self.provenance if c.get("git_commit")))


def load_run(run_dir: Path) -> Run:
    """Read a run dir: ``config.yaml`` (Hydra's ``.hydra/config.yaml`` for a run that failed
    before writing it), ``results.jsonl``, ``done`` and ``error.txt``."""
    path = run_dir / "config.yaml"
    if not path.exists():
        path = run_dir / ".hydra" / "config.yaml"
    # a key the run's config lacks (written by an older tllab) takes its default, so such runs do
    # not split off from newer runs of the same method
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
    typed: TrainConfig = OmegaConf.to_object(merged)
    config = flatten(OmegaConf.to_container(merged, resolve=True, enum_to_str=True))
    records = read_jsonl(run_dir / "results.jsonl")  # a record cut short by a kill is left out, with a warning
    error_file = run_dir / "error.txt"
    if (run_dir / "done").exists():
        state, error = "done", ""
    elif error_file.exists():
        state, error = "failed", (error_file.read_text().splitlines() or [""])[0]
    else:
        state, error = "incomplete", ""
    return Run(run_dir, state, group_keys(typed), config, records, error, _provenance(run_dir))


def _provenance(run_dir: Path) -> list[dict[str, Any]]:
    """The commands that trained the run (``provenance.json``; empty for runs made before it existed)."""
    try:
        return json.loads((run_dir / "provenance.json").read_text())["commands"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []


def find_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Every run dir under ``paths`` (a run dir, a sweep dir or any folder of them), and one
    line per sweep job that never started (from the sweep manifests)."""
    dirs: set[Path] = set()
    pending: list[str] = []
    for path in paths:
        if not path.exists():
            raise SystemExit(f"tllab: error: {path} does not exist; pass run dirs or sweep dirs.")
        for config in [*path.rglob("config.yaml")]:
            run_dir = config.parent.parent if config.parent.name == ".hydra" else config.parent
            if (run_dir / "results.jsonl").exists() or (run_dir / "error.txt").exists() or \
                    (run_dir / "config.yaml").exists():
                dirs.add(run_dir)
        for manifest in path.rglob(MANIFEST):
            pending += [f"{job.dir}: {' '.join(job.overrides)}" for job in load_jobs(manifest.parent)
                        if job.state == "pending"]
    return [load_run(d) for d in sorted(dirs)], pending


def label_variants(runs: list[Run]) -> None:
    """Runs of one method that differ in other config keys (``optim.lr=1e-3,1e-2`` in one
    sweep) get those keys appended to their method name, so each setting is its own row."""
    by_method: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        by_method.setdefault((run.keys["dataset"], run.keys["setting"], run.keys["method"]), []).append(run)
    for group in by_method.values():
        keys = sorted({k for run in group for k in run.config})
        varying = [k for k in keys if not k.startswith(PLACEMENT_KEYS)
                   and len({json.dumps(run.config.get(k), sort_keys=True) for run in group}) > 1]
        for run in group:
            if varying:
                suffix = ", ".join(f"{k}={run.config.get(k)}" for k in varying)
                run.keys["method"] = f"{run.keys['method']} ({suffix})"

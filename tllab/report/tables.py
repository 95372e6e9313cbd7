"""Paper tables: methods as rows, tasks as columns plus ``Avg``, mean ± std over seeds.

One :class:`Table` per (dataset, setting, selection rule). A cell aggregates the seeds of one
method on one task; it also counts the runs that failed or did not finish, which are shown as
such and never as zeros. Numbers are percentages; std is the sample standard deviation over
seeds (``ddof=1``), sem = std / sqrt(n).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from statistics import mean, stdev

from scipy.stats import t as student_t

from tllab.report.references import Reference
from tllab.report.runs import Run
from tllab.report.selection import SelectionRule

SETTING_TITLES = {"da": "domain adaptation", "dg": "domain generalization", "finetune": "fine-tuning"}
BASELINES = ("source only", "erm", "scratch", "fine-tune")


@dataclass
class Cell:
    """The seeds of one method on one task: ``values`` (percent) by seed, plus unfinished runs."""

    values: dict[int, float] = field(default_factory=dict)
    failed: int = 0
    incomplete: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean(self.values.values())

    @property
    def std(self) -> float:
        return stdev(self.values.values()) if self.n > 1 else math.nan

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def ci95(self) -> tuple[float, float]:
        """95% confidence interval of the mean over seeds (Student t, n - 1 degrees of freedom);
        NaNs for one seed."""
        if self.n < 2:
            return math.nan, math.nan
        half = student_t.ppf(0.975, self.n - 1) * self.sem
        return self.mean - half, self.mean + half

    def minus(self, other: Cell) -> Cell:
        """Seed-wise differences ``self - other`` over the seeds both have (a paired comparison)."""
        return Cell({s: v - other.values[s] for s, v in self.values.items() if s in other.values})


@dataclass
class Table:
    """One paper table; ``cells[(method, task)]``, rows and columns in display order."""

    dataset: str
    setting: str
    rule: SelectionRule
    metric: str
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    refs: dict[tuple[str, str], Reference] = field(default_factory=dict)
    # (method, task) -> the recipe keys its runs do not share with the reference's recipe
    ref_differs: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    duplicates: list[Run] = field(default_factory=list)  # finished runs not counted: same cell and seed

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.setting}_{self.rule.name}"

    @property
    def title(self) -> str:
        return (f"{self.dataset}, {SETTING_TITLES.get(self.setting, self.setting)}: {self.metric} (%), "
                f"selection: {self.rule.title}")

    @property
    def methods(self) -> list[str]:
        names = {m for m, _ in self.cells}
        return sorted(names, key=lambda m: (m not in BASELINES, BASELINES.index(m) if m in BASELINES else 0,
                                            natural_key(m)))

    @property
    def tasks(self) -> list[str]:
        return sorted({t for _, t in self.cells}, key=natural_key)

    def average(self, method: str) -> Cell | None:
        """The ``Avg`` column: per seed, the mean over tasks (only seeds present on every task);
        ``None`` unless every task has a result."""
        cells = [self.cells.get((method, task)) for task in self.tasks]
        if any(c is None or c.n == 0 for c in cells):
            return None
        seeds = set.intersection(*(set(c.values) for c in cells))
        if not seeds:
            return Cell({-1: mean(c.mean for c in cells)})
        return Cell({s: mean(c.values[s] for c in cells) for s in sorted(seeds)})


def natural_key(text: str) -> tuple[list[object], str]:
    """Sort ``mnistm 5/class`` before ``mnistm 20/class`` (the text itself breaks ties: ``01``, ``1``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)], text


def build_tables(runs: list[Run], rules: list[SelectionRule], metric: str,
                 references: list[Reference]) -> list[Table]:
    """Aggregate runs into one table per (dataset, setting, rule) for every rule that applies to
    the setting's runs (``source_val`` needs runs that evaluate a source validation split)."""
    tables: list[Table] = []
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.keys["dataset"], run.keys["setting"]), []).append(run)
    for (dataset, setting), group in sorted(groups.items()):
        for rule in rules:
            if not any(rule.applies(run.records) for run in group):
                continue
            table = Table(dataset, setting, rule, metric, runs=group)
            counted: dict[tuple[str, str, int], Run] = {}
            for run in group:  # sorted by run dir: of two runs with one config and seed, the first counts
                key = (run.keys["method"], run.keys["task"], run.keys["seed"])
                cell = table.cells.setdefault(key[:2], Cell())
                chosen = rule.select(run.records) if run.state == "done" else None
                if run.state == "failed":
                    cell.failed += 1
                elif chosen is None or metric not in chosen:
                    cell.incomplete += 1
                elif key in counted:
                    run.duplicate_of = counted[key].dir
                    table.duplicates.append(run)
                else:
                    counted[key] = run
                    cell.values[key[2]] = 100 * chosen[metric]
            experiments = {run.keys.get("experiment") for run in group}
            for ref in references:
                if (ref.dataset == dataset and ref.setting == setting and ref.metric == metric
                        and (ref.experiment is None or ref.experiment in experiments)):
                    table.refs.update({(m, t): ref for m, t in ref.values})
            for (m, t), ref in table.refs.items():
                differs = {d for (rm, rt, _), run in counted.items() if (rm, rt) == (m, t)
                           for d in ref.differences(run.config)}
                if differs:
                    table.ref_differs[(m, t)] = sorted(differs)
            tables.append(table)
    return tables

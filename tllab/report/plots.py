"""PNG plots: per-table bar charts with error bars, and learning curves."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tllab.report.runs import Run  # noqa: E402
from tllab.report.tables import Table, natural_key  # noqa: E402


def bar_chart(table: Table, path: Path) -> None:
    """Grouped bars: one group per task (and ``Avg``), one bar per method, error bars = std over
    seeds. Cells without a finished run get no bar."""
    columns = [*table.tasks, "Avg"]
    methods = table.methods
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(columns) * max(1, len(methods)) ** 0.5), 3.6))
    for i, method in enumerate(methods):
        cells = [table.cells.get((method, t)) for t in table.tasks] + [table.average(method)]
        x = [j + (i - (len(methods) - 1) / 2) * width for j, c in enumerate(cells) if c is not None and c.n]
        means = [c.mean for c in cells if c is not None and c.n]
        errs = [0.0 if math.isnan(c.std) else c.std for c in cells if c is not None and c.n]
        ax.bar(x, means, width, yerr=errs, capsize=3, label=method)
        for j, c in enumerate(cells):  # a cell whose runs all failed is marked, never drawn as 0
            if c is not None and not c.n:
                ax.text(j + (i - (len(methods) - 1) / 2) * width, 0, "failed" if c.failed else "unfinished",
                        rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel(f"{table.metric} (%)")
    ax.set_title("\n".join(textwrap.wrap(table.title, 80)), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curves(runs: list[Run], metric: str, title: str, path: Path) -> None:
    """One panel per task: ``metric`` against step for each method, mean over seeds with a ±std
    band (steps where at least one seed was evaluated)."""
    tasks = sorted({r.keys["task"] for r in runs}, key=natural_key)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = sorted({r.keys["method"] for r in runs if r.keys["task"] == task}, key=natural_key)
        for method in methods:
            by_step: dict[int, list[float]] = {}
            for run in runs:
                if run.keys["task"] == task and run.keys["method"] == method:
                    for rec in run.records:
                        if metric in rec:
                            by_step.setdefault(rec["step"], []).append(100 * rec[metric])
            steps = sorted(by_step)
            if not steps:
                continue
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s]) for s in steps])
            ax.plot(steps, mean, marker="o", markersize=2, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        if not ax.lines:
            ax.text(0.5, 0.5, "no finished evaluations", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric} (%)")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

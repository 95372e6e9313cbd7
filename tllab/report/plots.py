"""PNG plots: per-table bar charts with error bars, and learning curves.

A method keeps one colour in every figure of a report: build one mapping with
:func:`method_colors` over the report's methods (in table row order) and pass it as ``colors``
to every figure. Without it, each figure colours its own methods in its own order.
Text is 8-9 pt, so a figure printed at its own size, or a small one shrunk to a paper column
(3.3 in), stays readable; legends sit outside the axes and files are saved with a tight bounding
box, so nothing is clipped or hidden behind a legend.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402
from matplotlib.typing import ColorType  # noqa: E402

from tllab.report.runs import Run  # noqa: E402
from tllab.report.tables import Table, natural_key  # noqa: E402

Color = tuple[float, float, float]
FONT = 8  # pt: labels, ticks, legends
TITLE_FONT = 9  # pt
CHAR_WIDTH = 0.065  # in: mean width of one character at FONT, to wrap labels before they collide
OTHERS = "0.85"  # the other methods behind each learning-curve panel
DPI = 150


def _palette() -> list[Color]:
    """tab20's ten dark colours (tab10), its light ones, then tab20b shade by shade: 38 colours
    where consecutive ones differ in hue. tab20's two greys are left out: a grey method reads as
    one of the :data:`OTHERS` behind each learning-curve panel."""
    tab20, tab20b = matplotlib.colormaps["tab20"].colors, matplotlib.colormaps["tab20b"].colors
    return ([c for c in (*tab20[0::2], *tab20[1::2]) if c not in (tab20[14], tab20[15])]
            + [tab20b[group + shade] for shade in range(4) for group in range(0, 20, 4)])


PALETTE = _palette()


def method_colors(methods: Sequence[str]) -> dict[str, Color]:
    """One colour per method, :data:`PALETTE` in the order given (duplicates ignored): 38
    distinct colours, none grey, then the palette repeats. Pass the report's methods in one fixed order
    (the table row order) and the same method gets the same colour in every figure."""
    unique = list(dict.fromkeys(methods))
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(unique)}


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, max(4, width), break_long_words=False)


def _checked(methods: Sequence[str], colors: Mapping[str, ColorType] | None) -> Mapping[str, ColorType]:
    """``colors``, or :func:`method_colors` of ``methods`` in their order; every method needs one."""
    colors = colors or method_colors(methods)
    if missing := set(methods) - colors.keys():
        raise ValueError(f"no colour for methods {sorted(missing)}")
    return colors


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def bar_figure(table: Table, *, colors: Mapping[str, ColorType] | None = None) -> Figure:
    """The figure of :func:`bar_chart` (the caller closes it).

    Grouped bars: one group per task and ``Avg``, one bar per method in table row order. The
    error bar is the std over seeds, drawn only for cells with two seeds or more (a single seed
    has no spread to show). A cell whose runs all failed or did not finish gets no bar but the
    word ``failed`` / ``unfinished``, never a zero. The legend is to the right of the axes.
    """
    methods = table.methods
    colors = _checked(methods, colors)
    columns = [*table.tasks, "Avg"]
    group_w = max(0.7, 0.1 * len(methods) + 0.2)  # in: bars stay wide enough for a rotated word
    fig = plt.figure(figsize=(len(columns) * group_w, 2.4))  # the axes; labels and legend go around it
    ax = fig.add_axes((0, 0, 1, 1))  # saving with a tight bounding box then keeps all of them
    width = 0.8 / len(methods)
    spread: list[tuple[float, float, float]] = []  # x, mean, std of the cells with an error bar
    for i, method in enumerate(methods):
        offset = (i - (len(methods) - 1) / 2) * width
        cells = [table.cells.get((method, t)) for t in table.tasks] + [table.average(method)]
        done = [(j + offset, c) for j, c in enumerate(cells) if c is not None and c.n]
        ax.bar([x for x, _ in done], [c.mean for _, c in done], width, color=colors[method], label=method)
        spread += [(x, c.mean, c.std) for x, c in done if c.n > 1]
        for j, c in enumerate(cells):
            if c is not None and not c.n:
                ax.text(j + offset, 0, " failed" if c.failed else " unfinished", rotation=90, ha="center",
                        va="bottom", fontsize=FONT - 1, color="0.3")
    handles: list[Artist | ErrorbarContainer] = [Patch(color=colors[m], label=_wrap(m, 28)) for m in methods]
    if spread:
        handles.append(ax.errorbar(*zip(*spread), fmt="none", ecolor="0.15", elinewidth=0.8, capsize=2,
                                   label="std over seeds\n(none for 1 seed)"))
    fit = int(0.9 * group_w / CHAR_WIDTH)
    labels = [_wrap(c, fit) for c in columns]
    rotate = any(len(line) > fit for label in labels for line in label.splitlines())
    ax.set_xticks(range(len(columns)), labels, rotation=30 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor")
    ax.tick_params(labelsize=FONT)
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylabel(f"{table.metric} (%)", fontsize=FONT)
    ax.grid(axis="y", linewidth=0.4, alpha=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(_wrap(table.title, int(fig.get_figwidth() / CHAR_WIDTH)), fontsize=TITLE_FONT)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=FONT,
              ncols=math.ceil(len(handles) / 16))
    return fig


def bar_chart(table: Table, path: Path, *, colors: Mapping[str, ColorType] | None = None) -> None:
    """Write :func:`bar_figure` of ``table`` to ``path`` (PNG)."""
    _save(bar_figure(table, colors=colors), path)


def _mean_curve(runs: list[Run], metric: str) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """Mean and sample std over seeds of ``metric`` (percent) at each evaluated step; the std is
    NaN (no band) where one seed was evaluated. ``None`` when no run evaluated ``metric``."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for rec in run.records:
            if metric in rec:
                by_step.setdefault(rec["step"], []).append(100 * rec[metric])
    if not by_step:
        return None
    steps = sorted(by_step)
    mean = np.array([np.mean(by_step[s]) for s in steps])
    std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else np.nan for s in steps])
    return steps, mean, std


def curves_figure(runs: list[Run], metric: str, title: str, *,
                  colors: Mapping[str, ColorType] | None = None) -> Figure:
    """The figure of :func:`learning_curves` (the caller closes it).

    Small multiples, readable with any number of methods: one block of panels per task, one
    panel per method (four per row), in the order of ``colors`` (default: natural order of the
    names). A panel draws its method's mean over seeds with a ±std band (where two seeds or more
    were evaluated) in the method's colour, over the means of the task's other methods in light
    grey, so each method reads on its own and against the rest; panels of a task share axes.
    """
    present = {r.keys["method"] for r in runs}
    colors = _checked(sorted(present, key=natural_key), colors)
    methods = [m for m in colors if m in present]
    tasks = sorted({r.keys["task"] for r in runs}, key=natural_key)
    curves = {(t, m): _mean_curve([r for r in runs if r.keys["task"] == t and r.keys["method"] == m], metric)
              for t in tasks for m in methods}
    ncols = min(len(methods), 4)
    nrows = math.ceil(len(methods) / ncols)
    fig = plt.figure(figsize=(1.75 * ncols + 0.5, (1.3 * nrows + 0.3) * len(tasks) + 0.4), layout="constrained")
    for sub, task in zip(np.atleast_1d(fig.subfigures(len(tasks), 1)), tasks):
        sub.suptitle(task, fontsize=TITLE_FONT, fontweight="bold")
        axes = sub.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for i, (ax, method) in enumerate(zip(axes, methods)):
            for other in methods:
                if other != method and curves[task, other]:
                    steps, mean, _ = curves[task, other]
                    ax.plot(steps, mean, color=OTHERS, linewidth=0.6, label="_other")
            if curves[task, method]:
                steps, mean, std = curves[task, method]
                ax.fill_between(steps, mean - std, mean + std, color=colors[method], alpha=0.25, linewidth=0)
                ax.plot(steps, mean, color=colors[method], linewidth=1.4, marker="o", markersize=2, label=method)
            else:
                ax.text(0.5, 0.5, "no evaluations", ha="center", va="center", transform=ax.transAxes,
                        fontsize=FONT - 1, color="0.3")
            ax.set_title(_wrap(method, 24), fontsize=FONT)
            ax.tick_params(labelsize=FONT - 1, labelbottom=i + ncols >= len(methods))
            ax.xaxis.set_major_locator(MaxNLocator(3))
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.yaxis.set_major_locator(MaxNLocator(4))
            ax.spines[["top", "right"]].set_visible(False)
        for ax in axes[len(methods):]:
            ax.set_axis_off()
    fig.suptitle(_wrap(title, int(fig.get_figwidth() / CHAR_WIDTH)), fontsize=TITLE_FONT)
    fig.supxlabel("step", fontsize=FONT)
    fig.supylabel(f"{metric} (%)", fontsize=FONT)
    return fig


def learning_curves(runs: list[Run], metric: str, title: str, path: Path, *,
                    colors: Mapping[str, ColorType] | None = None) -> None:
    """Write :func:`curves_figure` of ``runs`` to ``path`` (PNG)."""
    _save(curves_figure(runs, metric, title, colors=colors), path)

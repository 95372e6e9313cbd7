"""Report plots: one colour per method across figures, error bars only where seeds spread,
legends off the data, readable PNGs; on hand-built tables and runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from tllab.report.plots import PALETTE, bar_chart, bar_figure, curves_figure, learning_curves, method_colors
from tllab.report.runs import Run
from tllab.report.selection import SELECTION_RULES
from tllab.report.tables import Cell, Table

TASKS = ["mnist→mnistm 5/class", "mnist→mnistm 20/class", "mnist→usps 20/class"]


def make_table(methods: list[str], tasks: list[str] = TASKS) -> Table:
    """Three seeds per cell, except: the second method has one seed on the first task, the third
    method failed on the last task."""
    table = Table("digits", "da", SELECTION_RULES["last"], "target_test/acc")
    for i, method in enumerate(methods):
        for j, task in enumerate(tasks):
            seeds = [0] if (i, j) == (1, 0) else [0, 1, 2]
            table.cells[method, task] = Cell({s: 40 + 3 * i + 5 * j + s for s in seeds})
    if len(methods) > 2:
        table.cells[methods[2], tasks[-1]] = Cell(failed=2)
    return table


def make_runs(methods: list[str], tasks: list[str], seeds: int = 2) -> list[Run]:
    """Each method on each task, ``seeds`` seeds evaluated every 1000 steps."""
    return [Run(Path(f"{m}/{t}/{s}"), "done", {"method": m, "task": t, "seed": s}, {},
                [{"step": 1000 * k, "acc": 0.3 + 0.01 * i + 0.05 * k + 0.01 * s} for k in range(6)])
            for i, m in enumerate(methods) for t in tasks for s in range(seeds)]


METHODS = ["source only", *(f"method {i}" for i in range(1, 12))]


def bar_colors(fig: plt.Figure) -> dict[str, tuple]:
    ax = fig.axes[0]
    return {c.get_label(): c.patches[0].get_facecolor() for c in ax.containers if isinstance(c, BarContainer)}


def curve_colors(fig: plt.Figure) -> dict[str, tuple]:
    return {line.get_label(): to_rgba(line.get_color()) for ax in fig.axes for line in ax.lines
            if not line.get_label().startswith("_")}


def test_method_colors_distinct_for_20_methods_in_the_order_given():
    names = [f"m{i}" for i in range(20)]
    colors = method_colors(names)
    assert list(colors) == names and len(set(colors.values())) == 20
    assert method_colors(names) == colors  # deterministic
    assert method_colors(names[::-1])["m19"] == colors["m0"]  # the order given decides
    # no method is grey, the colour of the other methods behind each learning-curve panel
    assert len(PALETTE) == 38 and not [c for c in PALETTE if max(c) - min(c) < 0.05]


def test_a_method_has_one_colour_in_bars_and_curves():
    colors = method_colors(METHODS)
    bars = bar_figure(make_table(METHODS), colors=colors)
    curves = curves_figure(make_runs(METHODS, TASKS[:2]), "acc", "curves", colors=colors)
    try:
        assert bar_colors(bars) == curve_colors(curves) == {m: to_rgba(c) for m, c in colors.items()}
    finally:
        for fig in (bars, curves):
            plt.close(fig)
    with pytest.raises(ValueError, match="no colour for methods"):
        bar_figure(make_table(METHODS), colors=method_colors(METHODS[1:]))


def test_default_colours_follow_the_table_row_order():
    table = make_table(METHODS[:4])
    fig = bar_figure(table)
    try:
        assert bar_colors(fig) == {m: to_rgba(c) for m, c in method_colors(table.methods).items()}
    finally:
        plt.close(fig)


def test_error_bars_only_for_cells_with_two_seeds_or_more():
    table = make_table(["a", "b", "c"])
    fig = bar_figure(table)
    try:
        ax = fig.axes[0]
        (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        segments = errorbars.lines[2][0].get_segments()
        cells = [c for m in table.methods for c in [*(table.cells[m, t] for t in table.tasks), table.average(m)]
                 if c is not None]
        assert len(segments) == sum(c.n > 1 for c in cells) == len(cells) - 3  # b's first task, b and c's Avg
        assert "failed" in {t.get_text().strip() for t in ax.texts}
    finally:
        plt.close(fig)


@pytest.mark.parametrize("build", ["bars", "curves"])
def test_legend_and_labels_stay_off_the_data(build: str):
    methods = [f"method {i} (optim.lr=0.001)" for i in range(20)]
    fig = (bar_figure(make_table(methods)) if build == "bars"
           else curves_figure(make_runs(methods, TASKS[:1], seeds=1), "acc", "curves"))
    try:
        renderer = fig.canvas.get_renderer()
        fig.canvas.draw()
        data = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible() and ax.axison]
        legends = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend()]
        assert len(legends) == (build == "bars")  # curves: a titled panel per method, no legend
        assert not any(leg.overlaps(box) for leg in legends for box in data)
        if build == "curves":
            assert sorted(ax.get_title().replace("\n", " ") for ax in fig.axes if ax.axison) == sorted(methods)
    finally:
        plt.close(fig)


def test_pngs_are_written_and_readable(tmp_path: Path):
    bar_chart(make_table(METHODS), tmp_path / "bars.png")
    learning_curves(make_runs(METHODS, TASKS[:2]), "acc", "digits, da: learning curves", tmp_path / "curves.png")
    for name in ("bars.png", "curves.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.width > 0 and image.height > 0
    assert not plt.get_fignums()  # every figure closed

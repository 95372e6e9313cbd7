"""Tables as Markdown, CSV and LaTeX (paper layout), plus every cell's numbers as long CSV."""

from __future__ import annotations

import csv
import io
import math

from tllab.report.tables import Cell, Table

COLUMNS_LONG = ["table", "selection", "metric", "method", "task", "n", "failed", "incomplete", "mean", "std", "sem",
                "ci95_low", "ci95_high", "reference", "delta", "reference_source", "recipe_differs", "seeds",
                "paired_baseline", "paired_n", "paired_mean", "paired_ci95_low", "paired_ci95_high"]


def _reference(table: Table, method: str, task: str | None) -> tuple[float | None, list[str]]:
    """The reference of a cell and the recipe keys its runs do not follow (then no delta is
    shown); for ``Avg`` (task None) the mean over tasks if every task has one."""
    if task is not None:
        ref = table.refs.get((method, task))
        return (ref.values[(method, task)] if ref else None), table.ref_differs.get((method, task), [])
    refs = [_reference(table, method, t) for t in table.tasks]
    if not refs or any(r is None for r, _ in refs):
        return None, []
    return sum(r for r, _ in refs) / len(refs), sorted({d for _, differs in refs for d in differs})


def cell_text(cell: Cell | None, ref: float | None = None, differs: list[str] = (), pm: str = "±") -> str:
    """``47.9 ± 2.1``, with ``(2/3 runs, 1 failed)`` when some runs did not finish and
    ``[ref 34.9, Δ +13.0]`` when a reference exists — ``[ref 34.9; recipe differs: trainer.max_steps=20]``
    and no delta when the runs do not follow the reference's recipe; a cell without any finished
    run says ``failed``/``incomplete``/``—``, never a number."""
    if cell is None:
        return "—"
    if cell.n == 0:
        state = [f"{cell.failed} failed" if cell.failed else "", f"{cell.incomplete} incomplete" if cell.incomplete
                 else ""]
        return ", ".join(s for s in state if s) or "—"
    text = f"{cell.mean:.1f}" if math.isnan(cell.std) else f"{cell.mean:.1f} {pm} {cell.std:.1f}"
    unfinished = cell.failed + cell.incomplete
    if unfinished:
        detail = ", ".join(s for s in (f"{cell.failed} failed" if cell.failed else "",
                                       f"{cell.incomplete} incomplete" if cell.incomplete else "") if s)
        text += f" ({cell.n}/{cell.n + unfinished} runs, {detail})"
    if ref is not None and differs:
        text += f" [ref {ref:.1f}; recipe differs: {', '.join(differs)}]"
    elif ref is not None:
        text += f" [ref {ref:.1f}, Δ {cell.mean - ref:+.1f}]"
    return text


def best_cells(cells: list[Cell | None]) -> list[bool]:
    """Which cells of a column are bold: the best mean alone when its 95% interval does not
    overlap the runner-up's; otherwise every cell whose interval overlaps the best one's (tied).
    Only cells with two seeds or more compete (one seed has no interval)."""
    ranked = sorted((c for c in cells if c is not None and c.n > 1), key=lambda c: c.mean, reverse=True)
    if len(ranked) < 2:
        return [False] * len(cells)
    best, runner_up = ranked[0], ranked[1]
    low = best.ci95[0]
    if low > runner_up.ci95[1]:
        return [c is best for c in cells]
    return [c is not None and c.n > 1 and c.ci95[1] >= low for c in cells]


def _grid(table: Table, pm: str = "±") -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cell texts and which cells are bold (:func:`best_cells`)."""
    columns = [*table.tasks, None]
    cells = {m: [table.cells.get((m, t)) if t else table.average(m) for t in columns] for m in table.methods}
    bold_by_column = [best_cells([row[j] for row in cells.values()]) for j in range(len(columns))]
    rows, bold = [], []
    for i, (m, row) in enumerate(cells.items()):
        rows.append([m, *(cell_text(c, *_reference(table, m, t), pm=pm) for c, t in zip(row, columns))])
        bold.append([False, *(flags[i] for flags in bold_by_column)])
    return ["method", *table.tasks, "Avg"], rows, bold


def to_markdown(table: Table) -> str:
    """A Markdown table; bold cells as :func:`best_cells` says."""
    header, rows, bold = _grid(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, flags in zip(rows, bold):
        lines.append("| " + " | ".join(f"**{v}**" if b else v for v, b in zip(row, flags)) + " |")
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    """The paper layout as CSV (cell texts as in Markdown)."""
    header, rows, _ = _grid(table)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("→", r"$\to$"), ("Δ", r"$\Delta$"), ("—", "--")):
        text = text.replace(a, b)
    return text


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` with a caption line; bold cells as :func:`best_cells` says."""
    header, rows, bold = _grid(table, pm="\x00")
    lines = [f"% {table.title}", r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    for row, flags in zip(rows, bold):
        cells = [_tex(v).replace("\x00", r"$\pm$") for v in row]
        lines.append(" & ".join(rf"\textbf{{{c}}}" if b else c for c, b in zip(cells, flags)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def paired_markdown(table: Table, baseline: str) -> str:
    """``method - baseline`` per task and ``Avg``: mean [95% CI] (n seeds) over the seeds both have."""
    columns = [*table.tasks, None]
    lines = ["| method | " + " | ".join([*table.tasks, "Avg"]) + " |", "|" + "---|" * (len(columns) + 1)]
    for method in table.methods:
        if method == baseline:
            continue
        texts = []
        for task in columns:
            diff = paired(table, method, task, baseline)
            if diff is None or not diff.n:
                texts.append("—")
            elif diff.n < 2:
                texts.append(f"{diff.mean:+.1f} (n=1)")
            else:
                low, high = diff.ci95
                texts.append(f"{diff.mean:+.1f} [{low:+.1f}, {high:+.1f}] (n={diff.n})")
        lines.append(f"| {method} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def long_rows(table: Table, baseline: str | None = None) -> list[list[object]]:
    """One row per cell (``Avg`` included) with every number, for further analysis; with a
    ``baseline`` row, each cell's paired difference to it over the seeds both have."""
    rows = []
    for method in table.methods:
        for task in [*table.tasks, None]:
            cell = table.cells.get((method, task)) if task else table.average(method)
            if cell is None:
                continue
            ref, differs = _reference(table, method, task)
            source = table.refs[(method, task)].source if task and (method, task) in table.refs else ""
            stats = [_round(x) for x in (cell.mean, cell.std, cell.sem, *cell.ci95)] if cell.n else [""] * 5
            delta = round(cell.mean - ref, 4) if ref is not None and cell.n and not differs else ""
            rows.append([table.name, table.rule.name, table.metric, method, task or "Avg", cell.n, cell.failed,
                         cell.incomplete, *stats, "" if ref is None else ref, delta, source, " ".join(differs),
                         " ".join(map(str, sorted(cell.values))), *_paired(table, method, task, baseline)])
    return rows


def paired(table: Table, method: str, task: str | None, baseline: str) -> Cell | None:
    """``method - baseline`` seed by seed on one task (``None``: ``Avg``), or None without a baseline cell."""
    base = table.cells.get((baseline, task)) if task else table.average(baseline)
    cell = table.cells.get((method, task)) if task else table.average(method)
    return None if base is None or cell is None or method == baseline else cell.minus(base)


def _paired(table: Table, method: str, task: str | None, baseline: str | None) -> list[object]:
    diff = paired(table, method, task, baseline) if baseline else None
    if diff is None or not diff.n:
        return [baseline or "", "", "", "", ""]
    return [baseline, diff.n, _round(diff.mean), *(_round(x) for x in diff.ci95)]


def _round(x: float) -> float | str:
    return "" if math.isnan(x) else round(x, 4)

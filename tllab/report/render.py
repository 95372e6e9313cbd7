"""Tables as Markdown, CSV and LaTeX (paper layout), plus every cell's numbers as long CSV."""

from __future__ import annotations

import csv
import io
import math

from tllab.report.tables import Cell, Table

COLUMNS_LONG = ["table", "selection", "metric", "method", "task", "n", "failed", "incomplete", "mean", "std", "sem",
                "reference", "delta", "reference_source", "seeds"]


def _reference(table: Table, method: str, task: str | None) -> float | None:
    """The reference of a cell; for ``Avg`` (task None) the mean over tasks if every task has one."""
    if task is not None:
        ref = table.refs.get((method, task))
        return ref.values[(method, task)] if ref else None
    refs = [_reference(table, method, t) for t in table.tasks]
    return sum(refs) / len(refs) if refs and all(r is not None for r in refs) else None


def cell_text(cell: Cell | None, ref: float | None = None, pm: str = "±") -> str:
    """``47.9 ± 2.1``, with ``(2/3 runs, 1 failed)`` when some runs did not finish and
    ``[ref 34.9, Δ +13.0]`` when a reference exists; a cell without any finished run says
    ``failed``/``incomplete``/``—``, never a number."""
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
    if ref is not None:
        text += f" [ref {ref:.1f}, Δ {cell.mean - ref:+.1f}]"
    return text


def _grid(table: Table, pm: str = "±") -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cell texts and which cells hold the best mean of their column."""
    columns = [*table.tasks, None]
    cells = {m: [table.cells.get((m, t)) if t else table.average(m) for t in columns] for m in table.methods}
    best = []
    for j in range(len(columns)):
        means = [c[j].mean for c in cells.values() if c[j] is not None and c[j].n]
        best.append(max(means) if len(means) > 1 else None)
    rows, bold = [], []
    for m, row in cells.items():
        rows.append([m, *(cell_text(c, _reference(table, m, t), pm) for c, t in zip(row, columns))])
        bold.append([False, *(c is not None and c.n > 0 and c.mean == b for c, b in zip(row, best))])
    return ["method", *table.tasks, "Avg"], rows, bold


def to_markdown(table: Table) -> str:
    """A Markdown table; the best mean of each column in bold."""
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
    """A booktabs ``tabular`` with a caption line; the best mean of each column in bold."""
    header, rows, bold = _grid(table, pm="\x00")
    lines = [f"% {table.title}", r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    for row, flags in zip(rows, bold):
        cells = [_tex(v).replace("\x00", r"$\pm$") for v in row]
        lines.append(" & ".join(rf"\textbf{{{c}}}" if b else c for c, b in zip(cells, flags)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def long_rows(table: Table) -> list[list[object]]:
    """One row per cell (``Avg`` included) with every number, for further analysis."""
    rows = []
    for method in table.methods:
        for task in [*table.tasks, None]:
            cell = table.cells.get((method, task)) if task else table.average(method)
            if cell is None:
                continue
            ref = _reference(table, method, task)
            source = table.refs[(method, task)].source if task and (method, task) in table.refs else ""
            stats = [round(x, 4) if not math.isnan(x) else "" for x in (cell.mean, cell.std, cell.sem)] \
                if cell.n else ["", "", ""]
            delta = round(cell.mean - ref, 4) if ref is not None and cell.n else ""
            rows.append([table.name, table.rule.name, table.metric, method, task or "Avg", cell.n, cell.failed,
                         cell.incomplete, *stats, "" if ref is None else ref, delta, source,
                         " ".join(map(str, sorted(cell.values)))])
    return rows

"""``tllab-report DIR...``: paper tables and plots from run dirs.

Reads ``config.yaml``, ``results.jsonl``, ``done`` and ``error.txt`` of every run under the
given dirs (never a tracker), applies named model-selection rules
(:mod:`tllab.report.selection`), groups runs by method (rows) and task (columns) per dataset and
setting, aggregates over seeds, and writes into ``--out`` (default ``<first DIR>/report``):

- ``report.md``: every table (mean ± std, best in bold, reference and delta beside each cell
  that has one), the plots, and the runs that failed or never finished;
- ``<dataset>_<setting>_<rule>.csv`` / ``.tex``: each table in the paper's layout;
- ``cells.csv``: every cell's n, mean, std, sem, reference and delta; ``runs.csv``: every run;
- ``<table>_bars.png`` and ``<dataset>_<setting>_curves.png``.

Example::

    tllab-report outputs/sweeps/digits_da --selection last,oracle --out docs/results/digits_da
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tllab.report.plots import bar_chart, learning_curves
from tllab.report.references import load_references
from tllab.report.render import COLUMNS_LONG, long_rows, to_csv, to_latex, to_markdown
from tllab.report.runs import Run, find_runs, label_variants
from tllab.report.selection import SELECTION_RULES
from tllab.report.tables import Table, build_tables

__all__ = ["main", "write_report"]


def _write_csv(path: Path, rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _unfinished(runs: list[Run], pending: list[str]) -> list[str]:
    lines = [f"- {run.state}: `{run.dir}` ({run.keys['method']}, {run.keys['task']}, seed {run.keys['seed']})"
             + (f": {run.error}" if run.error else "") for run in runs if run.state != "done"]
    return lines + [f"- never started: `{p}`" for p in pending]


def write_report(runs: list[Run], tables: list[Table], out: Path, pending: list[str] = (),
                 plots: bool = True, note: str = "") -> str:
    """Write every output file into ``out`` and return the Markdown report."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Results", ""]
    if note:
        md += [note, ""]
    curves_done: set[tuple[str, str]] = set()
    for table in tables:
        md += [f"## {table.title}", "", to_markdown(table), ""]
        seeds = sorted({c.n for c in table.cells.values() if c.n})
        md.append(f"Mean ± std over seeds (n = {'/'.join(map(str, seeds)) or '0'} per cell); best mean in bold.")
        for caption in sorted({ref.caption() for ref in table.refs.values()}):
            md.append(caption)
        md.append("")
        (out / f"{table.name}.csv").write_text(to_csv(table))
        (out / f"{table.name}.tex").write_text(to_latex(table))
        if plots:
            bar_chart(table, out / f"{table.name}_bars.png")
            md += [f"![{table.name}]({table.name}_bars.png)", ""]
            key = (table.dataset, table.setting)
            if key not in curves_done:
                curves_done.add(key)
                group = [r for r in runs if (r.keys["dataset"], r.keys["setting"]) == key]
                learning_curves(group, table.metric, f"{table.dataset}, {table.setting}: learning curves",
                                out / f"{key[0]}_{key[1]}_curves.png")
                md += [f"![learning curves]({key[0]}_{key[1]}_curves.png)", ""]
    unfinished = _unfinished(runs, list(pending))
    if unfinished:
        md += ["## Runs that did not finish", "", *unfinished, ""]
    _write_csv(out / "cells.csv", [COLUMNS_LONG, *(row for t in tables for row in long_rows(t))])
    _write_csv(out / "runs.csv", [["run_dir", "state", "dataset", "setting", "method", "task", "seed", "error"]] + [
        [str(r.dir), r.state, r.keys["dataset"], r.keys["setting"], r.keys["method"], r.keys["task"], r.keys["seed"],
         r.error] for r in runs])
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``tllab-report``."""
    parser = argparse.ArgumentParser(prog="tllab-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run dirs, sweep dirs or folders of them")
    parser.add_argument("--out", type=Path, help="output folder (default: <first DIR>/report)")
    parser.add_argument("--selection", default="last,source_val,target_val,oracle",
                        help=f"model-selection rules, comma-separated, of: {', '.join(SELECTION_RULES)}; "
                             "each makes its own tables where it applies")
    parser.add_argument("--metric", default="target_test/acc", help="the reported record key")
    parser.add_argument("--references", type=Path, nargs="*", help="reference YAML files (default: built-in)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--note", default="", help="a line under the report's title (e.g. how to regenerate it)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.selection.split(",") if n not in SELECTION_RULES]
    if unknown:
        parser.error(f"unknown selection rule(s) {unknown}; choose from {', '.join(SELECTION_RULES)}")
    runs, pending = find_runs(args.dirs)
    if not runs:
        raise SystemExit(f"tllab: error: no run dirs under {' '.join(map(str, args.dirs))} "
                         "(a run dir holds config.yaml and results.jsonl).")
    label_variants(runs)
    rules = [SELECTION_RULES[n] for n in args.selection.split(",")]
    tables = build_tables(runs, rules, args.metric, load_references(args.references))
    out = args.out or args.dirs[0] / "report"
    write_report(runs, tables, out, pending, plots=not args.no_plots, note=args.note)
    done = sum(r.state == "done" for r in runs)
    print(f"{len(runs)} runs ({done} done, {len(runs) - done} not), {len(pending)} never started; "
          f"{len(tables)} tables -> {out / 'report.md'}")

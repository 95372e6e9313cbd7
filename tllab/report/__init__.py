"""``tllab-report DIR...``: paper tables and plots from run dirs.

Reads ``config.yaml``, ``results.jsonl``, ``done`` and ``error.txt`` of every run under the
given dirs (never a tracker), applies named model-selection rules
(:mod:`tllab.report.selection`), groups runs by method (rows) and task (columns) per dataset and
setting, aggregates over seeds, and writes into ``--out`` (default ``<first DIR>/report``):

- ``report.md``: every table (mean ± std; bold only where the best is outside the others' 95%
  confidence intervals; reference and delta beside each cell whose runs follow the reference's
  recipe), how its runs were made (preset and shared overrides, commits, hardware), duplicate
  runs, paired differences to ``--baseline``, the plots, and the runs that failed or never finished;
- ``<dataset>_<setting>_<rule>.csv`` / ``.tex``: each table in the paper's layout;
- ``cells.csv``: every cell's n, mean, std, sem, 95% interval, reference, delta, paired difference;
  ``runs.csv``: every run with its duplicate status and provenance;
- ``<table>_bars.png`` and ``<dataset>_<setting>_curves.png``.

Example::

    tllab-report outputs/sweeps/digits_da --selection last,oracle --out docs/results/digits_da
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tllab.io import closed_pipe_exits_quietly
from tllab.launch import RESUMABLE_KEYS
from tllab.report.plots import bar_chart, learning_curves, method_colors
from tllab.report.references import load_references
from tllab.report.render import COLUMNS_LONG, long_rows, paired_markdown, to_csv, to_latex, to_markdown
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


def provenance_lines(table: Table) -> list[str]:
    """How the table's runs were made: presets and the command-line overrides every run shares (the
    recipe beyond the preset), tllab versions and commits, hardware; and the duplicates left out."""
    runs = table.runs
    made = [r for r in runs if r.provenance]
    overrides = [set(r.provenance[0]["overrides"]) for r in made]
    shared = sorted(o for o in set.intersection(*overrides) if not o.lstrip("+~").startswith(
        ("hydra.", "hydra/", "experiment=", *RESUMABLE_KEYS))) if overrides else []
    presets = sorted({str(r.keys.get("experiment")) for r in runs})
    recipe = f"preset {', '.join(presets)}" + (" + " + " ".join(f"`{o}`" for o in shared) if shared
                                               else " (no other override shared by every run)")
    commits = sorted({c for r in made for c in r.commits}) or ["not recorded"]
    versions = sorted({c["tllab"] for r in made for c in r.provenance})
    hardware = sorted({c["hardware"] for r in made for c in r.provenance})
    if not made:
        return [f"Recipe: {recipe}. Provenance not recorded ({len(runs)} runs made before tllab recorded it).",
                *_duplicate_lines(table)]
    lines = [f"Recipe: {recipe}. Made with tllab {', '.join(versions) or '?'} at commit {', '.join(commits)} "
             f"on {'; '.join(hardware) or 'unrecorded hardware'} ({len(runs)} runs"
             + (f", {len(runs) - len(made)} made before tllab recorded provenance" if len(made) < len(runs) else "")
             + ")."]
    return lines + _duplicate_lines(table)


def _duplicate_lines(table: Table) -> list[str]:
    return [f"Duplicate: `{run.dir}` repeats `{run.duplicate_of}` (same config and seed); only the first run dir by "
            "path is counted." for run in table.duplicates]


def write_report(runs: list[Run], tables: list[Table], out: Path, pending: list[str] = (),
                 plots: bool = True, note: str = "", baseline: str | None = None) -> str:
    """Write every output file into ``out`` and return the Markdown report."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Results", ""]
    if note:
        md += [note, ""]
    curves_done: set[tuple[str, str]] = set()
    colors = method_colors(list(dict.fromkeys(m for t in tables for m in t.methods)))  # one per method, every figure
    for table in tables:
        md += [f"## {table.title}", "", to_markdown(table), ""]
        seeds = sorted({c.n for c in table.cells.values() if c.n})
        md.append(f"Mean ± std over seeds (n = {'/'.join(map(str, seeds)) or '0'} per cell). Bold: the best mean "
                  "when its 95% confidence interval (Student t over seeds) does not overlap the runner-up's, "
                  "otherwise every cell whose interval overlaps the best one's (tied); cells of one seed are "
                  "never bold. A reference shows no delta where the runs do not follow its recipe.")
        for caption in sorted({ref.caption() for ref in table.refs.values()}):
            md.append(caption)
        md += provenance_lines(table)
        md.append("")
        if baseline and baseline in table.methods:
            md += [f"Paired difference to {baseline}: mean [95% CI] (n) over the seeds both have.", "",
                   paired_markdown(table, baseline), ""]
        (out / f"{table.name}.csv").write_text(to_csv(table))
        (out / f"{table.name}.tex").write_text(to_latex(table))
        if plots:
            bar_chart(table, out / f"{table.name}_bars.png", colors=colors)
            md += [f"![{table.name}]({table.name}_bars.png)", ""]
            key = (table.dataset, table.setting)
            if key not in curves_done:
                curves_done.add(key)
                group = [r for r in runs if (r.keys["dataset"], r.keys["setting"]) == key]
                learning_curves(group, table.metric, f"{table.dataset}, {table.setting}: learning curves",
                                out / f"{key[0]}_{key[1]}_curves.png", colors=colors)
                md += [f"![learning curves]({key[0]}_{key[1]}_curves.png)", ""]
    unfinished = _unfinished(runs, list(pending))
    if unfinished:
        md += ["## Runs that did not finish", "", *unfinished, ""]
    _write_csv(out / "cells.csv", [COLUMNS_LONG, *(row for t in tables for row in long_rows(t, baseline))])
    _write_csv(out / "runs.csv", [RUN_COLUMNS, *(_run_row(r) for r in runs)])
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    return text


RUN_COLUMNS = ["run_dir", "state", "dataset", "setting", "method", "task", "seed", "error", "duplicate_of", "tllab",
               "git_commits", "hardware", "overrides"]


def _run_row(run: Run) -> list[object]:
    first = run.provenance[0] if run.provenance else {}
    return [str(run.dir), run.state, run.keys["dataset"], run.keys["setting"], run.keys["method"], run.keys["task"],
            run.keys["seed"], run.error, run.duplicate_of or "", first.get("tllab", ""), " ".join(run.commits),
            first.get("hardware", ""), " ".join(first.get("overrides", []))]


@closed_pipe_exits_quietly
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
    parser.add_argument("--baseline", help="a row name (e.g. 'source only'): add each method's paired difference to "
                                           "it over matching seeds, with a 95%% confidence interval")
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
    rows = list(dict.fromkeys(m for t in tables for m in t.methods))
    if args.baseline is not None and args.baseline not in rows:  # a typo would drop the paired tables silently
        raise SystemExit(f"tllab: error: --baseline {args.baseline!r} names no row of these tables; "
                         f"choose one of: {', '.join(map(repr, rows))}.")
    out = args.out or args.dirs[0] / "report"
    write_report(runs, tables, out, pending, plots=not args.no_plots, note=args.note, baseline=args.baseline)
    done = sum(r.state == "done" for r in runs)
    print(f"{len(runs)} runs ({done} done, {len(runs) - done} not), {len(pending)} never started; "
          f"{len(tables)} tables -> {out / 'report.md'}")

"""Reference numbers (published or measured with a reference recipe), stored as data.

Each YAML file in ``tllab/report/references/`` holds a list of tables::

    - source: "where the numbers come from (paper, table, repository and commit)"
      dataset: digits
      setting: da
      metric: target_test/acc
      values:                      # method -> task -> percent
        source only: {mnist→mnistm: 34.9}

Optional keys: ``recipe`` (config keys and the values the numbers were measured with, e.g.
``{trainer.epochs: 3, trainer.max_steps: null}``: a cell whose runs differ in one of them shows the
reference marked "recipe differs" and no delta), ``experiment`` (the preset whose runs the numbers
belong to: the reference then applies only to tables of that preset's runs, so a MoCo table never
gets the supervised numbers),
``selection`` (how the source chose its checkpoint, printed under the table) and ``paper``
(method -> the original paper's average over tasks, printed under the table).

Method and task names are tllab's (:mod:`tllab.keys`), so a reference lands beside the cell of
the same method and task; the report prints the reference and our delta (ours - reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BUILTIN = Path(__file__).parent / "references"


@dataclass(frozen=True)
class Reference:
    """One reference table: ``values[(method, task)]`` in percent, with its source."""

    source: str
    dataset: str
    setting: str
    metric: str
    values: dict[tuple[str, str], float]
    experiment: str | None = None
    selection: str | None = None
    paper: dict[str, float] | None = None
    recipe: dict[str, Any] | None = None

    def differences(self, config: dict[str, Any]) -> list[str]:
        """``key=value`` for each recipe key a run's flat config does not follow."""
        return [f"{k}={config.get(k)}" for k, v in (self.recipe or {}).items() if config.get(k) != v]

    def caption(self) -> str:
        """The line printed under a table that uses this reference."""
        text = f"ref: {self.source}" + (f"; selection: {self.selection}" if self.selection else "")
        if self.paper:
            text += "; original papers' average: " + ", ".join(f"{m} {v:.1f}" for m, v in self.paper.items())
        return text + "."


def load_references(paths: list[Path] | None = None) -> list[Reference]:
    """The reference tables of ``paths`` (YAML files), by default every built-in file."""
    files = paths if paths is not None else sorted(BUILTIN.glob("*.yaml"))
    refs = []
    for path in files:
        try:
            for entry in yaml.safe_load(path.read_text()):
                values = {(m, t): float(v) for m, row in entry["values"].items() for t, v in row.items()}
                paper = {m: float(v) for m, v in entry["paper"].items()} if entry.get("paper") else None
                refs.append(Reference(entry["source"], entry["dataset"], entry["setting"],
                                      entry.get("metric", "target_test/acc"), values, entry.get("experiment"),
                                      entry.get("selection"), paper, entry.get("recipe")))
        except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise SystemExit(f"tllab: error: {path} is not a reference file ({type(e).__name__}: {e}); "
                             "see tllab/report/references.py for the format.") from e
    return refs

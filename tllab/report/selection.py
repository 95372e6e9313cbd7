"""Model-selection rules, applied at report time to a run's evaluation records.

A rule picks one record (one evaluated checkpoint) of a run; the report then reads the test
metric from it. Rules are named and registered, so a new protocol is one class and one
:func:`register` call, and every table says which rule made it:

- ``last``: the last checkpoint (no early stopping; tllib's tables).
- ``source_val``: the checkpoint with the best accuracy on the held-out source validation split
  (DomainBed's training-domain validation, the domain generalization protocol).
- ``target_val``: the best accuracy on the labelled target validation split (fine-tuning).
- ``oracle``: the best accuracy on the target *test* split: selection by test labels, an upper
  bound reported by tllib's scripts; labelled as such in every table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True)
class SelectionRule:
    """Picks the record of a run that a table reports.

    Args:
        name: the rule's name on the command line (``tllab-report --selection name``).
        title: how tables describe it.
        split: the split whose ``<split>/acc`` is maximised (the first maximum wins, i.e. the
            earliest step); ``None`` takes the last record.
    """

    name: str
    title: str
    split: str | None = None

    def applies(self, records: Sequence[Record]) -> bool:
        """Whether the run evaluated the split this rule selects on."""
        return self.split is None or any(f"{self.split}/acc" in r for r in records)

    def select(self, records: Sequence[Record]) -> Record | None:
        """The chosen record, or ``None`` when the run has no record the rule can use."""
        if self.split is None:
            return records[-1] if records else None
        key = f"{self.split}/acc"
        scored = [r for r in records if key in r]
        return max(scored, key=lambda r: r[key]) if scored else None


SELECTION_RULES: dict[str, SelectionRule] = {}


def register(rule: SelectionRule) -> SelectionRule:
    """Make ``rule`` available to ``tllab-report --selection``."""
    SELECTION_RULES[rule.name] = rule
    return rule


register(SelectionRule("last", "last checkpoint"))
register(SelectionRule("source_val", "best on source validation (training-domain validation)", "source_val"))
register(SelectionRule("target_val", "best on target validation", "target_val"))
register(SelectionRule("oracle", "best on target test (oracle: selects with test labels, an upper bound)",
                       "target_test"))

"""Run outputs: ``results.jsonl`` (one record per evaluation), ``summary.json``, the ``done``
marker, and the optional Weights & Biases run."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from tllab.io import atomic_write, read_jsonl, write_error
from tllab.schema import LoggerConfig, WandbMode


class ResultsFile:
    """Append-only JSON lines (``results.jsonl``, ``per_class.jsonl``); on resume, records after
    the checkpoint's step are dropped (they are recomputed), so every step appears once."""

    def __init__(self, run_dir: Path, name: str = "results.jsonl") -> None:
        self.path = run_dir / name

    def truncate_after(self, step: int) -> None:
        """Keep the records up to ``step`` (0: none, a run that never checkpointed), dropping a
        last record cut short by a kill (:func:`tllab.io.read_jsonl`)."""
        if not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r["step"] <= step]
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def append(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(self.path, e, "the records before this one and the last checkpoint are intact; "
                                            "a cut-short record is dropped when the run resumes") from e

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


class WandbRun:
    """One W&B run per job: config = resolved config plus the group keys it lacks (``method``,
    ``task``, ``setting``, ``source``, ``target``), so dashboards can group by any axis; group = ``logger.group`` (a
    sweep sets it to the sweep's name) else ``<dataset>/<task>``; tags for method, dataset, task,
    setting and backbone; best-value summaries (max accuracy, min loss). Offline unless
    ``logger.mode`` or ``WANDB_MODE`` says otherwise. A resumed run continues the same W&B run
    (its id is kept in ``wandb_id.txt``). ``finish()`` must be called (the trainer does, also on
    errors)."""

    def __init__(self, cfg: LoggerConfig, config: dict[str, Any], keys: dict[str, Any], run_dir: Path) -> None:
        import wandb

        id_file = run_dir / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(
            id=id_file.read_text().strip(), resume="allow",
            project=cfg.project, entity=cfg.entity, mode=os.environ.get("WANDB_MODE", WandbMode(cfg.mode).value),
            dir=str(run_dir), name=f"{keys['method']} | {keys['task']} | seed {keys['seed']}",
            config={**{k: v for k, v in keys.items() if k not in config}, **config},
            group=cfg.group or f"{keys['dataset']}/{keys['task']}", job_type=cfg.job_type,
            tags=[*cfg.tags, f"method:{keys['method']}", f"dataset:{keys['dataset']}", f"task:{keys['task']}",
                  f"setting:{keys['setting']}", f"backbone:{keys['backbone']}"],
            reinit="finish_previous",
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        for split in ("source_val", "target_val", "source_test", "target_test"):
            self.run.define_metric(f"{split}/acc", summary="max")
            self.run.define_metric(f"{split}/loss", summary="min")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)

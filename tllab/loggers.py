"""Run outputs: ``results.jsonl`` (one record per evaluation), ``summary.json``, the ``done``
marker, and the optional Weights & Biases run."""

from __future__ import annotations

import json
import logging
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tllab.io import atomic_write, read_jsonl, write_error
from tllab.schema import LoggerConfig, WandbMode

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

log = logging.getLogger("tllab")


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


SPLITS = ("source_val", "target_val", "source_test", "target_test")
# Seconds between flushes of a run's ``.wandb`` file. wandb's default (15 s) lets a hard kill (SIGKILL,
# a preempted or timed-out job) take every record still buffered: a short first attempt was left
# with an empty history, and the step it had checkpointed was never in W&B.
FLUSH_INTERVAL_S = 1.0
_BLOCK, _HEADER = 32768, 7  # the transaction log's block and chunk-header sizes (LevelDB log format)


def wandb_records(path: Path) -> Iterator[Record]:
    """The protobuf ``Record`` messages of a ``.wandb`` transaction log, which wandb (0.31) gives no
    Python reader for: a 7-byte file header, then 32 KiB blocks of chunks (CRC, length, type: 1 full,
    2 first, 3 middle, 4 last). A record cut short by a kill ends the log."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    message, i = b"", _HEADER
    while i + _HEADER <= len(data):
        if 0 < -i % _BLOCK < _HEADER:  # a block's tail too short for a chunk header is padding
            i += -i % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + _HEADER])
        chunk = data[i + _HEADER:i + _HEADER + length]
        i += _HEADER + length
        if kind not in (1, 2, 3, 4) or len(chunk) < length:
            return
        message = chunk if kind in (1, 2) else message + chunk
        if kind in (1, 4):
            yield Record.FromString(message)


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history rows (one per ``wandb.log`` call) of a ``.wandb`` transaction log."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in wandb_records(path) if record.HasField("history")]


def wandb_logged_steps(wandb_dir: Path, run_id: str) -> set[int]:
    """Training steps (``step``) that earlier attempts of W&B run ``run_id`` hold in their folders
    under ``wandb_dir`` (one ``offline-run-*`` or ``run-*`` folder per start)."""
    steps: set[int] = set()
    for path in wandb_dir.glob(f"*/run-{run_id}.wandb"):
        if path.parent.is_symlink():  # latest-run
            continue
        try:
            steps |= {int(row["step"]) for row in wandb_history(path) if "step" in row}
        except (OSError, ValueError) as e:  # protobuf's DecodeError is a ValueError
            log.warning("W&B: could not read %s (%s); its steps may be logged again", path, e)
    return steps


def wandb_summaries(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary values from a run's evaluation records (``results.jsonl``): ``final/<metric>`` (the last
    record), ``selected/<rule>/<metric>`` (the record each :mod:`tllab.report.selection` rule picks, as
    ``tllab-report`` picks it), each with its ``step``, and the best of each split over all records
    (max ``<split>/acc``, min ``<split>/loss``, as ``define_metric`` writes them)."""
    from tllab.report.selection import SELECTION_RULES  # not at import: tllab.report imports tllab.launch

    def values(record: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in record.items() if (k == "step" or "/" in k) and isinstance(v, (int, float))}

    summary: dict[str, Any] = {}
    if records:
        summary.update({f"final/{k}": v for k, v in values(records[-1]).items()})
    for name, rule in SELECTION_RULES.items():
        chosen = rule.select(records)
        if chosen is not None:
            summary.update({f"selected/{name}/{k}": v for k, v in values(chosen).items()})
    for split in SPLITS:
        for metric, best in (("acc", max), ("loss", min)):
            seen = [r[f"{split}/{metric}"] for r in records if f"{split}/{metric}" in r]
            if seen:
                summary[f"{split}/{metric}"] = {best.__name__: best(seen)}
    return summary


class WandbRun:
    """One W&B run per job: config = resolved config plus the group keys it lacks (``method``,
    ``task``, ``setting``, ``source``, ``target``), so dashboards can group by any axis; group = ``logger.group`` (a
    sweep sets it to the sweep's name) else ``<dataset>/<task>``; tags for method, dataset, task,
    setting and backbone. Offline unless ``logger.mode`` or ``WANDB_MODE`` says otherwise.

    Each evaluation is logged at its training step (``_step`` = ``step``). A resumed run continues the
    same W&B run (its id is kept in ``wandb_id.txt``); offline, wandb cannot append to an earlier
    attempt's folder, so each start writes its own ``wandb/offline-run-*`` folder and ``wandb sync``
    uploads them one after another into the one run. Across the folders every evaluation is logged
    once: a start first logs the records of ``results.jsonl`` that no earlier folder holds (lost to a
    hard kill before a flush) and skips steps an earlier folder already holds (logged, then killed
    before their checkpoint). On success, ``finish()`` writes the summaries of
    :func:`wandb_summaries` from ``results.jsonl``, so the last folder's summary covers the whole run.
    ``finish()`` must be called (the trainer does, also on errors)."""

    def __init__(self, cfg: LoggerConfig, config: dict[str, Any], keys: dict[str, Any], run_dir: Path) -> None:
        import wandb

        id_file = run_dir / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        run_id = id_file.read_text().strip()
        self.results = ResultsFile(run_dir)
        self.logged = wandb_logged_steps(run_dir / "wandb", run_id)
        flush = {"x_transaction_log_flush_interval": FLUSH_INTERVAL_S} \
            if "x_transaction_log_flush_interval" in wandb.Settings.model_fields else {}
        self.run = wandb.init(
            id=run_id, resume="allow",
            project=cfg.project, entity=cfg.entity, mode=os.environ.get("WANDB_MODE", WandbMode(cfg.mode).value),
            dir=str(run_dir), name=f"{keys['method']} | {keys['task']} | seed {keys['seed']}",
            config={**{k: v for k, v in keys.items() if k not in config}, **config},
            group=cfg.group or f"{keys['dataset']}/{keys['task']}", job_type=cfg.job_type,
            tags=[*cfg.tags, f"method:{keys['method']}", f"dataset:{keys['dataset']}", f"task:{keys['task']}",
                  f"setting:{keys['setting']}", f"backbone:{keys['backbone']}"],
            reinit="finish_previous", settings=wandb.Settings(**flush),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        for split in SPLITS:
            self.run.define_metric(f"{split}/acc", summary="max")
            self.run.define_metric(f"{split}/loss", summary="min")
        for record in self.results.records():  # the trainer has cut results.jsonl back to its checkpoint
            self.log({k: v for k, v in record.items() if k in ("step", "epoch", "lr") or "/" in k})

    def log(self, record: dict[str, Any]) -> None:
        """Log an evaluation record at its step, unless an earlier attempt of this run logged that step."""
        step = int(record["step"])
        if step in self.logged:
            return
        self.logged.add(step)
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step, commit=True)

    def finish(self, exit_code: int = 0) -> None:
        """Write the whole-run summaries (on success) and finish the run, its ``.wandb`` file complete:
        ``run.finish()`` returns before wandb's service has flushed the file, which the next start of
        the run reads, so the service is shut down (as at exit; the next ``wandb.init`` starts one)."""
        import wandb

        if exit_code == 0:
            self.run.summary.update(wandb_summaries(self.results.records()))
        self.run.finish(exit_code=exit_code)
        wandb.teardown()

"""W&B runs, offline: summaries (final, per selection rule, best) and resumed runs whose
``wandb/offline-run-*`` folders together hold every evaluation once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tllab.loggers import FLUSH_INTERVAL_S, WandbRun, wandb_history, wandb_records
from tllab.report.selection import SELECTION_RULES
from tllab.schema import LoggerConfig
from tllab.trainer import Trainer

ROOT = Path(__file__).parents[1]
KEYS = {"method": "source only", "task": "mnist→mnistm", "seed": 0, "dataset": "digits", "setting": "da",
        "backbone": "lenet"}


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def folders(run_dir: Path) -> list[Path]:
    """The run's ``.wandb`` files, one per start, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def summary(path: Path) -> dict[str, Any]:
    """The run summary a ``.wandb`` file leaves: its summary updates applied in order."""
    out: dict[str, Any] = {}
    for record in wandb_records(path):
        if record.HasField("summary"):
            out.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.summary.update})
    return out


def steps(path: Path) -> list[int]:
    return [row["step"] for row in wandb_history(path)]


def test_resumed_run_logs_every_step_once_and_summarises_the_whole_run(train_run, tmp_path, monkeypatch):
    """Killed after logging step 6 but before its checkpoint: the resumed start recomputes step 6
    and does not log it again. The last folder's summary (the run's, once synced) holds the final
    record, the record each selection rule picks, and the best values, all over the whole run."""
    original = Trainer._save

    def crash(self, metrics):
        if self.step == 6:
            raise KeyboardInterrupt
        original(self, metrics)

    monkeypatch.setattr(Trainer, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        train_run("logger=wandb", "trainer.max_steps=9")
    monkeypatch.setattr(Trainer, "_save", original)
    train_run("logger=wandb", "trainer.max_steps=9")

    run_dir, recs = tmp_path / "run", records(tmp_path / "run")
    first, second = folders(run_dir)
    assert steps(first) == [3, 6] and steps(second) == [9]
    logged = {row["step"]: row for path in (first, second) for row in wandb_history(path)}
    assert {s: row["target_test/acc"] for s, row in logged.items()} == {r["step"]: r["target_test/acc"] for r in recs}

    got = summary(second)
    metrics = [k for k in recs[-1] if "/" in k]
    assert {"source_val/acc", "target_test/acc", "train/loss"} <= set(metrics)
    keys = ["step", *metrics]
    assert {k: got[f"final/{k}"] for k in keys} == {k: recs[-1][k] for k in keys}
    assert all(isinstance(got[f"final/{k}"], float) for k in metrics)  # plain numbers, not {"max": ...}
    picked = {}
    for name, rule in SELECTION_RULES.items():
        chosen = rule.select(recs)
        if chosen is None:  # target_val: a DA run has no target validation split
            assert not any(k.startswith(f"selected/{name}/") for k in got)
            continue
        picked[name] = chosen["step"]
        assert {k: got[f"selected/{name}/{k}"] for k in keys} == {k: chosen[k] for k in keys}
    assert list(picked) == ["last", "source_val", "oracle"] and picked["last"] == 9
    assert got["target_test/acc"] == {"max": max(r["target_test/acc"] for r in recs)}
    assert got["source_val/loss"] == {"min": min(r["source_val/loss"] for r in recs)}


def test_a_start_logs_the_records_no_earlier_folder_holds(tmp_path):
    """A hard kill before wandb's first flush leaves the ``.wandb`` file its 7-byte header only: the
    next start first logs the (checkpointed) records of ``results.jsonl`` that no folder holds."""
    run_dir = tmp_path / "run"
    lost = run_dir / "wandb" / "offline-run-20250101_000000-abc" / "run-abc.wandb"
    lost.parent.mkdir(parents=True)
    lost.write_bytes(b":W&B\xe1\xbe\x00")  # ":W&B", magic 0xBEE1, version 0
    (run_dir / "wandb_id.txt").write_text("abc")
    recs = [{"step": s, "epoch": s / 10, "time": 1.0, "lr": 0.1, "target_test/acc": s / 100, **KEYS} for s in (3, 6)]
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    WandbRun(LoggerConfig(wandb=True), {}, KEYS, run_dir).finish()
    first, second = folders(run_dir)
    assert first == lost and wandb_history(first) == []
    assert [{k: row[k] for k in ("step", "_step", "epoch", "lr", "target_test/acc")} for row in wandb_history(second)] \
        == [{"_step": r["step"], **{k: r[k] for k in ("step", "epoch", "lr", "target_test/acc")}} for r in recs]
    assert "seed" not in wandb_history(second)[0]  # the run's keys are config, not history


CHILD = """
import sys, time
from pathlib import Path
from tests.conftest import FAST, compose_config
from tllab.train import run
from tllab.trainer import Trainer

original = Trainer.train_step

def hang(self):
    if self.step == 4:  # step 3 is evaluated, logged and checkpointed
        (Path(sys.argv[1]) / "hanging").touch()
        time.sleep(120)
    return original(self)

Trainer.train_step = hang
run(compose_config([*FAST, "logger=wandb"]), Path(sys.argv[1]))
"""


def test_hard_kill_leaves_the_first_folder_its_history(train_run, tmp_path):
    """SIGKILL to the job's process group (wandb's service included), as a preempted job gets, a few
    seconds after step 3 was logged: wandb's default flush interval (15 s) left the first folder no
    history; now the step is in it, and the resumed start logs only step 6."""
    run_dir = tmp_path / "run"
    # Not this process's wandb service (WANDB_SERVICE): the job starts and loses its own.
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir)], cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "hanging").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the job never reached step 4"
            time.sleep(0.1)
        time.sleep(2 * FLUSH_INTERVAL_S)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    train_run("logger=wandb")
    first, second = folders(run_dir)
    assert steps(first) == [3] and steps(second) == [6]
    assert [r["step"] for r in records(run_dir)] == [3, 6]

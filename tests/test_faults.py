"""Crash consistency: a kill or a full disk at any write leaves a run that resumes to the same
records, with no leftovers and one clear line for the failed write."""

from __future__ import annotations

import errno
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import interrupt_then_resume
from tllab.io import WriteError, read_jsonl
from tllab.report.runs import find_runs
from tllab.trainer import Trainer

RUN = ("trainer.max_steps=6", "trainer.eval_every=2", "trainer.deterministic=true")


def steps(run_dir: Path, name: str = "results.jsonl") -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / name)]


def test_records_of_a_start_killed_before_its_first_checkpoint_are_not_repeated(train_run, tmp_path, monkeypatch):
    original = Trainer._save

    def killed_before_the_first_checkpoint(self, metrics):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", killed_before_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_run(*RUN)
    assert steps(tmp_path / "run") == [2] and not (tmp_path / "run/checkpoints/last.pt").exists()
    monkeypatch.setattr(Trainer, "_save", original)
    train_run(*RUN)
    assert steps(tmp_path / "run") == [2, 4, 6] and steps(tmp_path / "run", "per_class.jsonl") == [2, 4, 6]


def test_a_record_cut_short_is_dropped_on_resume_and_by_the_report(train_run, tmp_path, monkeypatch, caplog):
    reference = train_run(*RUN, run_dir=tmp_path / "reference")
    run_dir = tmp_path / "run"

    def train(run_dir: Path) -> None:
        if (run_dir / "checkpoints/last.pt").exists():  # killed while appending the step-6 record
            with (run_dir / "results.jsonl").open("a") as f:
                f.write('{"step": 6, "epoch": 0.5, "tr')
            (run_dir / "checkpoints" / ".last.pt.tmp-4242").write_bytes(b"half a checkpoint")
        train_run(*RUN, run_dir=run_dir)

    with caplog.at_level(logging.WARNING, logger="tllab"):
        interrupt_then_resume(train, run_dir, monkeypatch, at_step=5)
    assert "left out its last record, cut short by an interrupted write" in caplog.text
    assert steps(run_dir) == [2, 4, 6]
    assert [r["target_test/acc"] for r in read_jsonl(run_dir / "results.jsonl")][-1] == \
        reference["final"]["target_test/acc"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))  # the killed write's leftover is gone

    with (run_dir / "results.jsonl").open("a") as f:  # the report reads a damaged finished run too
        f.write('{"step": 8, "tar')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tllab"):
        (run,), _ = find_runs([run_dir])
    assert [r["step"] for r in run.records] == [2, 4, 6] and run.state == "done"
    assert "cut short" in caplog.text


def test_a_damaged_record_inside_the_file_names_the_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"step": 2}\n{"ste\n{"step": 6}\n')
    with pytest.raises(Exception, match=r"results.jsonl line 2 is not JSON .*delete that line"):
        read_jsonl(path)


@pytest.mark.parametrize(("code", "cause"), [(errno.ENOSPC, "no space left on the device: free some space"),
                                             (errno.EFBIG, "the file is over the file-size limit (ulimit -f)")])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(train_run, tmp_path, monkeypatch,
                                                                                  code, cause):
    save = torch.save

    def disk_full_on_the_second_checkpoint(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".last.pt") and obj["step"] == 6:
            Path(f).write_bytes(b"partial")
            raise OSError(code, "write failed")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_the_second_checkpoint)
    with pytest.raises(WriteError) as err:
        train_run(*RUN, "trainer.eval_every=3")
    message = str(err.value)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert message == f"could not write {last} ({cause}); the previous version of the file is intact."
    assert torch.load(last, weights_only=True)["step"] == 3  # the previous checkpoint
    assert not list(last.parent.glob(".*.tmp-*"))
    assert json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])["step"] == 6


@pytest.mark.parametrize("killed_in", ["best.pt", "last.pt"])
def test_a_kill_during_the_last_checkpoint_writes_leaves_best_pt_and_the_summary_agreeing(train_run, tmp_path,
                                                                                        monkeypatch, killed_in):
    """Selection by step (no selection split): the best step is the last one, so both files are
    written at step 6; a kill in either write must not leave best.pt behind the summary."""
    import tllab.trainer as trainer_module

    save = trainer_module.save_atomic
    state = {"killed": False}

    def kill_at_the_final_write(obj, path):
        if path.name == killed_in and obj["step"] == 6 and not state["killed"]:
            state["killed"] = True
            raise KeyboardInterrupt
        save(obj, path)

    monkeypatch.setattr(trainer_module, "save_atomic", kill_at_the_final_write)
    overrides = (*RUN, "experiment=digits_pretrain")  # selects by source validation: best may be any step
    with pytest.raises(KeyboardInterrupt):
        train_run(*overrides)
    summary = train_run(*overrides)
    best = torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)
    assert best["step"] == summary["best"]["step"]
    assert best["metrics"] == summary["best"]["metrics"]


class _RunsCode:
    """A pickled object whose loading would run code."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_a_checkpoint_that_would_run_code_is_refused_without_advising_to_unpickle_it(tmp_path, capsys):
    from tllab.checkpoint import load_checkpoint
    from tllab.errors import CheckpointError

    path = tmp_path / "last.pt"
    torch.save({"model": {}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "holds Python objects besides tensors, which tllab does not unpickle" in message
    assert "weights_only" not in message and "will likely succeed" not in message and "\n" not in message
    assert "this ran" not in capsys.readouterr().out


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run dir and its bytes (the lock file names its last holder: left out)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tllab.train", "trainer.quiet=true", *overrides],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_refused_command_leaves_the_run_dir_untouched(tmp_path):
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=2", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"]
    assert cli(*args).returncode == 0
    (run_dir / "done").unlink()  # a run to resume: its records, checkpoints and Hydra's files stay as they are
    before = snapshot(run_dir)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.yaml"} <= before.keys()
    for bad, message in [("seed=1", r"holds a run with another config \(seed: 0 -> 1\)")]:
        proc = cli(*args, bad)
        assert proc.returncode == 1 and re.fullmatch(f"tllab: error: .*{message}.*", proc.stderr.strip()), proc.stderr
        assert snapshot(run_dir) == before, bad
    assert not (run_dir / "error.txt").exists()


def test_a_run_dir_hydra_cannot_create_is_one_line(tmp_path):
    from tllab.errors import TllabError
    from tllab.train import check_command_line

    (tmp_path / "file").write_text("")
    for run_dir, message in [(tmp_path / "file", "is a file"),
                             (tmp_path / "file" / "run", f"lies under the file {tmp_path}/file")]:
        with pytest.raises(TllabError) as error:
            check_command_line(["seed=1", f"hydra.run.dir={run_dir}"])
        assert str(error.value) == f"hydra.run.dir={run_dir} {message}; choose another hydra.run.dir."


def test_a_read_only_run_dir_is_one_line(tmp_path, monkeypatch):
    from tllab.errors import TllabError
    from tllab.io import check_writable_dir

    monkeypatch.setattr("tllab.io.os.access", lambda path, mode: False)  # root can write anywhere
    with pytest.raises(TllabError, match=rf"hydra.run.dir={tmp_path}/a/b: {tmp_path} is not writable by this user"):
        check_writable_dir(tmp_path / "a" / "b", "hydra.run.dir")


def test_a_lost_or_damaged_config_is_restored_from_the_checkpoint_and_still_checked(train_run, tmp_path, caplog,
                                                                                    monkeypatch):
    from tllab.errors import ConfigError

    run_dir = tmp_path / "run"
    original_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: (_ for _ in ()).throw(KeyboardInterrupt)
                        if self.step == 2 else original_step(self))
    with pytest.raises(KeyboardInterrupt):
        train_run(*RUN)
    monkeypatch.setattr(Trainer, "train_step", original_step)
    original = (run_dir / "config.yaml").read_text()
    for damage in ("missing", "garbled"):
        if damage == "missing":
            (run_dir / "config.yaml").unlink()
        else:
            (run_dir / "config.yaml").write_text("seed: [unclosed\n")
        with pytest.raises(ConfigError, match=r"holds a run with another config \(seed: 0 -> 1\)"):
            train_run(*RUN, "seed=1")  # the checkpoint's copy of the config is checked
    with caplog.at_level(logging.WARNING, logger="tllab"):
        train_run(*RUN)
    assert "restored from the checkpoint's copy" in caplog.text
    assert (run_dir / "config.yaml").read_text() == original and steps(run_dir) == [2, 4, 6]


def test_a_finished_run_without_a_readable_config_is_refused_in_one_line(train_run, tmp_path):
    from tllab.errors import RunDirRefused

    train_run(*RUN, "trainer.save_checkpoints=false")
    (tmp_path / "run" / "config.yaml").write_text("seed: [unclosed\n")
    with pytest.raises(RunDirRefused, match="holds a run without a readable config.yaml"):
        train_run(*RUN, "trainer.save_checkpoints=false")

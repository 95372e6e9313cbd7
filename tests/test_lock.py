"""One process trains a run dir at a time: the lock, and launchers sharing a sweep dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tllab import lock, sweep
from tllab.io import read_jsonl
from tllab.sweep import job_id, load_jobs

from .conftest import TESTS
from .test_sweep import _launch

HOLD = "import sys; from pathlib import Path; from tllab import lock\nwith lock.hold(Path(sys.argv[1])):\n" \
       "    print('held', flush=True); sys.stdin.read()"


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_run_dir_is_held_by_one_live_process_and_freed_when_it_is_killed(tmp_path: Path):
    run_dir = tmp_path / "run"
    assert lock.owner(run_dir) is None
    holder = hold_in_another_process(run_dir)
    try:
        expected = f"pid {holder.pid}, host {socket.gethostname()}"
        assert lock.owner(run_dir) == expected
        with pytest.raises(lock.RunDirBusy, match=f"is being trained by {expected}; wait for it"), \
                lock.hold(run_dir, wait_s=0.2):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.owner(run_dir) is None  # kill -9 leaves no stale lock
    with lock.hold(run_dir):
        assert lock.owner(run_dir) == f"pid {os.getpid()}, host {socket.gethostname()}"
    assert lock.owner(run_dir) is None


def test_an_unusable_run_dir_is_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(lock.ConfigError, match=r"cannot use .*/file/run as a run dir \(Not a directory"), \
            lock.hold(tmp_path / "file" / "run"):
        pass


@pytest.mark.slow
def test_a_launcher_skips_the_job_another_one_trains_and_status_names_its_holder(tmp_path: Path, capsys):
    sweep_dir = tmp_path / "sweep"
    grid = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.quiet=true", "trainer.deterministic=true",
            "trainer.save_checkpoints=false"]
    busy = sweep_dir / job_id([*grid, "seed=1"])
    holder = hold_in_another_process(busy)
    try:
        code, out = _launch(sweep_dir, capsys, "seed=0,1")
        assert code == 0, out  # a job another launcher trains is not a failure
        assert "2 jobs, 0 already done, 1 running in other processes, 1 to run" in out
        assert not (busy / "results.jsonl").exists() and not (busy / "config.yaml").exists()
        sweep.main(["status", str(sweep_dir)])
        status = capsys.readouterr().out
        assert status.splitlines()[0] == "2 jobs: 1 done, 1 running"
        assert f"running    {busy.name}  seed=1 (pid {holder.pid}, host {socket.gethostname()})" in status
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    sweep.main(["status", str(sweep_dir)])
    assert capsys.readouterr().out.splitlines()[0] == "2 jobs: 1 done, 1 incomplete"
    code, out = _launch(sweep_dir, capsys, "seed=0,1")
    assert code == 0 and "2 jobs: 2 done" in out


@pytest.mark.slow
def test_two_launchers_on_one_sweep_dir_train_every_job_exactly_once(tmp_path: Path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "tllab.sweep", "launch", str(sweep_dir), f"hydra.searchpath=[file://{TESTS}/configs]",
               "trainer.max_steps=6", "trainer.eval_every=2", "trainer.quiet=true", "seed=0,1,2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs
    jobs = load_jobs(sweep_dir)
    assert len(jobs) == 3 and all(job.state == "done" for job in jobs)
    for job in jobs:
        assert [r["step"] for r in read_jsonl(job.dir / "results.jsonl")] == [2, 4, 6]
        assert (job.dir / "train.log").read_text().count("step 6/6") == 1

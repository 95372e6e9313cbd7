"""Command-line extras: forgetting planned sweep jobs, plug-ins from outside the package
(``TLLAB_CONFIG_PATH``), and one-line errors for command lines Hydra answers with a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from hydra_plugins.tllab_searchpath.tllab_searchpath import config_path_entries
from tllab import lock, sweep, train
from tllab.errors import ConfigError
from tllab.io import read_jsonl
from tllab.sweep import compose_grid, job_id, load_jobs, plan

from .conftest import TESTS

MYNORM = '''\
from torch import Tensor

from tllab.plugin import Plugin, StepOutput


class MyNorm(Plugin):
    def __init__(self, weight: float = 0.1) -> None:
        super().__init__()
        self.weight = weight

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        return {"feat": self.weight * out.f_s.pow(2).mean()}
'''


def _run_sweep(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[object, str]:
    """``tllab-sweep argv`` in this process: (exit code or message, stdout)."""
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(list(argv))
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().out


def test_forget_takes_the_jobs_of_a_grid_out_as_launch_plans_them(tmp_path: Path, capsys):
    """A preset's rows and domain pairs expand as in launch; a command-line value narrows the grid."""
    base = [f"hydra.searchpath=[file://{TESTS / 'configs'}]", "experiment=rows_and_pairs", "trainer.max_steps=1"]
    GlobalHydra.instance().clear()
    plan(tmp_path, compose_grid([*base, "seed=0,1"]))
    assert len(load_jobs(tmp_path)) == 8  # 2 ordered pairs x 2 rows x 2 seeds

    code, out = _run_sweep(capsys, "forget", str(tmp_path), *base, "dataset.source=[uci]", "seed=1")
    assert code == 0
    jobs = load_jobs(tmp_path)
    assert len(jobs) == 6 and not any("dataset.source=[uci]" in j.overrides and "seed=1" in j.overrides for j in jobs)
    lines = out.splitlines()
    assert lines[0] == "forgot 2 of the sweep's 8 jobs" and len(lines) == 3
    assert all(line.split()[0] == "pending" and "dataset.source=[uci]" in line for line in lines[1:])

    code, _ = _run_sweep(capsys, "forget", str(tmp_path), *base, "dataset.source=[uci]", "seed=1")
    assert "none of the 2 jobs of this grid is planned" in code


def test_forget_refuses_running_and_finished_jobs_and_deletes_started_ones(tmp_path: Path, capsys):
    plan(tmp_path, [[f"seed={s}"] for s in range(4)])
    done, failed, running, _ = (tmp_path / job_id([f"seed={s}"]) for s in range(4))
    done.mkdir()
    (done / "done").write_text("")
    failed.mkdir()
    (failed / "error.txt").write_text("RuntimeError: boom\n")
    manifest = (tmp_path / sweep.MANIFEST).read_bytes()
    with lock.hold(running):
        code, _ = _run_sweep(capsys, "forget", str(tmp_path), "seed=0,1,2,3", "--with-results")
    assert code.startswith("tllab: error: 1 of these jobs are running") and "\n" not in code
    code, _ = _run_sweep(capsys, "forget", str(tmp_path), "seed=0,1,2,3")
    assert code.startswith("tllab: error: 1 of these jobs are done") and "--with-results" in code
    assert (tmp_path / sweep.MANIFEST).read_bytes() == manifest and done.exists() and failed.exists()

    code, out = _run_sweep(capsys, "forget", str(tmp_path), "seed=1,2,3")  # failed, incomplete (stopped), pending
    assert code == 0 and out.splitlines()[0] == "forgot 3 of the sweep's 4 jobs, deleted 2 dirs"
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["failed", "incomplete", "pending"]
    assert not failed.exists() and not running.exists() and done.exists()
    assert [j.overrides for j in load_jobs(tmp_path)] == [["seed=0"]]

    code, out = _run_sweep(capsys, "forget", str(tmp_path), "--with-results", "seed=0")
    assert code == 0 and "done" in out and not done.exists() and load_jobs(tmp_path) == []
    code, _ = _run_sweep(capsys, "status", str(tmp_path))
    assert "holds no sweep" in code


def test_delete_incomplete_with_forget_drops_the_jobs_from_the_manifest(tmp_path: Path, capsys):
    plan(tmp_path, [[f"seed={s}"] for s in range(3)])
    failed, incomplete, _ = (tmp_path / job_id([f"seed={s}"]) for s in range(3))
    failed.mkdir()
    (failed / "error.txt").write_text("RuntimeError: boom\n")
    incomplete.mkdir()
    code, out = _run_sweep(capsys, "delete-incomplete", str(tmp_path), "--yes", "--forget")
    assert code == 0 and "deleted and forgot 2 jobs" in out
    assert not failed.exists() and not incomplete.exists()
    assert [j.overrides for j in load_jobs(tmp_path)] == [["seed=2"]]


def test_config_path_entries_keep_urls_and_make_dirs_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    value = os.pathsep.join(["pkg://mypkg.conf", "conf", "", "file:///abs/conf"])
    assert config_path_entries(value) == ["pkg://mypkg.conf", f"file://{tmp_path / 'conf'}", "file:///abs/conf"]


@pytest.mark.slow
def test_a_plugin_from_outside_the_package_runs_under_train_and_sweep(tmp_path: Path, capsys, monkeypatch):
    """``TLLAB_CONFIG_PATH`` finds ``<dir>/norm/mynorm.yaml``, whose ``_target_`` is a class of the user's
    own package; tllab-train, tllab-sweep and tllab's option checks all see it."""
    (tmp_path / "myplugins").mkdir()
    (tmp_path / "myplugins" / "__init__.py").write_text(MYNORM)
    conf = tmp_path / "conf"
    (conf / "norm").mkdir(parents=True)
    (conf / "norm" / "mynorm.yaml").write_text("# @package norm.mynorm\n_target_: myplugins.MyNorm\nweight: 0.2\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TLLAB_CONFIG_PATH": str(conf)}
    fast = ["norm=mynorm", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.quiet=true",
            "trainer.eval_batch_size=512"]
    commands = [["tllab.train", *fast, f"hydra.run.dir={tmp_path / 'run'}"],
                ["tllab.sweep", "launch", str(tmp_path / "sweep"), *fast, "seed=0"]]
    processes = [subprocess.Popen([sys.executable, "-m", *c], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for c in commands]  # side by side: 2 cores
    for process in processes:
        out = process.communicate()[0]
        assert process.returncode == 0, out
    (job,) = load_jobs(tmp_path / "sweep")
    for run_dir in (tmp_path / "run", job.dir):
        assert read_jsonl(run_dir / "results.jsonl")[-1]["train/norm.mynorm/feat"] > 0

    monkeypatch.setenv("TLLAB_CONFIG_PATH", str(conf))
    train.check_command_line(["norm=[mynorm,adabn]"])
    with pytest.raises(ConfigError, match="available: .*mynorm"):
        train.check_command_line(["norm=mynorm,nope"])
    monkeypatch.setenv("TLLAB_CONFIG_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="TLLAB_CONFIG_PATH names file://.*missing"):
        train.check_command_line(["seed=1"])
    monkeypatch.delenv("TLLAB_CONFIG_PATH")
    with pytest.raises(ConfigError, match="available: .*mynorm"):  # Hydra's --config-dir, for tllab-train
        train.check_arguments(["--config-dir", str(conf), "norm=[mynorm,nope]"])
    code, _ = _run_sweep(capsys, "launch", str(tmp_path / "other"), "-cd", str(conf), "norm=mynorm")
    assert code.startswith("tllab: error: tllab-sweep takes no --config-dir") and "TLLAB_CONFIG_PATH" in code


def test_multirun_with_cfg_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tllab-train", "-m", "--cfg", "job", "seed=0,1"])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("tllab: error: -m and --cfg job cannot be combined") and "--cfg job without -m" in err


def test_slurm_launcher_without_slurm_is_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)  # no srun here
    code, _ = _run_sweep(capsys, "launch", str(tmp_path / "sweep"), "--launcher", "slurm", "seed=0,1")
    assert code.startswith("tllab: error: hydra/launcher=slurm submits SLURM jobs") and "\n" not in code
    assert "--launcher joblib" in code and not (tmp_path / "sweep").exists()  # nothing planned


def test_a_reader_that_stops_early_ends_a_command_quietly():
    """``tllab-data list | head -1``: the command exits 141 (SIGPIPE) with no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "tllab.data.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == ""

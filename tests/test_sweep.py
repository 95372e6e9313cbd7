"""Sweeps: job identity, manifest and states, and an end-to-end sweep with a failing job,
relaunched and reported."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from PIL import Image

from tllab import report, sweep
from tllab.io import read_jsonl
from tllab.sweep import Job, job_id, load_jobs, plan

from .conftest import TESTS

GOLDEN = TESTS / "golden" / "sweep_report.md"


def test_job_id_ignores_order_spelling_and_result_neutral_keys():
    base = job_id(["seed=0", "optim.lr=0.001", "norm=none"])
    assert job_id(["norm=none", "optim.lr=1e-3", "seed=0"]) == base
    assert job_id(["seed=0", "optim.lr=0.001", "norm=none", "trainer.quiet=true", "logger.group=x",
                   "hydra.sweep.subdir=abc", "trainer.eval_batch_size=64", "trainer.eval_every=10"]) == base
    assert job_id(["seed=1", "optim.lr=0.001", "norm=none"]) != base
    assert job_id(["seed=0", "optim.lr=0.01", "norm=none"]) != base
    assert re.fullmatch(r"[0-9a-f]{12}", base)


@pytest.mark.parametrize("jid", ["6932913849e8", "123456789012", "0e00000000ab", "abcdef012345"])
def test_job_dirs_keep_ids_that_look_like_numbers(jid):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([sweep.subdir_override(jid)])
    assert override.value() == jid


def test_plan_merges_jobs_into_the_manifest(tmp_path: Path):
    first = plan(tmp_path, [["seed=0"], ["seed=1"], ["seed=0"]])  # a duplicate is one job
    assert [j.overrides for j in first] == [["seed=0"], ["seed=1"]]
    second = plan(tmp_path, [["seed=1"], ["seed=2"]])
    assert [j.id for j in second] == [job_id(["seed=1"]), job_id(["seed=2"])]
    assert [j.overrides for j in load_jobs(tmp_path)] == [["seed=0"], ["seed=1"], ["seed=2"]]
    assert json.loads((tmp_path / "sweep.json").read_text())["jobs"][2]["id"] == job_id(["seed=2"])


def test_job_states_follow_the_run_dir(tmp_path: Path):
    job = Job("abc", ["seed=0"], tmp_path / "abc")
    assert job.state == "pending"
    job.dir.mkdir()
    assert job.state == "incomplete"
    (job.dir / "error.txt").write_text("ConfigError: bad\ntraceback...\n")
    assert (job.state, job.error()) == ("failed", "ConfigError: bad")
    (job.dir / "done").write_text("")
    assert job.state == "done"


def _launch(sweep_dir: Path, capsys: pytest.CaptureFixture[str], *grid: str) -> tuple[int, str]:
    GlobalHydra.instance().clear()
    overrides = [f"hydra.searchpath=[file://{TESTS / 'configs'}]", "trainer.max_steps=4", "trainer.eval_every=2",
                 "trainer.quiet=true", "trainer.deterministic=true", "trainer.save_checkpoints=false", *grid]
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["launch", str(sweep_dir), *overrides])
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().out


@pytest.mark.slow
def test_sweep_skips_finished_jobs_reports_failures_and_makes_the_report(tmp_path: Path, capsys):
    sweep_dir = tmp_path / "sweep"
    grid = ("regularizer=none,fail_on_seed", "seed=0,1")
    code, out = _launch(sweep_dir, capsys, *grid)
    assert code == 1, out
    assert "4 jobs: 3 done, 1 failed" in out
    [failed] = [j.id for j in load_jobs(sweep_dir) if j.state == "failed"]
    assert {"regularizer=fail_on_seed", "seed=1"} <= set(load_jobs(sweep_dir)[3].overrides)
    assert re.search(rf"failed +{failed} +regularizer=fail_on_seed seed=1 +RuntimeError: forced failure for seed 1",
                     out)
    assert "Traceback" in (sweep_dir / failed / "error.txt").read_text()  # a bug keeps its traceback
    config = yaml.safe_load((load_jobs(sweep_dir)[0].dir / "config.yaml").read_text())
    assert config["logger"]["group"] == "sweep"  # W&B groups a sweep's runs by the sweep's name
    done = {j.id: (j.dir / "results.jsonl").stat().st_mtime_ns for j in load_jobs(sweep_dir) if j.state == "done"}
    assert len(done) == 3

    code, out = _launch(sweep_dir, capsys, *grid)  # relaunch: only the failed job runs again
    assert code == 1 and "4 jobs: 3 done, 1 failed" in out
    assert {j.id: (j.dir / "results.jsonl").stat().st_mtime_ns for j in load_jobs(sweep_dir)
            if j.state == "done"} == done

    sweep.main(["status", str(sweep_dir)])
    status = capsys.readouterr().out
    assert status.splitlines()[0] == "4 jobs: 3 done, 1 failed" and failed in status

    out_dir = tmp_path / "report"
    report.main([str(sweep_dir), "--out", str(out_dir), "--selection", "last,oracle"])
    text = (out_dir / "report.md").read_text().replace(str(sweep_dir), "<sweep>")
    text = re.sub(r"Made with tllab \S+ at commit .+? on .+? \(", "Made with tllab <version> at commit <commit> on "
                  "<hardware> (", text)  # provenance of this checkout and machine
    if not GOLDEN.exists():  # first run writes the golden file, to be reviewed and committed
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    for png in ["digits_da_last_bars.png", "digits_da_oracle_bars.png", "digits_da_curves.png"]:
        with Image.open(out_dir / png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200

    sweep.main(["delete-incomplete", str(sweep_dir), "--yes"])
    capsys.readouterr()
    assert not (sweep_dir / failed).exists()
    sweep.main(["status", str(sweep_dir)])
    assert capsys.readouterr().out.splitlines()[0] == "4 jobs: 3 done, 1 pending"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["--jobs", "2"]], ids=["joblib"])  # submitit: the requeue test below
def test_parallel_and_submitit_launchers_run_the_same_jobs(tmp_path: Path, capsys, launcher):
    sweep_dir = tmp_path / "sweep"
    code, out = _launch(sweep_dir, capsys, *launcher, "seed=0,1")
    assert code == 0 and "2 jobs: 2 done" in out
    jobs = load_jobs(sweep_dir)
    assert all((job.dir / "done").exists() and job.dir.name == job.id for job in jobs)
    code, out = _launch(sweep_dir, capsys, *launcher, "seed=0,1")  # nothing left to run
    assert code == 0 and "2 jobs, 2 already done, 0 running in other processes, 0 to run" in out


@pytest.mark.slow
def test_preset_rows_and_distinct_domains_make_the_table_grid(tmp_path: Path, capsys):
    """2 domains give 2 ordered pairs (mnist->mnist left out), each run once per row, a row's recipe
    applying to its own jobs only; a command-line value replaces a row's."""
    code, out = _launch(tmp_path / "s", capsys, "experiment=rows_and_pairs", "trainer.max_steps=1", "optim.lr=0.5")
    assert code == 0, out
    jobs = load_jobs(tmp_path / "s")
    own = sorted(sorted(o for o in j.overrides if o.startswith(("dataset.", "norm", "optim."))) for j in jobs)
    assert own == sorted(sorted([*o, "optim.lr=0.5"]) for o in [
        ["dataset.source=[mnist]", "dataset.target=[uci]"], ["dataset.source=[uci]", "dataset.target=[mnist]"],
        ["norm=adabn", "dataset.source=[mnist]", "dataset.target=[uci]"],
        ["norm=adabn", "dataset.source=[uci]", "dataset.target=[mnist]"]])
    methods = {json.loads((j.dir / "summary.json").read_text())["method"] for j in jobs}
    assert methods == {"source only", "adabn"}
    assert {yaml.safe_load((j.dir / "config.yaml").read_text())["optim"]["lr"] for j in jobs} == {0.5}


def slurm_launcher_config() -> DictConfig:
    from hydra import compose, initialize_config_module

    from tllab.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        return compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher


@pytest.mark.slow
def test_a_job_signalled_at_its_time_limit_is_requeued_and_resumes_in_its_job_dir(tmp_path: Path):
    """submitit's protocol, run by its local executor: the time-limit signal (USR2) makes the job
    requeue itself (as many times as the SLURM launcher's max_num_timeout allows) and the rerun
    resumes from last.pt, so every record is written once and the job finishes."""
    requeues = slurm_launcher_config().max_num_timeout
    assert requeues >= 1  # with 0 a job that reaches its time limit is lost
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "tllab.sweep", "launch", str(sweep_dir), "hydra/launcher=submitit_local",
               f"+hydra.launcher.max_num_timeout={requeues}", "hydra.launcher.timeout_min=1",  # 1 min: USR2 = time-out
               f"hydra.searchpath=[file://{TESTS}/configs]", "trainer.max_steps=24", "trainer.eval_every=4",
               "trainer.quiet=true", "trainer.deterministic=true", "seed=0"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(sweep_dir.glob("*/checkpoints/last.pt")) and time.time() < deadline:
        time.sleep(0.05)
    [job_dir] = [p.parents[1] for p in sweep_dir.glob("*/checkpoints/last.pt")]
    tasks = [int(c.parent.name) for c in Path("/proc").glob("[0-9]*/cmdline")
             if b"submitit.core._submit" in c.read_bytes() and str(sweep_dir).encode() in c.read_bytes()]
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)
    out = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, out
    assert (job_dir / "done").exists()
    assert [r["step"] for r in read_jsonl(job_dir / "results.jsonl")] == list(range(4, 25, 4))
    assert "resumed from" in (job_dir / "train.log").read_text()
    logs = "".join(p.read_text() for p in sweep_dir.rglob("*_log.*"))
    assert "this job is timed-out" in logs and "Requeued job" in logs

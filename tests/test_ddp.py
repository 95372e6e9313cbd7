"""Data-parallel training: 2 gloo processes equal one process on the concatenated batch."""

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
import torch

from tests.conftest import compose_config
from tllab.train import resolve_config, run
from tllab.trainer import Trainer

COMMON = ["optim=sgd", "trainer.max_steps=12", "trainer.eval_every=6", "trainer.quiet=true", "seed=3",
          "trainer.precision=float64"]  # float64: equal up to rounding, not up to float32 noise
RUN_FILES = {".hydra", ".lock", "checkpoints", "config.yaml", "done", "results.jsonl", "per_class.jsonl",
             "summary.json", "train.log", "provenance.json"}


def cli(tmp_path: Path, *overrides: str, launcher: tuple[str, ...] = ("-m", "tllab.train"), **kwargs):
    """Run the CLI in ``tmp_path`` (so Hydra's default run dirs land there)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, *launcher, *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains ``text``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def only_run_dir(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in (tmp_path / "outputs" / "runs").glob("*/*")]
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_with_syncbn_equals_one_process_on_the_concatenated_batch(tmp_path):
    proc = cli(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.sync_bn=true", "trainer.batch_size=16", *COMMON)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run_dir = only_run_dir(tmp_path)  # exactly one run dir for both ranks
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert [r["step"] for r in records(run_dir)] == [6, 12]  # rank 0 alone wrote the records
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert sum("step 12/12" in line for line in log_lines) == 1
    assert "target_test/acc" in out

    single = run(compose_config([*COMMON, "trainer.batch_size=32"]), tmp_path / "single")
    ddp = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    ref = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    assert ddp["model"].keys() == ref["model"].keys()
    for key, value in ref["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, atol=1e-9, rtol=1e-9, msg=key)
    assert len(ddp["rng"]) == 2

    # Distributed evaluation equals one process evaluating the same weights.
    cfg, resolved = resolve_config(compose_config([*COMMON, "trainer.batch_size=32"]))
    trainer = Trainer(cfg, tmp_path / "eval", resolved)
    trainer.model.load_state_dict(ddp["model"])
    local, local_per_class = trainer.evaluate()
    final = records(run_dir)[-1]
    for key, value in local.items():
        assert final[key] == pytest.approx(value, abs=1e-6 if key.endswith("/loss") else 1e-12), key
    # per-class accuracies are counts all-reduced over ranks whose shards hold each class unevenly
    per_class = json.loads((run_dir / "per_class.jsonl").read_text().splitlines()[-1])
    assert per_class["step"] == 12 and per_class["target_test"] == local_per_class["target_test"]
    assert final["target_test/acc"] == pytest.approx(single["final"]["target_test/acc"], abs=0.002)


@pytest.mark.slow
def test_torchrun_launch_shares_one_run_dir_and_resumes_exactly(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "tllab.train")
    args = ["trainer.sync_bn=true", "trainer.batch_size=16", "trainer.deterministic=true", "optim=sgd",
            "trainer.max_steps=16", "trainer.eval_every=4", "trainer.quiet=true"]
    a = tmp_path / "a"
    a.mkdir()
    proc = cli(a, *args, launcher=launcher)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run_a = only_run_dir(a)
    assert {p.name for p in run_a.iterdir()} == RUN_FILES
    assert [r["step"] for r in records(run_a)] == list(range(4, 17, 4))

    # The same run, interrupted after its first checkpoint and resumed in the same run dir.
    b = tmp_path / "b"
    b.mkdir()
    run_b = b / "run"
    proc = cli(b, *args, f"hydra.run.dir={run_b}", launcher=launcher)
    deadline = time.time() + 200
    while not (run_b / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_processes_mentioning(str(run_b))  # torchrun's workers run in sessions of their own
    proc.communicate()
    assert not (run_b / "done").exists(), "the run finished before it could be interrupted"
    proc = cli(b, *args, f"hydra.run.dir={run_b}", launcher=launcher)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert [r["step"] for r in records(run_b)] == list(range(4, 17, 4))
    wa = torch.load(run_a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(run_b / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert [{k: v for k, v in r.items() if k != "time"} for r in records(run_a)] == \
        [{k: v for k, v in r.items() if k != "time"} for r in records(run_b)]


@pytest.mark.slow
def test_a_killed_worker_is_one_line_naming_its_rank_and_the_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.max_steps=100000", "trainer.eval_every=2",
               "trainer.quiet=true", f"hydra.run.dir={run_dir}")
    deadline = time.time() + 200
    while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert re.fullmatch(rf"tllab: error: data-parallel worker rank [01] \(pid {workers[1]}\) was killed by SIGKILL, so "
                        rf"every rank stopped; its last checkpoint is {run_dir}/checkpoints/last.pt: rerun the same "
                        r"command to resume.", err.strip().splitlines()[-1]), err
    assert "Traceback" not in err and "leaked" not in err, err


@pytest.mark.slow
def test_a_user_error_in_a_worker_is_raised_once_with_its_message(tmp_path):
    from tllab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.num_classes=5 but the labels go up to 9"):
        run(compose_config(["trainer=ddp", "trainer.devices=2", "dataset.num_classes=5", "trainer.quiet=true"]),
            tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["[stochnorm,adabn]", "ibn_a"])  # BIN: tests/test_norm_bin.py
def test_ddp_with_normalization_strategies_equals_one_process(tmp_path, norm):
    """Synchronized StochNorm (identical masks on both ranks) and IBN's BatchNorm half train
    exactly as one process on the concatenated batch; AdaBN's distributed statistics evaluate
    exactly as one process's."""
    common = [*COMMON, f"norm={norm}", "trainer.max_steps=6", "trainer.eval_every=6"]
    if "adabn" in norm:
        common.append("norm.adabn.split=source_val")  # adapting on a small split keeps the test short
    ddp = run(compose_config([*common, "trainer=ddp", "trainer.devices=2", "trainer.sync_bn=true",
                              "trainer.batch_size=16"]), tmp_path / "ddp")
    single = run(compose_config([*common, "trainer.batch_size=32"]), tmp_path / "single")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("ddp", "single"))
    assert a["model"].keys() == b["model"].keys()
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, atol=1e-9, rtol=1e-9, msg=key)
    for key, value in single["final"].items():
        assert ddp["final"][key] == pytest.approx(value, abs=1e-9 if key.endswith("/acc") else 1e-6), key


@pytest.mark.slow
def test_ddp_with_fine_tuning_regularizers_equals_one_process(tmp_path, pretrained):
    """L2-SP, DELTA (attention from rank 0), BSS over all ranks' features, LwF (a teacher copied on
    every rank) and Co-Tuning (relationship from rank 0) train exactly as one process on the
    concatenated batch."""
    common = [*COMMON, "experiment=digits_finetune", f"backbone.pretrained={pretrained()}", "trainer.max_steps=4",
              "trainer.eval_every=4", "regularizer=[l2sp,delta,bss,lwf,co_tuning]", "regularizer.bss.gather=true",
              "regularizer.delta.attention_steps=5", "regularizer.delta.attention_batches=1"]
    ddp = run(compose_config([*common, "trainer=ddp", "trainer.devices=2", "trainer.sync_bn=true",
                              "trainer.batch_size=16"]), tmp_path / "ddp")
    single = run(compose_config([*common, "trainer.batch_size=32"]), tmp_path / "single")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("ddp", "single"))
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, atol=1e-9, rtol=1e-9, msg=key)
    for key, value in single["final"].items():
        assert ddp["final"][key] == pytest.approx(value, abs=1e-9 if key.endswith("/acc") else 1e-6), key


@pytest.mark.slow
def test_ddp_with_alignment_equals_one_process(tmp_path):
    """DANN's and CDAN+E's discriminators (synchronized BatchNorm; CDAN+E's weights normalised over
    every rank's samples) and MCD's extra updates (gradients of the moved parameters averaged)
    train exactly as one process on the concatenated batch. MCD's class-balance term is per rank
    by nature (a log of the batch's mean prediction), so it is off here."""
    common = [*COMMON, "align=[dann,cdan,mcd]", "align.dann.hidden_size=32", "align.cdan.hidden_size=32",
              "align.cdan.entropy=true", "align.cdan.randomized=true", "align.cdan.randomized_dim=32",
              "align.mcd.bottleneck_dim=16", "align.mcd.dropout_p=0", "align.mcd.entropy_weight=0",
              "align.mcd.num_k=1", "trainer.max_steps=4", "trainer.eval_every=4"]
    ddp = run(compose_config([*common, "trainer=ddp", "trainer.devices=2", "trainer.sync_bn=true",
                              "trainer.batch_size=16"]), tmp_path / "ddp")
    single = run(compose_config([*common, "trainer.batch_size=32"]), tmp_path / "single")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("ddp", "single"))
    pairs = [(a["model"], b["model"]), *((a["plugins"][n], b["plugins"][n]) for n in b["plugins"])]
    for x, y in pairs:
        assert x.keys() == y.keys()
        for key, value in y.items():
            torch.testing.assert_close(x[key], value, atol=1e-9, rtol=1e-9, msg=key)
    for key, value in single["final"].items():
        assert ddp["final"][key] == pytest.approx(value, abs=1e-9 if key.endswith("/acc") else 1e-6), key

"""A non-editable install (a built wheel) ships the configs and its console script finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_wheel_install_console_script_finds_configs(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("tllab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tllab/configs/train.yaml" in names and "tllab/configs/experiment/digits_source_only.yaml" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    workdir = tmp_path / "elsewhere"  # not the repository: only the installed copy is importable
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    where = subprocess.run([sys.executable, "-c", "import tllab; print(tllab.__file__)"], env=env, cwd=workdir,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))

    script = site / "bin" / "tllab-train"
    info = subprocess.run([str(script), "--info", "searchpath"], env=env, cwd=workdir,
                          capture_output=True, text=True, check=True).stdout
    assert "pkg://tllab.configs" in info
    run_dir = tmp_path / "run"
    out = subprocess.run([str(script), "trainer.max_steps=2", "trainer.quiet=true", f"hydra.run.dir={run_dir}"],
                         env=env, cwd=workdir, capture_output=True, text=True, check=True).stdout
    assert "target_test/acc" in out
    assert (run_dir / "done").exists() and (run_dir / "config.yaml").exists()

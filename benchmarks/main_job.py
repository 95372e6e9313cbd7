"""Wall time of the README's main job (`tllab-train experiment=digits_source_only`).

Runs the console command twice in fresh processes — with an empty digits cache (domains are
built) and with the cache filled — and writes the timings and accuracies to
``benchmarks/main_job.md``. Usage: ``.venv/bin/python benchmarks/main_job.py``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]


def run(cache: Path, run_dir: Path) -> tuple[float, dict]:
    env = {**os.environ, "TLLAB_CACHE_DIR": str(cache), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tllab.train", "experiment=digits_source_only", "trainer.quiet=true",
                    f"hydra.run.dir={run_dir}"], env=env, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start, json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cold, summary = run(tmp / "cache", tmp / "cold")
        warm, summary_warm = run(tmp / "cache", tmp / "warm")
    assert summary["final"] == summary_warm["final"], "the two runs should be identical"
    f = summary["final"]
    lines = [
        "# Main job timing",
        "",
        f"`tllab-train experiment=digits_source_only` ({summary['steps']} steps, batch 64, digits CNN), "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "| cache | wall time (s, whole process) | training time (s) | source_test/acc | target_test/acc |",
        "|---|---|---|---|---|",
        f"| empty (domains built) | {cold:.1f} | {summary['time']:.1f} | {f['source_test/acc']:.4f} "
        f"| {f['target_test/acc']:.4f} |",
        f"| filled | {warm:.1f} | {summary_warm['time']:.1f} | {f['source_test/acc']:.4f} "
        f"| {f['target_test/acc']:.4f} |",
        "",
        "Target of the foundation issue: under 2 minutes on 2 CPU cores, set-up excluded.",
    ]
    out = Path(__file__).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()

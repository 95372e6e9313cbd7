"""Time and memory to index a DomainNet-sized image list (600,000 lines).

Writes a synthetic tllib-format list shaped like DomainNet's (``real/<class>/real_<n>_<m>.jpg <label>``,
345 classes), then, in a fresh process, reads it into a :class:`~tllab.data.files.FileDataset`, splits off
a 10 % validation part per class and takes one sample's path: wall time, the peak of Python's allocations
(``tracemalloc``, numpy arrays included) and the growth of the process's peak RSS. Goal (file datasets
issue): within 5 s and 200 MB.

Usage: ``.venv/bin/python benchmarks/image_index.py [--lines 600000]``; writes ``benchmarks/image_index.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
import numpy as np
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from tllab.data.files import FileDataset, read_image_list
from tllab.data.transforms import ImageTransform
from tllab.data import _split_per_class
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[2] == "memory":  # tracing slows allocation down: timed runs go untraced
    tracemalloc.start()
start = time.perf_counter()
index = read_image_list(Path(sys.argv[1]), Path(sys.argv[1]).parent)
ds = FileDataset(index, np.zeros(len(index.targets), np.int64), ImageTransform("tllib", 224))
read = time.perf_counter() - start
keep, val = _split_per_class(ds.targets, lambda n: round(0.1 * n), np.random.default_rng(0))
train = ds.subset(keep)
path = train.path(len(train) - 1)
total = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1]
rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"samples": len(ds), "train": len(train), "read_s": read, "total_s": total,
                  "traced_peak_mb": peak / 2**20, "rss_growth_mb": (rss2 - rss1) / 1024, "path": path}))
"""


def write_list(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            label = i % 345
            f.write(f"real/class_name_{label:03d}/real_{label:03d}_{i:06d}.jpg {label}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=600_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        list_file = Path(tmp) / "real_train.txt"
        write_list(list_file, args.lines)
        size_mb = list_file.stat().st_size / 2**20
        def child(mode: str) -> dict:
            return json.loads(subprocess.run([sys.executable, "-c", CHILD, str(list_file), mode], check=True,
                                             capture_output=True, text=True).stdout)

        runs = [child("time") for _ in range(args.repeats)]
        memory = child("memory")
    best = min(runs, key=lambda r: r["total_s"])

    def each(key: str) -> str:
        return ", ".join(f"{r[key]:.2f}" for r in runs)

    lines = [
        "# Indexing a DomainNet-sized image list",
        "",
        f"`benchmarks/image_index.py --lines {args.lines}`: a {size_mb:.0f} MB list of {args.lines:,} lines; read "
        "into a FileDataset, a 10 % per-class validation split taken, one path read back; each of "
        f"{args.repeats} timed runs in a fresh process (and one more, traced, for the allocations). "
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}.",
        "",
        "| | fastest run | all runs | goal |",
        "|---|---|---|---|",
        f"| read the list (s) | {best['read_s']:.2f} | {each('read_s')} | |",
        f"| read + split + subset (s) | {best['total_s']:.2f} | {each('total_s')} | <= 5 |",
        f"| peak Python allocations (MB, tracemalloc, one traced run) | {memory['traced_peak_mb']:.0f} | | <= 200 |",
        f"| peak RSS growth (MB) | {best['rss_growth_mb']:.0f} | {each('rss_growth_mb')} | |",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

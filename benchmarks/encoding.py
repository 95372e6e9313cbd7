"""Encoding layer forward+backward: tllab's matrix-product form against the naive formula.

Deep-TEN's head size (B=32, N=28x28, D=128, K=32), float32 on CPU, 2 threads. Three variants:
``tllab.nn.Encoding`` (custom autograd Function), autograd on the same matrix-product expressions
(why the Function exists), and the defining formula on the (B, N, K, D) residual tensor. Goal: at
most 0.3x the naive time and 0.1x its peak memory.

Method. Every measurement runs in a fresh spawned process. Time: one untimed pass, then the
median of ``repeats`` timed passes. Peak memory, in a separate process: glibc's mmap threshold
is fixed at 64 KiB (``mallopt``), so every allocation of 64 KiB or more is its own mmap, unmapped
on free, and the resident set follows live tensor memory (the default dynamic threshold keeps
freed blocks up to 32 MiB in the heap; the fixed one also slows allocation, hence the separate
process). After one untimed pass the process reads its RSS, resets its peak RSS (``echo 5 >
/proc/self/clear_refs``, Linux), runs one pass and reads ``VmHWM``: peak memory is the
high-water mark minus the RSS before the pass, i.e. everything a forward+backward allocates on
top of inputs and parameters (tensors saved for backward, temporaries, gradients). A round
measures each variant once, one process after the other; ratios to naive are taken within a
round (neighbours in time share the machine's load), and the median over rounds is reported
with the range.
Usage: ``.venv/bin/python benchmarks/encoding.py [rounds] [repeats]``; writes ``benchmarks/encoding.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from tllab.nn import Encoding
from tllab.nn.encoding import encoding

B, H, W, D, K = 32, 28, 28, 128, 32
THREADS = 2
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def autograd_encoding(x: Tensor, codewords: Tensor, scale: Tensor) -> Tensor:
    """tllab's expressions, differentiated by autograd."""
    f = x.flatten(2)
    dist = f.square().sum(1, keepdim=True) - 2 * (codewords @ f) + codewords.square().sum(1)[:, None]
    assign = torch.softmax(scale[:, None] * dist, dim=1)
    return assign @ f.transpose(1, 2) - assign.sum(2, keepdim=True) * codewords


def naive_encoding(x: Tensor, codewords: Tensor, scale: Tensor) -> Tensor:
    """The defining formula on the full (B, N, K, D) residual tensor."""
    residuals = x.flatten(2).transpose(1, 2).unsqueeze(2) - codewords
    assign = torch.softmax(scale * residuals.pow(2).sum(-1), dim=2)
    return (assign.unsqueeze(-1) * residuals).sum(1)


VARIANTS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "tllab.nn.Encoding": encoding,
    "autograd on the same expressions": autograd_encoding,
    "naive (B×N×K×D residuals)": naive_encoding,
}


def _status_kib(field: str) -> int:
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field))
    return int(line.split()[1])


def _warm_step(name: str) -> Callable[[], float]:
    """One variant's timed forward+backward on fresh inputs, after an untimed first pass."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    layer = Encoding(D, K)
    x = torch.randn(B, D, H, W, requires_grad=True)
    grad = torch.randn(B, K, D)
    fn = VARIANTS[name]

    def step() -> float:
        start = time.perf_counter()
        fn(x, layer.codewords, layer.scale).backward(grad)
        end = time.perf_counter()
        for p in (x, layer.codewords, layer.scale):
            p.grad = None
        return end - start

    step()
    return step


def median_seconds(name: str, repeats: int) -> float:
    step = _warm_step(name)
    return statistics.median(step() for _ in range(repeats))


def peak_mib(name: str) -> float:
    """Peak RSS of one pass above the RSS before it; run in a process of its own (see above)."""
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    step = _warm_step(name)
    before = _status_kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return (_status_kib("VmHWM:") - before) / 1024


def main(rounds: int = 5, repeats: int = 5) -> None:
    spawn = multiprocessing.get_context("spawn")
    load_before = os.getloadavg()
    runs: list[dict[str, tuple[float, float]]] = []  # per round: variant -> (peak MiB, time s)
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for _ in range(rounds):
            futures = {name: (pool.submit(peak_mib, name), pool.submit(median_seconds, name, repeats))
                       for name in VARIANTS}
            runs.append({name: (peak.result(), secs.result()) for name, (peak, secs) in futures.items()})
    load_after = os.getloadavg()
    naive = "naive (B×N×K×D residuals)"
    rows = ["| variant | fwd+bwd time (ms) | time / naive | peak memory (MiB) | memory / naive |",
            "|---|---|---|---|---|"]
    for name in VARIANTS:
        times = [run[name][1] / run[naive][1] for run in runs]
        peaks = [run[name][0] / run[naive][0] for run in runs]
        ms = 1e3 * statistics.median(run[name][1] for run in runs)
        mib = statistics.median(run[name][0] for run in runs)
        rows.append(f"| {name} | {ms:.1f} | {statistics.median(times):.3f}x ({min(times):.3f}-{max(times):.3f}) "
                    f"| {mib:.1f} | {statistics.median(peaks):.4f}x ({min(peaks):.4f}-{max(peaks):.4f}) |")
    residual_mib = B * H * W * K * D * 4 / 2**20
    text = "\n".join([
        "# Encoding layer: forward+backward time and peak memory vs the naive formula", "",
        f"`.venv/bin/python benchmarks/encoding.py {rounds} {repeats}` — B={B}, N={H}x{W}, D={D}, K={K}, float32, "
        f"CPU, {THREADS} threads, torch {torch.__version__}. Time: median of {repeats} passes after an untimed "
        f"one; peak memory: one pass after an untimed one, in another process; {rounds} rounds of fresh processes "
        "per variant; ratios are taken within a round, median (min-max) over rounds.", "",
        *rows, "",
        "Peak memory: peak RSS during one forward+backward minus the RSS before it, in a fresh process with "
        "glibc's mmap threshold fixed at 64 KiB (see the script's docstring); inputs and parameters are not counted, "
        f"the input gradient ({B * D * H * W * 4 / 2**20:.1f} MiB) is. One (B, N, K, D) float32 tensor is "
        f"{residual_mib:.0f} MiB; tllab's largest intermediates are (B, K, N), {B * K * H * W * 4 / 2**20:.1f} MiB.",
        "",
        f"Shared machine: load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the run on "
        f"{os.cpu_count()} cores, so absolute times vary between runs; the ratios are the comparison.",
        "", "Goal: at most 0.3x the naive time and 0.1x its peak memory.", ""])
    Path(__file__).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

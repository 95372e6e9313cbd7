"""Forward+backward time of each normalization layer against ``nn.BatchNorm2d`` on the same tensor.

A 64x64x32x32 float32 tensor on CPU (``torch.set_num_threads(2)``), training mode. Each round
times a block of ``BLOCK`` BatchNorm2d forward+backward passes right before a block of each
layer's; a layer's ratio is the median over ``rounds`` rounds (after warm-up) of its block median
over that BatchNorm2d block median. Pairing cancels the slow drifts of a shared machine (absolute
times swing by a third between runs), and blocks keep the allocator in one steady state (strictly
alternating two identical BatchNorms reads 1.4x, from glibc's handling of the 16 MB tensors). A
second BatchNorm2d is timed like the layers as a control: its ratio shows the remaining noise.
Targets of the normalization issue: every layer at most 1.5x, StochNorm at most 1.2x.
Writes ``benchmarks/norm_layers.md``.
Usage: ``.venv/bin/python benchmarks/norm_layers.py [rounds]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import torch
from torch import nn

from tllab.norm.bin import BatchInstanceNorm2d
from tllab.norm.cnsn import CNSN, CrossNorm, SelfNorm
from tllab.norm.domainnorm import DomainNorm
from tllab.norm.ibn import InstanceBatchNorm2d
from tllab.norm.mixstyle import MixStyle
from tllab.norm.stochnorm import StochNorm2d

SHAPE = (64, 64, 32, 32)
BLOCK = 5
C = SHAPE[1]


def _active(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, CrossNorm):
            m.active = True
    return module


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "StochNorm2d (p=0.5)": lambda: StochNorm2d(C, p=0.5),
    "BatchInstanceNorm2d (BIN)": lambda: BatchInstanceNorm2d(C),
    "InstanceBatchNorm2d (IBN-a, ratio 0.5)": lambda: InstanceBatchNorm2d(C, 0.5),
    "DomainNorm": lambda: DomainNorm(C),
    "MixStyle (p=1, random)": lambda: MixStyle(p=1.0),
    "CrossNorm (active, crop neither)": lambda: _active(CrossNorm()),
    "SelfNorm": lambda: SelfNorm(C),
    "CNSN (CrossNorm active + SelfNorm)": lambda: _active(CNSN(C)),
}


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).backward(grad)
    end = time.perf_counter()
    x.grad = None
    return end - start


def main(rounds: int = 30) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(*SHAPE, requires_grad=True)
    grad = torch.randn(*SHAPE)
    baseline = nn.BatchNorm2d(C).train()
    layers = {"BatchNorm2d (control)": nn.BatchNorm2d(C).train()} | {
        name: make().train() for name, make in LAYERS.items()}
    for layer in [baseline, *layers.values()]:  # warm-up (allocator, kernel compilation)
        for _ in range(3):
            step(layer, x, grad)
    times: dict[str, list[float]] = {name: [] for name in layers}
    ratios: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            base = statistics.median(step(baseline, x, grad) for _ in range(BLOCK))
            times[name].append(statistics.median(step(layer, x, grad) for _ in range(BLOCK)))
            ratios[name].append(times[name][-1] / base)
    rows = ["| layer | median fwd+bwd (ms) | ratio to BatchNorm2d |", "|---|---|---|"]
    for name in layers:
        rows.append(f"| {name} | {1e3 * statistics.median(times[name]):.2f} | {statistics.median(ratios[name]):.2f}x |")
    text = "\n".join([
        "# Normalization layers: forward+backward time vs BatchNorm2d", "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/norm_layers.py', str(rounds)])}` — input "
        f"{'x'.join(map(str, SHAPE))} float32, CPU, 2 threads, training mode; ratio = median over {rounds} "
        f"rounds of the layer's median time over {BLOCK} passes / BatchNorm2d's over {BLOCK} passes just "
        f"before (torch {torch.__version__}, numba {numba.__version__}).", "",
        *rows, "",
        "Targets: every layer at most 1.5x BatchNorm2d, StochNorm at most 1.2x.", ""])
    Path(__file__).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

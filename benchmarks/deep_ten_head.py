"""Deep TEN head against the linear head: training-step time of a classifier on the same backbone.

One step = forward, cross-entropy, backward and an SGD update on a synthetic batch, for
``Classifier(backbone, head="linear")`` and ``Classifier(backbone, head="encoding")`` (1x1 conv to
128 channels, BN, ReLU, Encoding(128, 32), L2-normalise, linear). Steps alternate between the two
models so load on a shared machine hits both alike; the median of each is reported. The goal is
that the encoding head costs <= 1.1x the linear head's step on resnet18 at 64 px.

    python benchmarks/deep_ten_head.py                     # CPU: resnet18, 64 px, batch 32
    python benchmarks/deep_ten_head.py --device cuda --batch 128 --size 224
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from tllab.models import Classifier, create_backbone


def step_time(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits, _ = model(x)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(logits, y).backward()
    opt.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {head: Classifier(create_backbone("torchvision", args.backbone), 100, head=head).to(device)
              for head in ("linear", "encoding")}
    opts = {head: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for head, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    times: dict[str, list[float]] = {head: [] for head in models}
    for i in range(args.steps + 5):
        for head, model in models.items():
            t = step_time(model, opts[head], x, y)
            if i >= 5:  # warm-up steps left out
                times[head].append(t)
    linear, encoding = (statistics.median(times[h]) for h in ("linear", "encoding"))
    print(f"# Deep TEN head vs linear head: {args.backbone}, {args.size} px, batch {args.batch}, {args.device}")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.steps} alternating steps after 5 warm-up steps.\n")
    print("| head | step (ms) | vs linear |\n|---|---|---|")
    print(f"| linear | {1000 * linear:.1f} | 1.00x |")
    print(f"| encoding (D=128, K=32) | {1000 * encoding:.1f} | {encoding / linear:.2f}x |")


if __name__ == "__main__":
    main()

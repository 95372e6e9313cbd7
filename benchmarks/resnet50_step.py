"""ResNet-50 training step: tllab's trainer against a bare PyTorch loop on the same model and batch.

The trainer runs its real step (loader, transfer to the device, forward, cross-entropy, backward,
non-finite check, optimizer and scheduler, bookkeeping) on a dataset of the requested kind; the
bare loop trains a torchvision ResNet-50 plus a linear head with SGD on one synthetic batch that
never leaves the device. Both use the same batch size, resolution, dtype, AMP and memory format.
The ratio (tllab images/s over bare images/s) is the trainer's efficiency; the goal is >= 0.95.

    python benchmarks/resnet50_step.py                               # CPU, digits resized to 224 px
    python benchmarks/resnet50_step.py --device cuda --batch 128 --amp --data files --workers 16
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tllab.models import Classifier, create_backbone


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def image_list(root: Path, n: int, classes: int = 31) -> list[str]:
    """``n`` random 256x256 JPEGs in an image list, for the file pipeline (decode + augmentation)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = root / f"img_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
        rows.append(f"{path.name} {i % classes}\n")
    (root / "train.txt").write_text("".join(rows))
    return [f"dataset.root={root}", "dataset=image_list", "dataset.source=[train.txt]", "dataset.target=[train.txt]",
            f"dataset.num_classes={classes}", "dataset.setting=dg", "dataset.val_fraction=0.05"]


def tllab_images_per_second(args: argparse.Namespace, data: list[str]) -> float:
    from hydra import compose, initialize_config_module

    from tllab.schema import register_configs
    from tllab.train import resolve_config
    from tllab.trainer import Trainer

    register_configs()
    overrides = ["backbone=resnet50", "optim=sgd", "optim.scheduler.name=none", f"trainer.batch_size={args.batch}",
                 f"trainer.device={args.device}", f"trainer.amp={args.amp}", "trainer.quiet=true",
                 f"trainer.channels_last={args.channels_last}", f"trainer.num_workers={args.workers}",
                 "dataset.image_size=224", "trainer.eval_every=100000", "trainer.max_steps=100000", *data]
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        cfg, resolved = resolve_config(compose("train", overrides=overrides))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), resolved)
        trainer.model.train()
        for _ in range(args.warmup):
            trainer.train_step()
            trainer.step += 1
        sync(trainer.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            terms, acc = trainer.train_step()
            trainer.step += 1
            _ = {k: v.item() for k, v in {**terms, "acc": acc}.items()}  # the trainer's per-step bookkeeping
        sync(trainer.device)
        seconds = time.perf_counter() - start
        trainer.source_loader.close()
    return args.steps * args.batch / seconds


def bare_images_per_second(args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = Classifier(create_backbone("torchvision", "resnet50"), 10).to(device, memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 224, 224, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x)[0].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--data", choices=["digits", "files"], default="digits",
                        help="digits: in-memory 32 px digits resized to 224; files: JPEGs decoded and augmented")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        data = image_list(Path(tmp), 64 * args.batch // 16 + 256) if args.data == "files" else []
        tllab, bare = [], []
        for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
            bare.append(bare_images_per_second(args))
            tllab.append(tllab_images_per_second(args, data))
    t, b = max(tllab), max(bare)
    print(f"| {platform.processor() or platform.machine()} {torch.get_num_threads()} threads | {args.device} | "
          f"batch {args.batch} | amp {args.amp} | channels_last {args.channels_last} | data {args.data} "
          f"({args.workers} workers) | tllab {t:.1f} img/s | bare {b:.1f} img/s | ratio {t / b:.3f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

"""Images/s of decode + tllib's training transform at 224 px: tllab's file datasets against
``torchvision.datasets.ImageFolder`` with the same transforms (PIL), through a DataLoader, on the
same JPEG files, side by side.

Both pipelines: Resize(256, 256) -> RandomResizedCrop(224) -> RandomHorizontalFlip -> float,
ImageNet-normalised, batches of 64. tllab decodes with torchvision's libjpeg-turbo into ``uint8``
tensors and transforms them with ``transforms.v2`` (seeded per sample); torchvision's
``ImageFolder`` decodes with PIL, transforms PIL images and converts with ``ToTensor``.

The images are photo crops (scikit-image's bundled photos, random crops resized to about 400x300,
JPEG quality 90, like Office-31/Office-Home images). Each round times both pipelines at every
worker count, alternating which goes first; a timing is the steady-state rate over ``--batches``
batches after the first (worker start-up excluded for both). The table gives the median over rounds.

Usage: ``.venv/bin/python benchmarks/image_loading.py [--images 768] [--rounds 3] [--workers 0,1,2]``;
writes ``benchmarks/image_loading.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_images(root: Path, n: int, classes: int = 8) -> None:
    import skimage.data

    photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in
              ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = (int(rng.integers(360, 440)), int(rng.integers(280, 330)))
        img = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BILINEAR)
        path = root / f"class_{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)


def tllab_loader(root: Path, workers: int):
    from tllab.data.files import FileDataset, class_folders, scan_image_folder
    from tllab.data.loaders import ForeverLoader
    from tllab.data.transforms import ImageTransform

    index = scan_image_folder(root, class_folders(root))
    ds = FileDataset(index, np.zeros(len(index.targets), np.int64), ImageTransform("tllib", 224)).augmented()
    return iter(ForeverLoader(ds, 64, seed=0, num_workers=workers))


def torchvision_loader(root: Path, workers: int):
    import torchvision.transforms as T

    transform = T.Compose([T.Resize((256, 256)), T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    ds = torchvision.datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)

    def forever():
        while True:
            yield from loader

    return forever()


def rate(make, root: Path, workers: int, batches: int) -> float:
    it = make(root, workers)
    x = next(it)[0]  # start-up: workers, first decode
    assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    del it
    return batches * 64 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    pipelines = {"tllab": tllab_loader, "torchvision ImageFolder": torchvision_loader}
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        make_images(root, args.images)
        for r in range(args.rounds):
            for w in workers:
                order = list(pipelines) if (r + w) % 2 == 0 else list(pipelines)[::-1]
                for name in order:
                    results.setdefault((name, w), []).append(rate(pipelines[name], root, w, args.batches))
                    print(f"round {r} workers {w} {name}: {results[(name, w)][-1]:.0f} images/s", flush=True)
    lines = [
        "# Image loading: decode + tllib train transform at 224 px",
        "",
        f"`benchmarks/image_loading.py --images {args.images} --batches {args.batches} --rounds {args.rounds}`: "
        f"{args.images} JPEGs of about 400x300, batches of 64; {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, Python {platform.python_version()}. Median images/s over {args.rounds} "
        "rounds (each round runs both pipelines side by side at every worker count).",
        "",
        "| workers | tllab (images/s) | torchvision ImageFolder (images/s) | tllab / torchvision |",
        "|---|---|---|---|",
    ]
    for w in workers:
        ours, theirs = (statistics.median(results[(n, w)]) for n in pipelines)
        lines.append(f"| {w} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""In-memory image datasets with vectorised batch fetching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


def _identity(batch):
    return batch


class ArrayDataset(Dataset):
    r"""Images held as a ``uint8`` array, served as normalised float tensors.

    Each sample is ``(x, y, d)``: the image :math:`(3, S, S)` scaled to :math:`[0, 1]`, resized to
    ``image_size`` (bilinear) and normalised with ``(x - mean) / std``; the class label; the
    domain index. A DataLoader fetches whole batches at once through ``__getitems__``.

    Args:
        images: ``uint8`` array :math:`(N, H, W, 3)`.
        targets: class labels :math:`(N,)` (``-1`` marks unlabelled data).
        domains: domain index of each image :math:`(N,)`.
        image_size: output side length.
        mean, std: per-channel normalisation.

    Example:
        >>> ds = ArrayDataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4), np.zeros(4, int), 32)
        >>> ds.__getitems__([0, 1])[0].shape
        torch.Size([2, 3, 32, 32])
    """

    collate_fn = staticmethod(_identity)

    def __init__(self, images: np.ndarray, targets: np.ndarray, domains: np.ndarray, image_size: int,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.domains = np.asarray(domains, dtype=np.int64)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, d = self.__getitems__([index])
        return x[0], y[0], d[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std, torch.from_numpy(self.targets[idx]), torch.from_numpy(self.domains[idx])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.images[indices], self.targets[indices], self.domains[indices],
                            self.image_size, self.mean, self.std)

    def unlabeled(self) -> ArrayDataset:
        """The same images with every label replaced by -1 (no label can leak into training)."""
        return ArrayDataset(self.images, np.full_like(self.targets, -1), self.domains,
                            self.image_size, self.mean, self.std)

    @staticmethod
    def concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
        first = parts[0]
        return ArrayDataset(np.concatenate([p.images for p in parts]), np.concatenate([p.targets for p in parts]),
                            np.concatenate([p.domains for p in parts]), first.image_size, first.mean, first.std)

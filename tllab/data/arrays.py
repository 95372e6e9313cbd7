"""In-memory image datasets with vectorised batch fetching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tllab.data.base import ImageSet, to_model_input


class ArrayDataset(ImageSet):
    r"""Images held as a ``uint8`` array, served as normalised float tensors.

    Each sample is ``(x, y, d)``: the image :math:`(3, S, S)` as :func:`~tllab.data.base.to_model_input`
    makes it (scaled to :math:`[0, 1]`, resized to ``image_size``, normalised); the class label; the
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

    def __init__(self, images: np.ndarray, targets: np.ndarray, domains: np.ndarray, image_size: int,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.domains = np.asarray(domains, dtype=np.int64)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        x = to_model_input(torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2), self.image_size, self.mean,
                           self.std)
        return x, torch.from_numpy(self.targets[idx]), torch.from_numpy(self.domains[idx])

    def _take(self, indices: np.ndarray) -> ArrayDataset:
        return self._replace(images=self.images[indices], targets=self.targets[indices],
                             domains=self.domains[indices])

    @staticmethod
    def concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
        return parts[0]._replace(images=np.concatenate([p.images for p in parts]),
                                 targets=np.concatenate([p.targets for p in parts]),
                                 domains=np.concatenate([p.domains for p in parts]))

"""What every dataset of a domain provides: labels, domain indices, subsets, and batches of
normalised float images."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

S = TypeVar("S", bound="ImageSet")


def _identity(batch):
    return batch


def to_model_input(images: Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    r"""``uint8`` images :math:`(N, 3, H, W)` as the model's input: scaled to :math:`[0, 1]`, resized to
    ``image_size`` (bilinear, only when the size differs; antialiased when it shrinks) and normalised,
    :math:`(x / 255 - mean) / std`, as one contiguous ``float32`` NCHW tensor (whatever the source layout,
    so that the same pixels give the same convolution numerics).

    Example:
        >>> to_model_input(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), 2, [0.5] * 3, [0.5] * 3).max()
        tensor(1.)
    """
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    x = images.contiguous().float()
    if x.shape[-2:] == (image_size, image_size):  # one fused pass: x * (1 / (255 std)) - mean / std
        return x.mul_(1 / (255 * std_t)).sub_(mean_t / std_t)
    x = F.interpolate(x.div_(255), size=image_size, mode="bilinear", align_corners=False,
                      antialias=max(x.shape[-2:]) > image_size)
    return (x - mean_t) / std_t


class ImageSet(Dataset):
    """Labelled images of one or more domains, served in whole batches.

    A DataLoader calls ``__getitems__(indices)`` once per batch (``collate_fn`` is the identity) and
    gets ``(x, y, d)``: float images :math:`(B, 3, S, S)`, labels (``-1``: unlabelled) and domain
    indices. Subclasses store the images (:class:`~tllab.data.arrays.ArrayDataset` in memory,
    :class:`~tllab.data.files.FileDataset` as files) and implement ``_take``, ``concat`` and
    ``__getitems__``. ``augment`` switches a set's random training transforms on (file datasets; the
    in-memory digits have none).
    """

    collate_fn = staticmethod(_identity)
    targets: np.ndarray
    domains: np.ndarray
    augment: bool = False
    default_workers: int = 0  # DataLoader workers when trainer.num_workers is null

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, d = self.__getitems__([index])
        return x[0], y[0], d[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _take(self: S, indices: np.ndarray) -> S:
        raise NotImplementedError

    def subset(self: S, indices: np.ndarray) -> S:
        """The samples at ``indices`` (in that order)."""
        return self._take(np.asarray(indices, dtype=np.int64))

    def _replace(self: S, **attrs) -> S:
        new = copy.copy(self)
        new.__dict__.update(attrs)
        return new

    def unlabeled(self: S) -> S:
        """The same images with every label replaced by -1 (no label can leak into training)."""
        return self._replace(targets=np.full_like(self.targets, -1))

    def with_domain(self: S, index: int) -> S:
        """The same images, all with domain index ``index``."""
        return self._replace(domains=np.full(len(self), index, dtype=np.int64))

    def augmented(self: S, on: bool = True) -> S:
        """The same images with the random training transforms on (or off)."""
        return self._replace(augment=on)

    @staticmethod
    def concat(parts: Sequence[S]) -> S:
        return type(parts[0]).concat(parts)

r"""Transform presets of file datasets (``dataset.transform``), on ``uint8`` tensors with
``torchvision.transforms.v2``.

======  ==============================================================  ===========================
preset  training (``augment``)                                          evaluation
======  ==============================================================  ===========================
tllib   Resize(R, R) -> RandomResizedCrop(S, scale) -> HFlip            Resize(R, R) -> CenterCrop(S)
        (-> ColorJitter(0.5, 0.5, 0.5, 0.5) with ``color_jitter``)
resize  resize to (S, S), as the embedded digits                        the same
======  ==============================================================  ===========================

``S`` is ``dataset.image_size`` and ``R`` is ``dataset.resize_size`` (default ``round(S * 256 / 224)``:
tllib's 256 for 224); ``scale`` is ``dataset.crop_scale`` (tllib: (0.08, 1) for domain adaptation,
(0.2, 1) for fine-tuning). tllib's ``ResizeImage(256)`` resizes to a 256x256 square, and so does this.
The result is normalised with ``dataset.mean``/``dataset.std`` by
:func:`~tllab.data.base.to_model_input`, exactly as the in-memory digits are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tllab.data.base import to_model_input

PRESETS = ("tllib", "resize")


class ImageTransform:
    """``transform(image, seed)`` transforms one image; ``transform.batch(images)`` makes the model input.

    Args:
        preset: ``tllib`` or ``resize`` (see the module docstring).
        image_size: output side ``S``.
        resize_size: side ``R`` of the first resize (``tllib``); ``None``: ``round(S * 256 / 224)``.
        crop_scale: range of the crop's area fraction (``tllib`` training).
        color_jitter: add ``ColorJitter(0.5, 0.5, 0.5, 0.5)`` after the flip (``tllib`` training).
        mean, std: per-channel normalisation.

    Calling it with ``seed=None`` gives the evaluation transform; with an integer seed, the training
    transform with every random draw taken from a generator seeded by ``seed`` (the global RNG
    state is left as it was).

    Shape:
        ``transform``: ``uint8`` :math:`(3, H, W)` in, ``uint8`` :math:`(3, S, S)` out (``resize``: the image
        as it is). ``batch``: a list of those in, ``float32`` :math:`(N, 3, S, S)` out.

    Example:
        >>> t = ImageTransform("tllib", 224)
        >>> t.batch([t(torch.zeros(3, 300, 400, dtype=torch.uint8), seed=1)]).shape
        torch.Size([1, 3, 224, 224])
    """

    def __init__(self, preset: str, image_size: int, resize_size: int | None = None,
                 crop_scale: Sequence[float] = (0.08, 1.0), color_jitter: bool = False,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown transform preset {preset!r}; use one of {PRESETS}")
        self.preset, self.image_size = preset, image_size
        self.resize_size = resize_size or round(image_size * 256 / 224)
        self.crop_scale, self.color_jitter = tuple(crop_scale), color_jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self._train: Callable[[Tensor], Tensor] | None = None
        self._eval: Callable[[Tensor], Tensor] | None = None

    def _build(self) -> None:
        from torchvision.transforms import v2

        size = (self.resize_size, self.resize_size)
        train = [v2.Resize(size, antialias=True),
                 v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True),
                 v2.RandomHorizontalFlip()]
        if self.color_jitter:
            train.append(v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.5))
        self._train = v2.Compose(train)
        self._eval = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(self.image_size)])

    def __call__(self, image: Tensor, seed: int | None = None) -> Tensor:
        if self.preset == "resize":
            return image  # resized with the batch, in float, as the in-memory digits are
        if self._train is None:
            self._build()
        if seed is None:
            return self._eval(image)
        with torch.random.fork_rng(devices=[]):  # the CPU generator, which v2 transforms draw from
            torch.random.default_generator.manual_seed(seed)
            return self._train(image)

    def batch(self, images: list[Tensor]) -> Tensor:
        """Normalised float images :math:`(N, 3, S, S)` (one pass when they all have the output size)."""
        size = (self.image_size, self.image_size)
        if all(img.shape[-2:] == size for img in images):
            return to_model_input(torch.stack(images), self.image_size, self.mean, self.std)
        return torch.cat([to_model_input(img[None], self.image_size, self.mean, self.std) for img in images])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_train": None, "_eval": None}  # rebuilt in each DataLoader worker

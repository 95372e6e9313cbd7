r"""Image files as a dataset: compact indexes, decoding on demand, seeded augmentation.

A :class:`FileDataset` holds no pixels: only each image's path (packed in one byte array, see
:class:`PathTable`), label, domain and where it came from (list file and line). A DataLoader
worker reads and decodes a batch's files (torchvision's libjpeg-turbo / libpng / libwebp decoders,
PIL for the other formats), applies the transform preset (:mod:`tllab.data.transforms`) on
``uint8`` tensors and returns normalised float images, like the in-memory
:class:`~tllab.data.arrays.ArrayDataset`.

Random transforms draw from a generator seeded per sample by the loader's seed and the sample's
position in the loader's stream (:class:`~tllab.data.loaders.Batch`), so augmentation is the same
for any number of workers or ranks and a resumed run continues it exactly.

List format (tllib's ``ImageList``): one sample a line, ``<path> <label>``; the label is the last
whitespace-separated token, the path is the rest of the line (spaces allowed); relative paths are
joined to the dataset root; blank lines are ignored.
"""

from __future__ import annotations

import array
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tllab.data.base import ImageSet
from tllab.data.loaders import sample_seed
from tllab.data.transforms import ImageTransform
from tllab.errors import DataError

# torchvision.datasets.folder's list (not imported from there: torchvision takes ~1.7 s to import)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = ["IMG_EXTENSIONS", "FileDataset", "ImageIndex", "PathTable", "label_problems", "read_image",
           "read_image_list", "scan_image_folder"]

log = logging.getLogger(__name__)

# Decoded by torchvision (libjpeg-turbo, libpng, libwebp, giflib) straight into uint8 tensors.
_TORCHVISION_FORMATS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


class PathTable:
    """Strings packed in one ``uint8`` array with ``int64`` offsets.

    A 600k-line list costs two arrays instead of 600k Python strings, and DataLoader workers share
    the arrays' pages (touching a Python object writes its reference count and copies its page).

    Example:
        >>> t = PathTable.from_bytes([b"a/1.jpg", b"b c/2.png"])
        >>> t[1], len(t)
        ('b c/2.png', 2)
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_bytes(cls, items: Sequence[bytes]) -> PathTable:
        return cls.from_chunks([items])

    @classmethod
    def from_chunks(cls, chunks: Iterable[Sequence[bytes]]) -> PathTable:
        """Build from successive chunks of strings (only one chunk is ever held as Python objects)."""
        blobs, lengths = [], []
        for items in chunks:
            blobs.append(b"".join(items))
            lengths.append(np.fromiter(map(len, items), dtype=np.int64, count=len(items)))
        offsets = np.zeros(sum(map(len, lengths)) + 1, np.int64)
        np.cumsum(np.concatenate(lengths) if lengths else [], out=offsets[1:])
        return cls(np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())


@dataclass(frozen=True)
class ImageIndex:
    """The files of one list or folder: paths (relative to ``root`` unless absolute), labels, and
    the list line each came from (``0`` for a folder)."""

    root: str
    source: str  # the list file or folder, for messages
    paths: PathTable
    targets: np.ndarray
    lines: np.ndarray


def read_image_list(list_file: Path, root: Path, problems: list[tuple[int, str]] | None = None,
                    label_offset: int = 0) -> ImageIndex:
    """Parse a tllib-format list (see the module docstring).

    Args:
        list_file: the list.
        root: the folder relative image paths are joined to.
        problems: collect ``(line, message)`` for every malformed line here and go on, instead of
            raising at the first (``tllab-data check``).
        label_offset: the first label of the list (1 for lists that count from 1); labels are shifted so
            that it becomes 0.

    Raises:
        DataError: the file is missing or empty, or a line has no integer label (names the line).
    """
    if not list_file.is_file():
        raise DataError(f"image list {list_file} does not exist; check dataset.root ({root}) and dataset.domains, "
                        "or fetch the data with `tllab-data download <dataset>`.")
    labels, lines = array.array("q"), array.array("i")  # compact while the list is read

    def chunks() -> Iterator[list[bytes]]:
        chunk: list[bytes] = []
        with open(list_file, "rb") as f:
            for number, raw in enumerate(f, 1):
                parts = raw.rsplit(None, 1)
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) < label_offset:
                    message = f"is not '<path> <label>': {raw.strip()[:120].decode(errors='replace')!r}"
                    if problems is None:
                        raise DataError(f"{list_file} line {number} {message}; fix the line (the label is an "
                                        f"integer >= {label_offset}, the last token).")
                    problems.append((number, message))
                    continue
                chunk.append(parts[0].strip())
                labels.append(int(parts[1]) - label_offset)
                lines.append(number)
                if len(chunk) == 65536:
                    yield chunk
                    chunk = []
        yield chunk

    paths = PathTable.from_chunks(chunks())
    if not len(paths) and problems is None:
        raise DataError(f"image list {list_file} holds no samples; it should have one '<path> <label>' a line.")
    return ImageIndex(str(root), str(list_file), paths, np.frombuffer(labels, np.int64),
                      np.frombuffer(lines, np.int32))


def label_problems(index: ImageIndex, num_classes: int, label_offset: int = 0) -> list[tuple[int, str]]:
    """``(line, message)`` for every label of a list beyond the classes (as written in the list)."""
    last = num_classes - 1 + label_offset
    return [(int(index.lines[i]), f"label {index.targets[i] + label_offset} is out of range ({label_offset}..{last})")
            for i in np.flatnonzero(index.targets >= num_classes)]


def class_folders(folder: Path) -> list[str]:
    """The sorted class sub-folders of ``folder`` (as ``torchvision.datasets.ImageFolder`` finds them)."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; it should hold one sub-folder per class.")
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def scan_image_folder(folder: Path, classes: Sequence[str]) -> ImageIndex:
    """The images of ``folder/<class>/**`` for each of ``classes`` (label = position in ``classes``), in
    ``torchvision.datasets.ImageFolder``'s order; extensions as its ``IMG_EXTENSIONS``. A class
    without a folder has no images here."""
    paths: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(folder / name, followlinks=True)):
            rel = os.path.relpath(dirpath, folder)
            for file in sorted(files):
                if file.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.fsencode(os.path.join(rel, file)))
                    labels.append(label)
    n = len(paths)
    return ImageIndex(str(folder), str(folder), PathTable.from_bytes(paths), np.asarray(labels, np.int64),
                      np.zeros(n, np.int32))


def read_image(path: str) -> Tensor:
    """Decode an image file into a ``uint8`` RGB tensor :math:`(3, H, W)`.

    Raises:
        OSError, ValueError, RuntimeError: the file is missing, truncated or not an image.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("the file is empty")
    if path.lower().endswith(_TORCHVISION_FORMATS):
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import to_dtype

        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)  # 16-bit PNG
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def decode_error_reason(exc: Exception) -> str:
    """A decoder error in one clause (torchvision's messages start with their C++ source location)."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1] if ".cpp:" in text else text


class FileDataset(ImageSet):
    """Images read from files, one batch at a time (see the module docstring).

    A sample is a row of one of the dataset's :class:`ImageIndex` (``indexes[index_of[i]]``, row
    ``row[i]``): subsets and concatenations copy two small integer arrays, never the paths.

    Args:
        index: the files, labels and origins of one list or folder.
        domains: domain index of each image.
        transform: the transform preset (train and eval variants).
        skip_bad_images: leave unreadable images out of their batch (logged) instead of raising
            :class:`DataError`.

    Example:
        >>> ds = FileDataset(read_image_list(Path("office31/image_list/webcam.txt"), Path("office31")),
        ...                  np.zeros(795, int), ImageTransform("tllib", 224))            # doctest: +SKIP
        >>> x, y, d = ds.__getitems__([0, 1])                                           # doctest: +SKIP
        >>> x.shape
        torch.Size([2, 3, 224, 224])
    """

    def __init__(self, index: ImageIndex, domains: np.ndarray, transform: ImageTransform,
                 skip_bad_images: bool = False) -> None:
        self.indexes: tuple[ImageIndex, ...] = (index,)
        self.index_of = np.zeros(len(index.targets), np.int16)
        self.row = np.arange(len(index.targets), dtype=np.int64)
        self.targets = index.targets
        self.domains = np.asarray(domains, dtype=np.int64)
        self.transform, self.skip_bad_images = transform, skip_bad_images

    @property
    def default_workers(self) -> int:
        """One worker per CPU thread of this process, at most 8."""
        return max(1, min(8, torch.get_num_threads()))

    def path(self, i: int) -> str:
        index = self.indexes[self.index_of[i]]
        return os.path.join(index.root, index.paths[self.row[i]])

    def describe(self, i: int) -> str:
        """Where sample ``i`` comes from: ``<file> (<list> line <n>)``, or the file alone."""
        index = self.indexes[self.index_of[i]]
        line = int(index.lines[self.row[i]])
        return f"{self.path(i)} ({index.source} line {line})" if line else self.path(i)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        seeds = getattr(indices, "seeds", None)
        images, kept = [], []
        for j, i in enumerate(indices):
            try:
                image = read_image(self.path(i))
            except (OSError, ValueError, RuntimeError) as e:
                if not self.skip_bad_images:
                    raise DataError(f"cannot read image {self.describe(i)}: {decode_error_reason(e)}. Replace or "
                                    "remove it (`tllab-data check` lists every bad file), or set "
                                    "dataset.skip_bad_images=true.") from None
                log.warning("skipped unreadable image %s: %s", self.describe(i), decode_error_reason(e))
                continue
            seed = None if not self.augment else seeds[j] if seeds is not None else sample_seed(-1, int(i))
            images.append(self.transform(image, seed))
            kept.append(i)
        if not images:
            raise DataError(f"no image of a batch of {len(indices)} could be read (e.g. {self.describe(indices[0])}); "
                            "run `tllab-data check` on the dataset.")
        idx = np.asarray(kept, dtype=np.int64)
        return self.transform.batch(images), torch.from_numpy(self.targets[idx]), torch.from_numpy(self.domains[idx])

    def _take(self, indices: np.ndarray) -> FileDataset:
        return self._replace(index_of=self.index_of[indices], row=self.row[indices], targets=self.targets[indices],
                             domains=self.domains[indices])

    @staticmethod
    def concat(parts: Sequence[FileDataset]) -> FileDataset:
        merged: dict[int, ImageIndex] = {}  # each index once (the same list read once is shared)
        for p in parts:
            for index in p.indexes:
                merged.setdefault(id(index), index)
        place = {key: k for k, key in enumerate(merged)}
        remapped = [np.asarray([place[id(i)] for i in p.indexes], np.int16)[p.index_of] for p in parts]
        return parts[0]._replace(indexes=tuple(merged.values()), index_of=np.concatenate(remapped),
                                 row=np.concatenate([p.row for p in parts]),
                                 targets=np.concatenate([p.targets for p in parts]),
                                 domains=np.concatenate([p.domains for p in parts]))

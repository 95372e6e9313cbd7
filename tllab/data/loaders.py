"""Resumable infinite training loaders and sequential evaluation loaders."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from tllab.errors import ConfigError


def sample_seed(stream_seed: int, position: int) -> int:
    """The seed of one sample's random transforms: a hash of its loader's seed and its position in the
    loader's stream (``position < 0``: an evaluation pass over a training set, by index)."""
    digest = hashlib.blake2b(f"{stream_seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Batch(list):
    """A training batch's dataset indices, plus each sample's seed for random transforms.

    A sample's seed is ``sample_seed(stream seed, its position in the stream)``; for
    :class:`InfiniteBatchSampler`, global batch ``b``, rank ``r``, slot ``j`` is position
    ``b * G + r * batch_size + j``. So augmentation does not depend on the number of workers, on which rank
    draws the sample, or on a resume in between.
    """

    def __init__(self, indices: list[int], seeds: list[int]) -> None:
        super().__init__(indices)
        self.seeds = seeds


def _seeds(seed: int, first_position: int, n: int) -> list[int]:
    return [sample_seed(seed, first_position + j) for j in range(n)]


class InfiniteBatchSampler(Sampler[Batch]):
    """An endless stream of shuffled passes over ``range(n)``, cut into batches, sharded by rank.

    Pass ``p`` is ``randperm(n)`` drawn from a generator seeded with ``seed * 1_000_003 + p``; the
    passes are concatenated and global batch ``b`` is elements ``[b * G, (b + 1) * G)`` of that
    stream, ``G = batch_size * world``; rank ``r`` gets the ``r``-th slice of ``batch_size``. So
    the ranks take disjoint slices of the stream, their concatenation is the batch one process with
    ``batch_size * world`` would draw (an index repeats within a batch only where the batch
    spans two passes), batch ``b`` depends only on ``(n, G, seed, b)`` (starting
    at ``start_batch`` reproduces an uninterrupted run), and a set smaller than a batch works.

    Example:
        >>> it = iter(InfiniteBatchSampler(5, 4, seed=0))
        >>> len(next(it)), len(next(it))
        (4, 4)
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        if n <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.seed, self.start_batch = n, seed, start_batch
        self.batch_size, self.shard = batch_size * world, slice(rank * batch_size, (rank + 1) * batch_size)

    def _perm(self, p: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[Batch]:
        for b, indices in enumerate(self._indices(), self.start_batch):
            yield Batch(indices, _seeds(self.seed, b * self.batch_size + self.shard.start, len(indices)))

    def _indices(self) -> Iterator[list[int]]:
        pos = self.start_batch * self.batch_size
        p, offset = divmod(pos, self.n)
        perm = self._perm(p)
        while True:
            batch: list[int] = []
            while len(batch) < self.batch_size:
                take = perm[offset:offset + self.batch_size - len(batch)]
                batch += take
                offset += len(take)
                if offset == self.n:
                    p, offset = p + 1, 0
                    perm = self._perm(p)
            yield batch[self.shard]


class DomainBalancedBatchSampler(Sampler[Batch]):
    """Like :class:`InfiniteBatchSampler`, but every rank's batch holds ``batch_size / D``
    samples of each of the ``D`` domains, domain-major (``[domain 0 ..., domain 1 ..., ...]``),
    so cross-domain methods (MixStyle's ``crossdomain`` mixing) find the same layout on every
    rank. Each domain is its own seeded stream sharded like :class:`InfiniteBatchSampler`, so the
    ranks take disjoint slices and resuming at ``start_batch`` is exact.

    Args:
        domains: domain index of every sample.
        batch_size: per-rank batch size, a multiple of the number of domains.

    Example:
        >>> s = DomainBalancedBatchSampler(np.array([0, 0, 0, 1, 1]), 4, seed=0)
        >>> [int(np.array([0, 0, 0, 1, 1])[i]) for i in next(iter(s))]
        [0, 0, 1, 1]
    """

    def __init__(self, domains: np.ndarray, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        self.groups = [np.flatnonzero(domains == d) for d in np.unique(domains)]
        if batch_size % len(self.groups):
            raise ConfigError(f"a domain-balanced batch needs trainer.batch_size ({batch_size}) to be a multiple "
                              f"of the number of domains ({len(self.groups)}).")
        k = batch_size // len(self.groups)
        self.streams = [InfiniteBatchSampler(len(g), k, seed * 7919 + d, start_batch, rank, world)
                        for d, g in enumerate(self.groups)]

    def __iter__(self) -> Iterator[Batch]:
        """A sample's seed comes from its position in its domain's stream, which DDP shards as one
        process draws it."""
        its = [iter(s) for s in self.streams]
        while True:
            parts = [next(it) for it in its]
            yield Batch([int(g[i]) for g, part in zip(self.groups, parts) for i in part],
                        [seed for part in parts for seed in part.seeds])


class ForeverLoader:
    """Infinite iterator of training batches whose position can be saved and restored.

    ``state_dict()`` is the number of batches handed out; ``load_state_dict`` restarts the
    sampler at that batch, so a resumed run sees exactly the batches an uninterrupted run would.
    Under data parallelism each rank gets its shard of every global batch (see
    :class:`InfiniteBatchSampler`); ``balanced=True`` draws domain-balanced batches from the
    dataset's ``domains`` (see :class:`DomainBalancedBatchSampler`).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int | None = None, rank: int = 0,
                 world: int = 1, balanced: bool = False, pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers = _workers(dataset, num_workers)
        self.rank, self.world, self.balanced, self.pin_memory = rank, world, balanced, pin_memory
        self.batches = 0
        self._it: Iterator | None = None

    def __iter__(self) -> ForeverLoader:
        return self

    def __next__(self):
        if self._it is None:
            position = (self.batch_size, self.seed, self.batches, self.rank, self.world)
            sampler = (DomainBalancedBatchSampler(self.dataset.domains, *position) if self.balanced
                       else InfiniteBatchSampler(len(self.dataset), *position))
            self._it = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                       collate_fn=getattr(self.dataset, "collate_fn", None),
                                       persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
                                       **_worker_options(self.num_workers),
                                       generator=_own_generator(self.seed, self.batches)))
        self.batches += 1
        return next(self._it)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])
        self._it = None

    def close(self) -> None:
        """Stop the worker processes now, not at interpreter exit (where their shutdown can wait)."""
        self._it = None


def _workers(dataset: Dataset, num_workers: int | None) -> int:
    """``trainer.num_workers``, or the dataset's default when it is null."""
    return getattr(dataset, "default_workers", 0) if num_workers is None else num_workers


def _worker_options(num_workers: int) -> dict[str, Any]:
    """How DataLoader workers start: from a fork server on Linux, never by forking the training
    process. That process runs threads (gloo's under DDP, the progress bar's, W&B's), and a forked
    child that inherits a lock held by one of them waits on it forever (a DDP run then hangs until
    the collective timeout). The server imports ``tllab.data`` and torchvision's decoders and
    transforms once, so a worker starts in milliseconds instead of re-importing torch (and
    torchvision, about 1.7 s) as a spawned one does; it starts with no logging,
    so it takes this process's handlers (a skipped image is logged in ``train.log``)."""
    if not num_workers or sys.platform != "linux":
        return {}
    context = multiprocessing.get_context("forkserver")
    # imported when the server starts
    context.set_forkserver_preload(["tllab.data", "torchvision.io", "torchvision.transforms.v2"])
    return {"multiprocessing_context": context, "worker_init_fn": _WorkerLogging.capture()}


@dataclass(frozen=True)
class _WorkerLogging:
    """``worker_init_fn`` that gives a worker the root logger's handlers: (file or ``None`` for
    stderr, format, level) each."""

    handlers: tuple[tuple[str | None, str | None, int], ...]
    level: int

    @staticmethod
    def capture() -> _WorkerLogging:
        root = logging.getLogger()
        handlers = tuple((getattr(h, "baseFilename", None), h.formatter._fmt if h.formatter else None, h.level)
                         for h in root.handlers if isinstance(h, logging.FileHandler | logging.StreamHandler))
        return _WorkerLogging(handlers, root.level)

    def __call__(self, worker_id: int) -> None:
        root = logging.getLogger()
        for file, fmt, level in self.handlers:
            handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(fmt))
            handler.setLevel(level)
            root.addHandler(handler)
        root.setLevel(self.level)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int | None = None, rank: int = 0, world: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """Sequential, unshuffled batches over rank ``rank``'s contiguous part of the dataset (all of
    it in one process): every sample is evaluated by exactly one rank."""
    lo, hi = len(dataset) * rank // world, len(dataset) * (rank + 1) // world
    sampler = BatchSampler(range(lo, hi), batch_size, drop_last=False)
    workers = _workers(dataset, num_workers)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      collate_fn=getattr(dataset, "collate_fn", None), pin_memory=pin_memory,
                      **_worker_options(workers), generator=_own_generator(0, 0))


def _own_generator(seed: int, position: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from its generator, by default the global one;
    its own generator keeps the global RNG stream (and so a resumed run) independent of when
    loaders are created."""
    return torch.Generator().manual_seed(seed * 1_000_003 + position)

"""Resumable infinite training loaders and sequential evaluation loaders."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler


class InfiniteBatchSampler(Sampler[list[int]]):
    """An endless stream of shuffled passes over ``range(n)``, cut into batches.

    Pass ``p`` is ``randperm(n)`` drawn from a generator seeded with ``seed * 1_000_003 + p``; the
    passes are concatenated and batch ``b`` is elements ``[b * B, (b + 1) * B)`` of that stream.
    So batch ``b`` depends only on ``(n, B, seed, b)``: starting at ``start_batch`` reproduces an
    uninterrupted run exactly, and a set smaller than one batch still works.

    Example:
        >>> it = iter(InfiniteBatchSampler(5, 4, seed=0))
        >>> len(next(it)), len(next(it))
        (4, 4)
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0) -> None:
        if n <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch

    def _perm(self, p: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
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
            yield batch


class ForeverLoader:
    """Infinite iterator of training batches whose position can be saved and restored.

    ``state_dict()`` is the number of batches handed out; ``load_state_dict`` restarts the
    sampler at that batch, so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.batches = 0
        self._it: Iterator | None = None

    def __iter__(self) -> ForeverLoader:
        return self

    def __next__(self):
        if self._it is None:
            sampler = InfiniteBatchSampler(len(self.dataset), self.batch_size, self.seed, self.batches)
            self._it = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                       collate_fn=getattr(self.dataset, "collate_fn", None),
                                       persistent_workers=self.num_workers > 0,
                                       generator=_own_generator(self.seed, self.batches)))
        self.batches += 1
        return next(self._it)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])
        self._it = None


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Sequential, unshuffled batches over the whole dataset."""
    sampler = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=getattr(dataset, "collate_fn", None), generator=_own_generator(0, 0))


def _own_generator(seed: int, position: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from its generator, by default the global one;
    its own generator keeps the global RNG stream (and so a resumed run) independent of when
    loaders are created."""
    return torch.Generator().manual_seed(seed * 1_000_003 + position)

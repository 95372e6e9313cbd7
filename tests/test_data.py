"""Data layout per setting, resumable sampling and batch transforms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.conftest import compose_config
from tllab.data import build_data
from tllab.data.arrays import ArrayDataset
from tllab.data.loaders import DomainBalancedBatchSampler, ForeverLoader, InfiniteBatchSampler
from tllab.errors import ConfigError
from tllab.train import resolve_config


def data_for(*overrides: str, seed: int = 0):
    cfg, _ = resolve_config(compose_config(list(overrides)))
    return build_data(cfg.dataset, seed)


def rows(ds: ArrayDataset) -> set[bytes]:
    return {img.tobytes() for img in ds.images}


def test_sampler_covers_each_pass_and_resumes_exactly():
    sampler = InfiniteBatchSampler(10, 4, seed=3)
    batches = list(itertools.islice(iter(sampler), 10))  # 40 indices = 4 passes
    stream = [i for b in batches for i in b]
    for p in range(4):
        assert sorted(stream[10 * p:10 * (p + 1)]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each pass reshuffles
    resumed = list(itertools.islice(iter(InfiniteBatchSampler(10, 4, seed=3, start_batch=6)), 4))
    assert resumed == batches[6:]
    assert list(itertools.islice(iter(InfiniteBatchSampler(10, 4, seed=4)), 10)) != batches
    assert [len(b) for b in itertools.islice(iter(InfiniteBatchSampler(3, 8, seed=0)), 3)] == [8, 8, 8]


def test_forever_loader_state_restores_position():
    ds = ArrayDataset(np.arange(20 * 3 * 4, dtype=np.uint8).reshape(20, 2, 2, 3) % 255,
                      np.arange(20) % 10, np.zeros(20, int), image_size=2)
    a = ForeverLoader(ds, 6, seed=1)
    seen = [next(a)[1] for _ in range(5)]
    b = ForeverLoader(ds, 6, seed=1)
    b.load_state_dict({"batches": 3})
    assert torch.equal(next(b)[1], seen[3]) and torch.equal(next(b)[1], seen[4])
    assert b.state_dict() == {"batches": 5}


def test_array_dataset_normalises_and_resizes():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1] = 255
    ds = ArrayDataset(images, np.array([3, 7]), np.array([0, 1]), image_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    x, y, d = ds.__getitems__([0, 1])
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full_like(x[0], -2.0)) and torch.allclose(x[1], torch.full_like(x[1], 2.0))
    assert y.tolist() == [3, 7] and d.tolist() == [0, 1]
    assert ds.unlabeled().targets.tolist() == [-1, -1]


def test_domain_adaptation_layout():
    data = data_for()
    assert set(data.eval_splits) == {"source_val", "source_test", "target_test"}
    assert data.selection_split == "source_val"
    assert len(data.train) == 3600 and len(data.eval_splits["source_val"]) == 400
    assert np.bincount(data.eval_splits["source_val"].targets).tolist() == [40] * 10  # 10 % per class
    assert not rows(data.train) & rows(data.eval_splits["source_val"])
    assert data.unlabeled is not None and len(data.unlabeled) == 4000
    assert (data.unlabeled.targets == -1).all()  # no target label reaches training
    assert not rows(data.unlabeled) & rows(data.eval_splits["target_test"])
    # The validation split depends on data_seed only, not on the run seed.
    assert rows(data_for(seed=5).eval_splits["source_val"]) == rows(data.eval_splits["source_val"])


def test_domain_generalization_layout():
    data = data_for("experiment=digits_dg")
    assert data.unlabeled is None
    assert data.train_domains == ["mnist", "uci", "synth"]
    assert sorted(np.unique(data.train.domains).tolist()) == [0, 1, 2]
    assert {"source_val/mnist", "source_val/uci", "source_val/synth", "source_test/uci"} <= set(data.eval_splits)
    assert len(data.eval_splits["source_val"]) == sum(len(data.eval_splits[f"source_val/{d}"])
                                                     for d in data.train_domains)


def test_finetune_labels_per_class_is_deterministic_per_seed():
    data = data_for("experiment=digits_finetune")
    assert np.bincount(data.train.targets).tolist() == [5] * 10
    assert data.selection_split == "target_val"
    assert not rows(data.train) & rows(data.eval_splits["target_val"])
    assert {"target_val", "target_test", "source_test"} == set(data.eval_splits)
    assert rows(data_for("experiment=digits_finetune").train) == rows(data.train)
    assert rows(data_for("experiment=digits_finetune", seed=1).train) != rows(data.train)


def test_finetune_sample_rate_takes_that_percentage_per_class():
    data = data_for("experiment=digits_finetune", "dataset.labels_per_class=null", "dataset.sample_rate=15")
    pool = 4000 - 400  # target train split minus its validation part
    assert len(data.train) == pytest.approx(0.15 * pool, abs=10)
    counts = np.bincount(data.train.targets)
    assert counts.min() >= 50 and counts.max() <= 58


def test_too_many_labels_per_class_is_a_config_error():
    with pytest.raises(ConfigError, match="labels_per_class=1000 but a class of mnistm has only"):
        data_for("experiment=digits_finetune", "dataset.labels_per_class=1000")


def test_an_empty_validation_split_is_left_out():
    data = data_for("dataset.source=[uci]", "dataset.val_fraction=0.003")  # rounds to 0 images per class
    assert "source_val" not in data.eval_splits and data.selection_split is None


def test_rank_shards_are_disjoint_and_concatenate_to_the_single_process_batch():
    single = list(itertools.islice(iter(InfiniteBatchSampler(50, 8, seed=2)), 5))
    shards = [list(itertools.islice(iter(InfiniteBatchSampler(50, 4, seed=2, rank=r, world=2)), 5)) for r in (0, 1)]
    assert [a + b for a, b in zip(*shards)] == single
    resumed = list(itertools.islice(iter(InfiniteBatchSampler(50, 4, seed=2, start_batch=3, rank=1, world=2)), 2))
    assert resumed == shards[1][3:]


def test_domain_balanced_batches_per_rank():
    domains = np.repeat([0, 1, 2], [32, 8, 48])  # whole passes: no index repeats across a pass boundary
    shards = [list(itertools.islice(iter(DomainBalancedBatchSampler(domains, 6, seed=1, rank=r, world=2)), 20))
              for r in (0, 1)]
    for batches in shards:
        for batch in batches:
            assert domains[batch].tolist() == [0, 0, 1, 1, 2, 2]  # domain-major, 2 of each
    for a, b in zip(*shards):
        assert not set(a) & set(b)
    seen_small = {i for batches in shards for batch in batches for i in batch if domains[i] == 1}
    assert seen_small == set(range(32, 40))  # the small domain is cycled through
    resumed = list(itertools.islice(iter(DomainBalancedBatchSampler(domains, 6, seed=1, start_batch=7, rank=1,
                                                                    world=2)), 3))
    assert resumed == shards[1][7:10]
    with pytest.raises(ConfigError, match="multiple of the number of domains"):
        DomainBalancedBatchSampler(domains, 4, seed=0)


class _ParentPids(torch.utils.data.Dataset):
    """Each sample is the pid of its worker's parent, and loading it logs a warning."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        import logging
        import os

        logging.getLogger("tllab.data.files").warning("sample %d loaded in a worker", i)
        return torch.tensor(os.getppid())


def test_loader_workers_are_not_forked_from_the_training_process_and_log_like_it(tmp_path):
    """A fork of a process running threads (gloo's under DDP) can hang on a lock one of them held."""
    import logging
    import os

    from tllab.data.loaders import eval_loader

    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        parents = torch.cat(list(eval_loader(_ParentPids(), batch_size=2, num_workers=2)))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert len(parents) == 4 and os.getpid() not in parents.tolist()  # started by the fork server
    log = (tmp_path / "train.log").read_text()
    assert all(f"sample {i} loaded in a worker" in log for i in range(4))

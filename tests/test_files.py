"""File datasets: list parsing, the image_list / image_folder families, loading, errors."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FAST, compose_config, interrupt_then_resume
from tests.image_fixtures import write_jpeg, write_list
from tllab.data import build_data
from tllab.data.export import export_digits
from tllab.data.files import PathTable, read_image_list
from tllab.data.loaders import ForeverLoader, InfiniteBatchSampler, eval_loader
from tllab.errors import ConfigError, DataError
from tllab.train import resolve_config, run

DIGITS_AS_FILES = ["dataset.transform=resize", "dataset.image_size=32", "dataset.mean=[0.5,0.5,0.5]",
                   "dataset.std=[0.5,0.5,0.5]"]


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory, _cache_dir) -> Path:
    """``tllab-data export digits`` of mnist and mnistm (both layouts), once per session."""
    root = tmp_path_factory.mktemp("digits_files")
    export_digits(root, ["mnist", "mnistm"])
    return root


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def results(run_dir: Path) -> list[dict]:
    """The records without what names the run or times it."""
    return [{k: v for k, v in r.items() if k not in ("time", "dataset")} for r in records(run_dir)]


def data_for(*overrides: str, seed: int = 0):
    cfg, _ = resolve_config(compose_config(list(overrides)))
    return build_data(cfg.dataset, seed)


def test_path_table_packs_strings_in_chunks():
    items = [b"a/1.jpg", b"dir with space/2.png", b"", "\u00e9t\u00e9/3.jpg".encode()]
    table = PathTable.from_chunks([items[:3], [], items[3:]])
    assert [table[i] for i in range(len(table))] == ["a/1.jpg", "dir with space/2.png", "", "\u00e9t\u00e9/3.jpg"]
    assert len(PathTable.from_bytes([])) == 0


def test_subsets_and_concatenations_share_the_indexes(photo_list):
    data = photo_data(photo_list)
    train, val = data.train, data.eval_splits["source_val"]
    both = type(train).concat([train, val, train.subset(np.array([0]))])
    assert len(both.indexes) == 1 and both.indexes[0] is train.indexes[0]  # one list read once, no path copied
    assert both.path(len(both) - 1) == train.path(0) and both.describe(0).endswith(f"all.txt line {train.row[0] + 1})")


def test_image_list_format_is_tllibs(tmp_path):
    (tmp_path / "l.txt").write_text("a/1.jpg 0\n\n  my photos/x y.jpg   12 \r\n/abs/p.png 3\n")
    index = read_image_list(tmp_path / "l.txt", tmp_path)
    assert [index.paths[i] for i in range(3)] == ["a/1.jpg", "my photos/x y.jpg", "/abs/p.png"]
    assert index.targets.tolist() == [0, 12, 3] and index.lines.tolist() == [1, 3, 4]


@pytest.mark.parametrize(("text", "match"), [
    ("a.jpg 0\nb.jpg\n", r"l.txt line 2 is not '<path> <label>': 'b.jpg'"),
    ("a.jpg 0\nb.jpg -1\n", r"line 2 .*an integer >= 0"),
    ("a.jpg zero\n", r"line 1 is not"),
    ("\n\n", r"holds no samples"),
])
def test_garbled_and_empty_lists_name_the_line(tmp_path, text, match):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(DataError, match=match):
        read_image_list(tmp_path / "l.txt", tmp_path)


def test_digits_exported_as_files_train_exactly_like_the_arrays(digits_files, tmp_path):
    arrays = run(compose_config([*FAST]), tmp_path / "arrays")
    files = run(compose_config([*FAST, "dataset=digits_files", f"dataset.root={digits_files}"]), tmp_path / "files")
    assert results(tmp_path / "arrays") == results(tmp_path / "files")
    assert files["final"] == arrays["final"] and records(tmp_path / "files")[0]["dataset"] == "digits_files"


def test_image_folder_reads_the_same_images_as_a_list_in_folder_order(digits_files, tmp_path):
    folder = [*FAST, "dataset=image_folder", f"dataset.root={digits_files}", *DIGITS_AS_FILES,
              "dataset.source=[mnist]", "dataset.target=[mnistm]"]
    data = data_for(*folder)  # mnist/{train,test}/<label>/ split folders are found by themselves
    assert len(data.train) + len(data.eval_splits["source_val"]) == 4000 and data.classes == list("0123456789")
    # The same files as lists in ImageFolder's order (class folder, then file name): the same run.
    domains = {}
    for domain in ("mnist", "mnistm"):
        entry = {}
        for split in ("train", "test"):
            rows = [(str(p.relative_to(digits_files)), int(p.parent.name))
                    for p in sorted((digits_files / domain / split).glob("*/*.png"))]
            write_list(tmp_path / f"{domain}_{split}.txt", rows)
            entry[split] = str(tmp_path / f"{domain}_{split}.txt")
        domains[domain] = entry
    as_list = [*FAST, "dataset=image_list", f"dataset.root={digits_files}", *DIGITS_AS_FILES,
               "dataset.num_classes=10", "dataset.source=[mnist]", "dataset.target=[mnistm]",
               "dataset.domains={" + ", ".join(f"{d}: {{train: {e['train']}, test: {e['test']}}}"
                                               for d, e in domains.items()) + "}"]
    run(compose_config(folder), tmp_path / "folder")
    run(compose_config(as_list), tmp_path / "list")
    assert results(tmp_path / "folder") == results(tmp_path / "list")
    # ... and the pixels are the digits arrays' own.
    arrays = data_for()
    x_files, y_files, _ = data.eval_splits["target_test"].__getitems__([0, 1, 2])
    order = np.argsort(arrays.eval_splits["target_test"].targets, kind="stable")  # folder order: by class
    x_arr, y_arr, _ = arrays.eval_splits["target_test"].__getitems__(order[:3].tolist())
    assert torch.equal(y_files, y_arr) and torch.equal(x_files, x_arr)


def test_image_folder_class_sets_must_agree_unless_fixed(tmp_path):
    for domain, classes in (("a", ["cat", "dog"]), ("b", ["cat", "dog", "owl"])):
        for i, c in enumerate(classes):
            write_jpeg(tmp_path / domain / c / f"{i}.jpg", seed=i)
    base = ["dataset=image_folder", f"dataset.root={tmp_path}", "dataset.source=[a]", "dataset.target=[b]"]
    with pytest.raises(DataError, match=r"a lacks the class folders \['owl'\] that .*b has"):
        resolve_config(compose_config(base))
    cfg, resolved = resolve_config(compose_config([*base, "dataset.classes=[cat,dog,owl]"]))
    assert cfg.dataset.num_classes == resolved["dataset"]["num_classes"] == 3
    with pytest.raises(DataError, match=r"class folders \['owl'\] that are not in dataset.classes"):
        data_for(*base, "dataset.classes=[cat,dog]")
    with pytest.raises(ConfigError, match=r"domain 'c': there is no folder .*domains under .*: \['a', 'b'\]"):
        data_for(*base, "dataset.target=[c]", "dataset.classes=[cat,dog,owl]")


def test_lists_with_the_same_file_name_are_refused(tmp_path):
    for d in ("amazon", "webcam"):
        write_jpeg(tmp_path / d / "x.jpg", 0)
        write_list(tmp_path / d / "train.txt", [("x.jpg", 0), ("x.jpg", 1)])
    with pytest.raises(ConfigError, match=r"amazon/train.txt and .*webcam/train.txt are both domain 'train'"):
        data_for("dataset=image_list", "dataset.num_classes=2", f"dataset.source=[{tmp_path}/amazon/train.txt]",
                 f"dataset.target=[{tmp_path}/webcam/train.txt]")


def test_image_folder_split_folders_bring_their_validation_split(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("cat", "dog"):
            for k in range(n):
                write_jpeg(tmp_path / "a" / split / c / f"{k}.jpg", seed=k)
    data = data_for("dataset=image_folder", f"dataset.root={tmp_path}", "dataset.source=[a]", "dataset.target=[a]")
    assert data.classes == ["cat", "dog"]
    assert (len(data.train), len(data.eval_splits["source_val"]), len(data.eval_splits["target_test"])) == (6, 2, 4)


def test_missing_root_names_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"dataset root .*nowhere does not exist; .*set dataset.root"):
        data_for("dataset=digits_files", f"dataset.root={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"unknown domain 'mnsit'; valid domains: mnist, uci, mnistm, synth"):
        data_for("dataset=digits_files", f"dataset.root={tmp_path}", "dataset.source=[mnsit]")


def test_labels_beyond_the_classes_name_the_line(tmp_path):
    write_jpeg(tmp_path / "x.jpg", 0)
    write_list(tmp_path / "a.txt", [("x.jpg", 0), ("x.jpg", 1), ("x.jpg", 7)])
    with pytest.raises(DataError, match=r"a.txt line 3: label 7 is out of range \(0..1\), image_list has 2 classes"):
        data_for("dataset=image_list", "dataset.num_classes=2", f"dataset.source=[{tmp_path}/a.txt]",
                 f"dataset.target=[{tmp_path}/a.txt]")
    with pytest.raises(ConfigError, match=r"set dataset.num_classes=<N> or dataset.classes"):
        resolve_config(compose_config(["dataset=image_list", f"dataset.source=[{tmp_path}/a.txt]",
                                       f"dataset.target=[{tmp_path}/a.txt]"]))


@pytest.fixture(scope="module")
def photo_list(tmp_path_factory) -> Path:
    """40 small JPEGs of 4 classes in one list, paths relative to the list's folder."""
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(40):
        write_jpeg(root / f"img {i // 10}" / f"{i}.jpg", seed=i, size=(30 + i % 7, 26 + i % 5))
        rows.append((f"img {i // 10}/{i}.jpg", i % 4))
    write_list(root / "all.txt", rows)
    return root / "all.txt"


def photo_data(photo_list: Path, *overrides: str):
    return data_for("dataset=image_list", "dataset.num_classes=4", "dataset.image_size=16", "dataset.resize_size=20",
                    f"dataset.source=[{photo_list}]", f"dataset.target=[{photo_list}]", *overrides)


def test_augmentation_is_seeded_per_sample_whatever_the_workers(photo_list):
    data = photo_data(photo_list, "dataset.color_jitter=true")
    assert data.train.augment and not data.eval_splits["target_test"].augment
    batches = {}
    for workers in (0, 2):
        loader = ForeverLoader(data.train, 8, seed=5, num_workers=workers)
        batches[workers] = [next(loader) for _ in range(6)]
    for a, b in zip(*batches.values()):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    # A resumed loader continues the same draws; another seed draws other crops.
    resumed = ForeverLoader(data.train, 8, seed=5, num_workers=0)
    resumed.load_state_dict({"batches": 4})
    assert torch.equal(next(resumed)[0], batches[0][4][0])
    other = ForeverLoader(data.train, 8, seed=6, num_workers=0)
    assert not torch.equal(next(other)[0], batches[0][0][0])
    # Two visits of the same image (a later pass) are augmented differently.
    x1 = data.train.__getitems__(_batch([0], 5, 0))[0]
    x2 = data.train.__getitems__(_batch([0], 5, 36))[0]
    assert x1.shape == (1, 3, 16, 16) and not torch.equal(x1, x2)
    # Evaluation is deterministic: resize and centre crop.
    ev = [x for x, _, _ in eval_loader(data.eval_splits["target_test"], 16, num_workers=0)]
    assert torch.equal(torch.cat(ev), torch.cat([x for x, _, _ in eval_loader(data.eval_splits["target_test"], 7,
                                                                               num_workers=2)]))


def _batch(indices, seed, position):
    from tllab.data.loaders import Batch, sample_seed

    return Batch(indices, [sample_seed(seed, position + j) for j in range(len(indices))])


def test_unreadable_image_stops_with_one_line_or_is_skipped_and_counted(photo_list, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(photo_list.parent, root)
    overrides = ["dataset=image_list", "dataset.num_classes=4", "dataset.image_size=16",
                 f"dataset.source=[{root}/all.txt]", f"dataset.target=[{root}/all.txt]", "trainer.max_steps=4",
                 "trainer.eval_every=2", "trainer.batch_size=8", "trainer.quiet=true"]
    cfg, _ = resolve_config(compose_config(overrides))
    train = build_data(cfg.dataset, cfg.seed).train
    drawn = [i for b in itertools.islice(iter(InfiniteBatchSampler(len(train), 8, seed=0)), 4) for i in b]
    bad = drawn[0]  # a training image the run draws (the trainer's source stream has seed 2 * seed = 0)
    path = Path(train.path(bad))
    path.write_bytes(path.read_bytes()[:200])  # truncated
    line_no = int(train.describe(bad).rsplit(" line ", 1)[1].rstrip(")"))

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tllab.train", *overrides, *extra], capture_output=True,
                              text=True, cwd=tmp_path, env={**_env(), "PYTHONPATH": str(Path(__file__).parents[1])})

    proc = cli(f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"tllab: error: cannot read image {path} ({root}/all.txt line {line_no}): ")
    assert "dataset.skip_bad_images=true" in line
    proc = cli(f"hydra.run.dir={tmp_path}/skip", "dataset.skip_bad_images=true")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_images"] == {"train": drawn.count(bad), "source_val": 0, "source_test": 1,
                                         "target_test": 1}
    assert str(path) in (tmp_path / "skip" / "train.log").read_text()


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled"}


def test_file_dataset_resume_is_bit_identical(photo_list, tmp_path, monkeypatch):
    overrides = [*FAST, "dataset=image_list", "dataset.num_classes=4", "dataset.image_size=16",
                 f"dataset.source=[{photo_list}]", f"dataset.target=[{photo_list}]", "trainer.batch_size=8",
                 "trainer.deterministic=true", "trainer.max_steps=9", "trainer.eval_every=3", "optim=sgd",
                 "trainer.num_workers=2"]
    run(compose_config(overrides), tmp_path / "a")
    interrupt_then_resume(lambda d: run(compose_config(overrides), d), tmp_path / "b", monkeypatch)
    assert [r["step"] for r in records(tmp_path / "b")] == [3, 6, 9]
    assert results(tmp_path / "a") == results(tmp_path / "b")
    wa = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sampler_streams_shard_seeds_like_indices():
    from tllab.data.loaders import DomainBalancedBatchSampler, InfiniteBatchSampler

    single = list(itertools.islice(iter(InfiniteBatchSampler(20, 8, seed=3)), 4))
    shards = [list(itertools.islice(InfiniteBatchSampler(20, 4, seed=3, rank=r, world=2), 4)) for r in (0, 1)]
    for whole, a, b in zip(single, *shards):
        assert whole == a + b and whole.seeds == a.seeds + b.seeds
    assert len(set(s for batch in single for s in batch.seeds)) == 32  # one seed per stream position
    # Domain-balanced: each sample keeps the seed one process gives it, whichever rank draws it.
    domains = np.repeat([0, 1], [12, 20])
    seed_of = {}
    for batch in itertools.islice(DomainBalancedBatchSampler(domains, 8, seed=2), 3):
        for i, s in zip(batch, batch.seeds):
            seed_of.setdefault(i, set()).add(s)
    for rank in (0, 1):
        for batch in itertools.islice(DomainBalancedBatchSampler(domains, 4, seed=2, rank=rank, world=2), 3):
            assert all(s in seed_of[i] for i, s in zip(batch, batch.seeds))


@pytest.mark.slow
def test_ddp_on_a_file_dataset_equals_one_process_on_the_concatenated_batch(photo_list, tmp_path):
    """Augmented crops included: each sample's draws depend on its stream position, not on its rank."""
    common = ["dataset=image_list", "dataset.num_classes=4", "dataset.image_size=16", "dataset.color_jitter=true",
              f"dataset.source=[{photo_list}]", f"dataset.target=[{photo_list}]", "optim=sgd", "seed=3",
              "trainer.max_steps=4", "trainer.eval_every=2", "trainer.quiet=true", "trainer.precision=float64",
              "trainer.num_workers=1"]
    run(compose_config([*common, "trainer=ddp", "trainer.devices=2", "trainer.sync_bn=true",
                        "trainer.batch_size=8"]), tmp_path / "ddp")
    run(compose_config([*common, "trainer.batch_size=16"]), tmp_path / "single")
    ddp = torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=True)["model"]
    single = torch.load(tmp_path / "single/checkpoints/last.pt", weights_only=True)["model"]
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-9, rtol=1e-9, msg=key)
    for a, b in zip(records(tmp_path / "ddp"), records(tmp_path / "single")):
        assert a["target_test/acc"] == b["target_test/acc"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-9)

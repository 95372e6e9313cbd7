"""The benchmark catalog on fixtures in the real on-disk layouts, and the ``tllab-data`` command."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import logging
import os
import shlex
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAST, compose_config
from tests.image_fixtures import finetune_tree, office31_tree, write_jpeg, write_list
from tllab.data import build_data
from tllab.data.cli import catalog_names, dataset_config, main
from tllab.data.download import download_dataset
from tllab.data.layout import domain_spec
from tllab.errors import ConfigError, DataError
from tllab.keys import group_keys
from tllab.train import resolve_config, run

CATALOG = [n for n in catalog_names() if n not in ("digits", "image_list", "image_folder")]
SMALL = ["backbone=digits_cnn", "dataset.image_size=32", "trainer.batch_size=8"]


def tllab_data(*args: str, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("name", CATALOG)
def test_catalog_entries_are_consistent(name):
    cfg = dataset_config(name)
    assert cfg.family in ("image_list", "image_folder") and cfg.domains
    assert len(cfg.classes) == cfg.num_classes == len(set(cfg.classes))
    files = {f for key in cfg.domains for f in domain_spec(key, cfg).files()}
    assert set(cfg.counts) <= files, "a published count for a file the domains do not name"
    assert all(domain_spec(alias, cfg).key == key for alias, key in cfg.aliases.items())
    assert all({"folder", "archive", "url"} <= set(entry) for entry in cfg.download)
    assert {domain_spec(d, cfg).key for d in [*cfg.source, *cfg.target]} <= set(cfg.domains)


@pytest.mark.parametrize(("overrides", "task"), [
    (["dataset=office31", "dataset.source=[amazon]", "dataset.target=[webcam]"], "A→W"),
    (["dataset=office_home", "dataset.source=[Art]", "dataset.target=[Cl]"], "Ar→Cl"),
    (["dataset=visda2017"], "Synthetic→Real"),
    (["dataset=domainnet", "dataset.source=[clipart]", "dataset.target=[s]"], "c→s"),
    (["dataset=pacs", "dataset.source=[A,C,P]", "dataset.target=[sketch]"], "S"),
    (["dataset=cub200", "dataset.sample_rate=15"], "CUB 15%"),
    (["dataset=aircraft", "dataset.sample_rate=50"], "Aircraft 50%"),
])
def test_task_names_use_the_domain_keys(overrides, task):
    cfg, _ = resolve_config(compose_config(overrides))
    assert group_keys(cfg)["task"] == task


@pytest.fixture(scope="module")
def office31(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("data") / "office31"
    counts = office31_tree(root, dataset_config("office31").classes, {"amazon": 2, "dslr": 1, "webcam": 1})
    return root, counts


def test_office31_as_tllib_lays_it_out_trains_with_no_other_change(office31, tmp_path, caplog):
    root, counts = office31
    overrides = [*FAST, *SMALL, "dataset=office31", f"dataset.root={root}", "dataset.source=[A]",
                 "dataset.target=[webcam]", "dataset.val_fraction=0.5"]
    data = build_data(resolve_config(compose_config(overrides))[0].dataset, seed=0)
    assert len(data.train) + len(data.eval_splits["source_val"]) == counts["image_list/amazon.txt"] == 62
    assert len(data.eval_splits["target_test"]) == len(data.unlabeled) == 31  # target test = all target images
    assert data.classes[0] == "back_pack" and data.train.augment
    with caplog.at_level(logging.WARNING):
        summary = run(compose_config(overrides), tmp_path / "run")
    assert "amazon.txt lists 62 images, the published list 2817" in caplog.text
    assert summary["task"] == "A→W" and summary["steps"] == 6
    with pytest.raises(ConfigError, match=r"unknown domain 'Q'; valid domains: A, D, W \(or the full names amazon, "
                                          r"dslr, webcam\)"):
        build_data(resolve_config(compose_config([*overrides, "dataset.target=[Q]"]))[0].dataset, 0)


def test_missing_catalog_root_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TLLAB_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=rf"dataset root {tmp_path}/office31 does not exist; `tllab-data download "
                                        rf"office31 --root {tmp_path}/office31` fetches it"):
        build_data(resolve_config(compose_config(["dataset=office31"]))[0].dataset, 0)
    monkeypatch.delenv("TLLAB_DATA_DIR")
    with pytest.raises(ConfigError, match=r"dataset.root is not set \(nor \$TLLAB_DATA_DIR\)"):
        build_data(resolve_config(compose_config(["dataset=office31"]))[0].dataset, 0)


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cub")
    return root, finetune_tree(root, num_classes=200, train_per_class=4, test_per_class=1)


def test_finetune_sample_rates_are_the_published_fixed_subsets(cub):
    root, lists = cub
    base = ["dataset=cub200", f"dataset.root={root}", *SMALL]
    subsets = []
    for seed in (0, 1):
        data = build_data(resolve_config(compose_config([*base, "dataset.sample_rate=15"]))[0].dataset, seed)
        subsets.append(sorted(data.train.path(i) for i in range(len(data.train))))
        assert data.selection_split is None and set(data.eval_splits) == {"target_test"}  # tllib: no validation
    assert subsets[0] == subsets[1] == sorted(str(root / p) for p, _ in lists["train_15"])  # the same for every seed
    with pytest.raises(ConfigError, match=r"sample_rate=20: cub200 CUB ships fixed subsets for 15, 30, 50, 100"):
        build_data(resolve_config(compose_config([*base, "dataset.sample_rate=20"]))[0].dataset, 0)
    data = build_data(resolve_config(compose_config([*base, "dataset.labels_per_class=2"]))[0].dataset, 0)
    assert np.bincount(data.train.targets).tolist() == [2] * 200
    assert len(data.eval_splits["target_test"]) == 200


def test_pacs_lists_count_labels_from_one_and_bring_their_validation_split(tmp_path):
    classes = dataset_config("pacs").classes
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        rows = {"train": [], "val": []}
        for label in range(7):
            for k in range(3):
                rel = f"{domain}/{classes[label]}/{k}.jpg"
                write_jpeg(tmp_path / rel, seed=7 * label + k)
                rows["val" if k == 2 else "train"].append((rel, label + 1))
        write_list(tmp_path / f"image_list/{domain}_train.txt", rows["train"])
        write_list(tmp_path / f"image_list/{domain}_val.txt", rows["val"])
        write_list(tmp_path / f"image_list/{domain}_all.txt", rows["train"] + rows["val"])
    data = build_data(resolve_config(compose_config(["dataset=pacs", f"dataset.root={tmp_path}"]))[0].dataset, 0)
    assert sorted(np.unique(data.train.targets)) == list(range(7))
    assert len(data.train) == 3 * 14 and len(data.eval_splits["source_val"]) == 3 * 7  # the official val lists
    assert len(data.eval_splits["target_test"]) == 21 and data.unlabeled is None


def test_check_reports_each_defect_on_one_line(office31, tmp_path, capsys):
    root = tmp_path / "office31"
    shutil.copytree(office31[0], root)
    mug = dataset_config("office31").classes.index("mug") + 1  # its line in webcam.txt
    code, out, _ = tllab_data("check", "office31", "--root", str(root), "--workers", "2", capsys=capsys)
    assert code == 1 and "62 images listed, the published list has 2817" in out  # a fixture, not the real lists
    (root / "amazon/images/bike/frame_0001.jpg").unlink()
    truncated = root / "webcam/images/mug/frame_0001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:150])
    lines = (root / "image_list/dslr.txt").read_text().splitlines()
    lines[4] = "dslr/images/bottle/frame_0001.jpg"  # no label
    lines[6] = lines[6].rsplit(" ", 1)[0] + " 31"  # out of range
    (root / "image_list/dslr.txt").write_text("\n".join(lines) + "\n")
    code, out, _ = tllab_data("check", "office31", "--root", str(root), capsys=capsys)
    problems = [line for line in out.splitlines() if ": " in line]
    assert code == 1
    assert f"{root}/amazon/images/bike/frame_0001.jpg ({root}/image_list/amazon.txt line 3): missing" in problems
    assert any(line.startswith(f"{truncated} ({root}/image_list/webcam.txt line {mug}): cannot be decoded")
               for line in problems)
    assert f"{root}/image_list/dslr.txt line 5: is not '<path> <label>': 'dslr/images/bottle/frame_0001.jpg'" \
        in problems
    assert f"{root}/image_list/dslr.txt line 7: label 31 is out of range (0..30)" in problems
    assert "office31: 121 images readable" in out  # 124 lines - 1 garbled - 1 missing - 1 truncated


def test_check_passes_on_good_data_and_list_shows_the_status(tmp_path, capsys, monkeypatch):
    from tllab.data.export import export_digits

    export_digits(tmp_path / "digits_files", ["uci"])
    monkeypatch.setenv("TLLAB_DATA_DIR", str(tmp_path))
    code, out, _ = tllab_data("check", "digits_files", "--domains", "uci", capsys=capsys)
    assert code == 0 and "digits_files: 1797 images readable, 0 problem(s)" in out
    code, out, _ = tllab_data("check", "image_folder", "--root", str(tmp_path / "digits_files"), capsys=capsys)
    assert code == 0 and "image_folder: 1797 images readable, 0 problem(s)" in out  # uci/{train,test}, not classes
    assert f"{tmp_path}/digits_files/uci/train " in out
    code, out, _ = tllab_data("list", capsys=capsys)
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert code == 0 and "incomplete: 6 of 8 lists missing" in rows["digits_files"]
    assert "A amazon 2817, D dslr 498, W webcam 795" in rows["office31"] and rows["office31"].endswith("absent")
    assert "c clipart 33525+14604" in rows["domainnet"]
    (tmp_path / "office_caltech" / "amazon").mkdir(parents=True)
    code, out, _ = tllab_data("list", capsys=capsys)
    assert "incomplete: folder dslr missing" in out
    for name in CATALOG:
        assert name in rows


def test_prepare_writes_lists_a_user_can_train_on(tmp_path, capsys):
    tree = tmp_path / "photos"
    for d, domain in enumerate(("studio_lights", "phone")):
        for c, cls in enumerate(("cat", "dog", "owl")):
            for k in range(5):
                write_jpeg(tree / domain / cls / f"{k}.jpg", seed=100 * d + 10 * c + k)
    odd = os.fsencode(tree / "studio_lights" / "owl") + b"/caf\xe9.jpg"  # a name that is not UTF-8
    os.rename(tree / "studio_lights" / "owl" / "4.jpg", odd)
    code, out, _ = tllab_data("prepare", "image-list", str(tree), str(tmp_path / "lists"), "--test-fraction", "0.4",
                              capsys=capsys)
    assert code == 0
    assert (tmp_path / "lists/classes.txt").read_text() == "cat\ndog\nowl\n"
    train = (tmp_path / "lists/studio_lights_train.txt").read_bytes().splitlines()
    test = (tmp_path / "lists/studio_lights_test.txt").read_bytes().splitlines()
    assert len(train) == 9 and len(test) == 6 and not set(train) & set(test)
    assert "studio_lights/cat/0.jpg 0" in (tmp_path / "lists/studio_lights.txt").read_bytes().decode(errors="replace")
    assert b"studio_lights/owl/caf\xe9.jpg 2\n" in (tmp_path / "lists/studio_lights.txt").read_bytes()
    overrides = shlex.split(out.split("tllab-train ", 1)[1])  # the command it prints
    assert "dataset.source=[phone] dataset.target=[studio_lights]" in out
    cfg, _ = resolve_config(compose_config([*overrides, *SMALL]))
    data = build_data(cfg.dataset, 0)
    assert data.classes == ["cat", "dog", "owl"] and len(data.eval_splits["target_test"]) == 6
    target = type(data.train).concat([data.unlabeled, data.eval_splits["target_test"]])
    x, _, _ = target.__getitems__(list(range(15)))  # every image of the domain, the odd name too
    assert x.shape == (15, 3, 32, 32)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server (with range requests, like the archive hosts) serving ``tmp_path/www``."""
    www = tmp_path / "www"
    www.mkdir()

    ranges: list[str] = []

    class Ranged(_QuietHandler):
        def send_head(self):
            path = Path(self.translate_path(self.path))
            ranges.append(self.headers.get("Range", ""))
            start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
            if not start or not path.is_file():
                return super().send_head()
            data = path.read_bytes()[start:]
            self.send_response(206)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return io.BytesIO(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Ranged, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_port}", ranges
    server.shutdown()


def _archive(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_fetches_resumes_checks_and_extracts(http_root, tmp_path):
    www, url, ranges = http_root
    payload = np.random.default_rng(0).bytes(20_000)  # incompressible: the archive is larger than the part
    md5 = _archive(www / "lists.tgz", {"image_list/a.txt": payload})
    root = tmp_path / "data"
    root.mkdir()
    whole = (www / "lists.tgz").read_bytes()
    (root / "lists.tgz.part").write_bytes(whole[:1000])  # an interrupted earlier attempt
    entries = [{"folder": "image_list", "archive": "lists.tgz", "url": f"{url}/lists.tgz", "md5": md5}]
    assert download_dataset(entries, root, "mine", log=lambda _: None) == ["image_list"]
    assert ranges == ["bytes=1000-"]  # only the missing part was asked for
    assert (root / "image_list/a.txt").read_bytes() == payload
    assert not (root / "lists.tgz").exists() and not (root / "lists.tgz.part").exists()
    assert download_dataset(entries, root, "mine", log=lambda _: None) == []  # already there
    bad = [{**entries[0], "folder": "other", "md5": "0" * 32}]
    with pytest.raises(DataError, match=r"lists.tgz from .* does not match its checksum"):
        download_dataset(bad, root, "mine", log=lambda _: None)
    gone = [{**entries[0], "folder": "other", "url": f"{url}/missing.tgz"}]
    with pytest.raises(DataError, match=rf"cannot download {url}/missing.tgz \(.*\); on a machine with internet, "
                                        rf"fetch it and extract it into {root} so that {root}/other exists"):
        download_dataset(gone, root, "mine", log=lambda _: None)


def test_download_offline_fails_in_one_line(tmp_path, capsys, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    code, _, err = tllab_data("download", "office31", "--root", str(tmp_path), capsys=capsys)
    (line,) = err.strip().splitlines()
    assert code == 1 and line.startswith("tllab-data: error: cannot download https://")
    assert f"so that {tmp_path}/image_list exists" in line
    for folder in ("image_list", "amazon", "dslr", "webcam"):
        (tmp_path / folder).mkdir()
    code, out, _ = tllab_data("download", "office31", "--root", str(tmp_path), capsys=capsys)
    assert code == 0 and out.count("exists; skipped") == 4


def test_unknown_dataset_is_one_line(capsys):
    code, _, err = tllab_data("check", "office32", capsys=capsys)
    assert code == 1 and err.startswith("tllab-data: error: unknown dataset 'office32'; available: aircraft,")

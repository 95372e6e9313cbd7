"""``tllab-data``: the dataset catalog and the data on disk.

::

    tllab-data list                                      # the catalog: domains, classes, images, on disk?
    tllab-data check office31 [--root DIR] [--domains A,W]  # every file there and decodable, counts, labels
    tllab-data download office31 [--root DIR]            # the published archives (needs internet)
    tllab-data prepare image-list TREE OUT [--test-fraction 0.2]   # lists for <TREE>/<domain>/<class>/*
    tllab-data export digits [DIR]                       # the embedded digits as image files + lists

A dataset is a ``configs/dataset/<name>.yaml``; ``--root`` (else ``dataset.root``, else
``$TLLAB_DATA_DIR/<name>``) says where it is, and further ``key=value`` arguments override its
``dataset.*`` keys (``domains={a: lists/a.txt}``).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.resources import files
from pathlib import Path

from tllab.data.layout import data_root, domain_spec
from tllab.errors import TllabError
from tllab.io import closed_pipe_exits_quietly
from tllab.schema import DatasetConfig

__all__ = ["catalog_names", "dataset_config", "main"]

GENERIC = ("image_list", "image_folder")


def catalog_names() -> list[str]:
    """Every dataset config shipped with tllab (``configs/dataset/*.yaml``)."""
    return sorted(p.name[:-5] for p in files("tllab.configs").joinpath("dataset").iterdir() if p.name.endswith(".yaml"))


def dataset_config(name: str, root: Path | None = None, overrides: list[str] = ()) -> DatasetConfig:
    """The composed ``dataset`` config of ``name`` (with ``dataset.root=root`` and ``overrides``)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from tllab.schema import register_configs

    if name not in catalog_names():
        raise TllabError(f"unknown dataset {name!r}; available: {', '.join(catalog_names())}.")
    register_configs()
    GlobalHydra.instance().clear()
    extra = [f"dataset.root={root}"] if root is not None else []
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset={name}", *extra, *(f"dataset.{o}" for o in overrides)])
    for key in ("source", "target"):  # the generic families leave them to the command line
        if OmegaConf.is_missing(cfg.dataset, key):
            cfg.dataset[key] = []
    return OmegaConf.to_object(cfg.dataset)


def _domain_summary(cfg: DatasetConfig) -> str:
    full = {key: name for name, key in cfg.aliases.items()}
    parts = []
    for key in cfg.domains:
        spec = domain_spec(key, cfg)
        sizes = [cfg.counts.get(p) for p in dict.fromkeys([spec.train, spec.test])]
        size = "+".join("?" if s is None else str(s) for s in sizes)
        parts.append(f"{key}{' ' + full[key] if key in full else ''} {size}")
    return ", ".join(parts)


def _status(cfg: DatasetConfig) -> str:
    """absent / incomplete (why) / complete: list files there, line counts as published, images there."""
    from tllab.data.files import read_image_list

    root = data_root(cfg)
    if root is None:
        return "no root ($TLLAB_DATA_DIR unset)"
    if not root.is_dir():
        return "absent"
    if cfg.family == "image_folder":
        folders = [domain_spec(key, cfg).train for key in cfg.domains]
        missing = [f for f in folders if not (root / f).is_dir()]
        return f"incomplete: folder {missing[0]} missing" if missing else "complete (folders present)"
    lists = list(dict.fromkeys(p for key in cfg.domains for p in domain_spec(key, cfg).files()))
    missing_lists = [p for p in lists if not (root / p).is_file()]
    if missing_lists:
        return f"incomplete: {len(missing_lists)} of {len(lists)} lists missing (e.g. {missing_lists[0]})"
    missing = 0
    for p in lists:
        index = read_image_list(root / p, root, problems=[], label_offset=cfg.label_offset)
        if cfg.counts.get(p, len(index.targets)) != len(index.targets):
            return f"incomplete: {p} lists {len(index.targets)} images, the published list {cfg.counts[p]}"
        missing += sum(not os.path.exists(os.path.join(root, index.paths[i])) for i in range(len(index.paths)))
    return f"incomplete: {missing} listed images missing" if missing else "complete"


def _list(args: argparse.Namespace) -> int:
    rows = [("dataset", "setting", "classes", "domains (key, name, images)", "root", "status")]
    for name in catalog_names():
        if name in GENERIC:
            continue
        cfg = dataset_config(name)
        if cfg.family == "digits":
            rows.append((name, "da/dg/finetune", "10", "mnist, uci, mnistm, synth (+ corruptions)", "-",
                         "embedded (built from pip packages)"))
            continue
        setting = str(getattr(cfg.setting, "value", cfg.setting))
        rows.append((name, setting, str(cfg.num_classes), _domain_summary(cfg), str(data_root(cfg) or "-"),
                     _status(cfg)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    print("\nRoot: dataset.root, else $TLLAB_DATA_DIR/<dataset>. Your own images: dataset=image_list or "
          "dataset=image_folder (README, Datasets).")
    return 0


def _check(args: argparse.Namespace) -> int:
    from tllab.data.check import check_dataset, format_report

    cfg = dataset_config(args.dataset, args.root, args.overrides)
    reports = check_dataset(cfg, args.workers, args.domains.split(",") if args.domains else None)
    print(format_report(reports))
    bad = sum(len(r.problems) for r in reports)
    print(f"\n{args.dataset}: {sum(r.readable for r in reports)} images readable, {bad} problem(s)"
          f" under {data_root(cfg)}")
    return 1 if bad else 0


def _download(args: argparse.Namespace) -> int:
    from tllab.data.download import download_dataset

    cfg = dataset_config(args.dataset, args.root)
    root = data_root(cfg)
    if root is None:
        raise TllabError(f"where should {args.dataset} go? Give --root DIR or set $TLLAB_DATA_DIR.")
    download_dataset(cfg.download, root, args.dataset)
    print(f"{args.dataset} is under {root}; `tllab-data check {args.dataset} --root {root}` verifies it.")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from tllab.data.export import prepare_image_lists

    counts = prepare_image_lists(args.tree, args.out, args.test_fraction, args.seed)
    out = args.out.resolve()
    for lists in counts.values():
        for name, n in lists.items():
            print(f"{out / name}: {n} images")
    domains = list(counts)
    entries = ", ".join(f"{d}: {{train: {out}/{d}_train.txt, test: {out}/{d}_test.txt}}" if args.test_fraction
                        else f"{d}: {out}/{d}.txt" for d in domains)
    print(f"\ntrain on them:\n  tllab-train dataset=image_list dataset.root={args.tree.resolve()} "
          f"dataset.classes={out}/classes.txt 'dataset.domains={{{entries}}}' "
          f"dataset.source=[{domains[0]}] dataset.target=[{domains[-1]}]")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tllab.data.export import export_digits

    out = args.dir or (Path(os.environ["TLLAB_DATA_DIR"]) / "digits_files" if os.environ.get("TLLAB_DATA_DIR")
                       else None)
    if out is None:
        raise TllabError("where should the files go? Give a DIR or set $TLLAB_DATA_DIR.")
    counts = export_digits(out, args.domains.split(","), args.seed)
    print(f"wrote {sum(counts.values())} PNGs and {len(counts)} lists under {out}\n"
          f"  tllab-train dataset=digits_files dataset.root={out}            # image_list, the digits' order\n"
          f"  tllab-train dataset=image_folder dataset.root={out} dataset.transform=resize dataset.image_size=32 "
          "dataset.mean=[0.5,0.5,0.5] dataset.std=[0.5,0.5,0.5] dataset.source=[mnist] dataset.target=[mnistm]")
    return 0


@closed_pipe_exits_quietly
def main(argv: list[str] | None = None) -> None:
    """Console entry point ``tllab-data``."""
    parser = argparse.ArgumentParser(prog="tllab-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the catalog, and what of it is on disk")
    check = sub.add_parser("check", help="every listed file exists and decodes; counts and labels as published")
    download = sub.add_parser("download", help="fetch and extract the published archives")
    for p in (check, download):
        p.add_argument("dataset", help="a dataset of `tllab-data list`, or image_list / image_folder")
        p.add_argument("--root", type=Path, help="where it is (default: dataset.root, else $TLLAB_DATA_DIR/<name>)")
    check.add_argument("--workers", type=int, help="decoding processes (default: one per CPU)")
    check.add_argument("--domains", help="only these domains, comma-separated (default: all)")
    check.add_argument("overrides", nargs="*", help="dataset keys, e.g. 'domains={a: lists/a.txt}'")
    prepare = sub.add_parser("prepare", help="write tllib-format lists for a folder tree of your own images")
    prepare.add_argument("what", choices=["image-list"])
    prepare.add_argument("tree", type=Path, help="<tree>/<domain>/<class>/<image>")
    prepare.add_argument("out", type=Path, help="folder for <domain>.txt (and _train/_test.txt) and classes.txt")
    prepare.add_argument("--test-fraction", type=float, default=0.0, help="per class, seeded (default: no split)")
    prepare.add_argument("--seed", type=int, default=0)
    export = sub.add_parser("export", help="write the embedded digits as image files and lists")
    export.add_argument("what", choices=["digits"])
    export.add_argument("dir", type=Path, nargs="?", help="default: $TLLAB_DATA_DIR/digits_files")
    export.add_argument("--domains", default="mnist,uci,mnistm,synth")
    export.add_argument("--seed", type=int, default=0, help="the digits' data_seed")
    args = parser.parse_args(argv)
    commands = {"list": _list, "check": _check, "download": _download, "prepare": _prepare, "export": _export}
    try:
        code = commands[args.command](args)
    except TllabError as e:
        print(f"tllab-data: error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()

"""The paper presets (configs/experiment/table_*.yaml for the real benchmarks): every row composes
with the preset's own backbone, runs on a fixture of its dataset's layout, and every reference
number names a method and task the preset's runs produce."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from torchvision import models as tvm

from tests.conftest import compose_config
from tests.image_fixtures import catalog_tree
from tllab.data.cli import dataset_config
from tllab.keys import group_keys
from tllab.report.references import BUILTIN, load_references
from tllab.sweep import expand_grid
from tllab.train import resolve_config, run

ROOT = Path(__file__).parents[1]

CONFIGS = Path(__file__).parents[1] / "tllab" / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("table_*.yaml") if "digits" not in p.stem)
MOCO = "moco"


def sweeper(preset: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.sweeper)


def jobs(preset: str) -> list[list[str]]:
    """The preset's jobs as its sweeper expands them (params x rows, less the equal-domain pairs)."""
    s = sweeper(preset)
    params = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in (s.get("params") or {}).items()])
    return expand_grid(BasicSweeper.split_arguments(params, None)[0], rows(preset), s.get("distinct") or [])


def rows(preset: str) -> dict[str, list[str]]:
    return {k: v for k, v in (sweeper(preset).get("rows") or {}).items() if v is not None}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    """ImageNet ResNet-18 weights in a private $TORCH_HOME and a MoCo-style ResNet-18 checkpoint."""
    root = tmp_path_factory.mktemp("weights")
    file = root / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    file.parent.mkdir(parents=True)
    torch.save(tvm.resnet18().state_dict(), file)
    moco = root / "moco_v1_200ep_pretrain.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in tvm.resnet18().state_dict().items()}}, moco)
    return {"torch_home": root / "torch", "moco": moco}


def _keys(preset: str, job: list[str]) -> dict:
    extra = ["backbone.pretrained=/moco.pth.tar"] if MOCO in preset else []
    cfg, _ = resolve_config(compose_config([f"experiment={preset}", *job, *extra]))
    assert cfg.backbone.name in ("resnet50", "resnet101", "resnet50_ibn_b")
    assert cfg.backbone.pretrained == ("/moco.pth.tar" if MOCO in preset else "imagenet")
    return group_keys(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_rows_compose_and_references_name_methods_and_tasks_the_preset_produces(preset):
    """Every row composes with the preset's own backbone and is a row of its own; every task of the
    grid is a column; every reference number sits in one of these cells."""
    grid, names = jobs(preset), rows(preset)
    task_keys = ("dataset.source=", "dataset.target=", "dataset.sample_rate=")
    tasks = sorted({tuple(o for o in job if o.startswith(task_keys)) for job in grid})
    assert len(grid) == len(names) * 3 * len(tasks)  # every task x row x 3 seeds
    methods = {_keys(preset, [*overrides, *tasks[0]])["method"] for overrides in names.values()}
    assert len(methods) == len(names)
    first = next(iter(names.values()))
    columns = {_keys(preset, [*first, *task])["task"] for task in tasks}
    keys = _keys(preset, [*first, *tasks[0]])
    refs = [r for r in load_references() if r.experiment == preset]
    assert refs, f"{preset} has no reference numbers"
    for ref in refs:
        assert (ref.dataset, ref.setting) == (keys["dataset"], keys["setting"])
        if ref.metric.endswith("/acc_class"):  # VisDA's per-class columns, not tasks
            assert len({t for _, t in ref.values}) == 12
            continue
        assert {m for m, _ in ref.values} <= methods and {t for _, t in ref.values} <= columns, ref.source
        assert not ref.paper or set(ref.paper) <= methods


def test_every_reference_file_parses_and_names_an_existing_preset():
    presets = {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    for path in BUILTIN.glob("*.yaml"):
        for ref in load_references([path]):
            assert ref.experiment is None or ref.experiment in presets, (path.name, ref.experiment)
            assert all(0 <= v <= 100 for v in ref.values.values())


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_two_steps_on_a_fixture_of_its_dataset(preset, planted, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted["torch_home"]))
    job = jobs(preset)[0]
    name = resolve_config(compose_config([f"experiment={preset}", *job,
                                          *(["backbone.pretrained=/x"] if MOCO in preset else [])]))[0].dataset.name
    root = tmp_path / name
    catalog_tree(root, dataset_config(name))
    overrides = [f"experiment={preset}", *job, "backbone=resnet18", f"dataset.root={root}", "dataset.image_size=32",
                 "trainer.batch_size=6", "trainer.max_steps=2", "trainer.eval_every=2",
                 "trainer.num_workers=0", "dataset.val_fraction=0.5"]
    overrides += ["backbone.pretrained=imagenet"] if MOCO not in preset else [f"backbone.pretrained={planted['moco']}"]
    summary = run(compose_config(overrides), tmp_path / "run")
    assert summary["steps"] == 2 and 0 <= summary["final"]["target_test/acc"] <= 1
    assert "target_test/acc_per_class_mean" in summary["final"]


@pytest.mark.parametrize(("args", "sweep", "out"), [
    ([], "outputs/sweeps/table_digits_da", "docs/results/digits_da"),
    (["--jobs", "2", "trainer.quiet=true", "hydra.launcher.partition=gpu"], "outputs/sweeps/table_digits_da",
     "docs/results/digits_da"),  # how the jobs run, not what they compute
    (["trainer.max_steps=10"], "outputs/sweeps/table_digits_da-custom", "outputs/reports/digits_da"),
    (["trainer.max_steps=10", "--publish"], "outputs/sweeps/table_digits_da", "docs/results/digits_da"),
])
def test_table_scripts_write_docs_results_only_with_the_recipe_or_publish(args, sweep, out):
    script = 'source scripts/lib/table_dirs.sh; table_dirs table_digits_da "$@"; echo "$SWEEP|$OUT|${ARGS[*]}"'
    done = subprocess.run(["bash", "-c", script, "_", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"{sweep}|{out}|{' '.join(a for a in args if a != '--publish')}"
    assert ("pass --publish" in done.stderr) == (out.startswith("outputs/"))


def test_table_script_gives_metric_and_baseline_to_the_report_and_the_rest_to_the_sweep(tmp_path: Path):
    """``scripts/table.sh`` routes its options: --metric and --baseline (a row name with spaces) to
    tllab-report, launch options and overrides to tllab-sweep; the digits scripts name their baseline row."""
    for name in ("tllab-sweep", "tllab-report"):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/{name}.args\n')
        stub.chmod(0o755)
    subprocess.run(["bash", "scripts/table.sh", "table_digits_dg", "last", "--baseline", "source only", "--jobs", "2",
                    "--metric", "target_test/acc_per_class_mean", "trainer.max_steps=10"],
                   cwd=ROOT, env={**os.environ, "TLLAB_BIN": str(tmp_path)}, capture_output=True, check=True)
    launched = (tmp_path / "tllab-sweep.args").read_text().splitlines()
    reported = (tmp_path / "tllab-report.args").read_text().splitlines()
    assert launched == ["launch", "outputs/sweeps/table_digits_dg-custom", "experiment=table_digits_dg", "--jobs", "2",
                        "trainer.max_steps=10"]
    assert reported[:9] == ["outputs/sweeps/table_digits_dg-custom", "--out", "outputs/reports/digits_dg",
                            "--selection", "last", "--metric", "target_test/acc_per_class_mean",
                            "--baseline", "source only"]
    baselines = {"table_digits_da.sh": '--baseline "source only"', "table_digits_dg.sh": "--baseline erm",
                 "table_digits_finetune.sh": "--baseline fine-tune",
                 "table_digits_finetune_weights.sh": "--baseline fine-tune"}
    for script, option in baselines.items():
        assert option in (ROOT / "scripts" / script).read_text(), script


def test_every_table_script_chooses_its_dirs_through_table_dirs():
    for script in (ROOT / "scripts").glob("table*.sh"):
        text = script.read_text()
        assert "table_dirs" in text or "table.sh" in text, script.name
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "docs/results" not in code, script.name  # never a hard-coded output dir

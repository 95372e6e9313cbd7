"""Every config option composes and instantiates; bad configs fail early and readably."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.conftest import compose_config
from tllab.data import check_dataset_config
from tllab.errors import ConfigError
from tllab.models import Classifier, create_backbone
from tllab.optim import build_optimizer, build_scheduler, lr_factor
from tllab.plugin import build_plugins
from tllab.schema import leave_out
from tllab.train import resolve_config

CONFIGS = Path(__file__).parents[1] / "tllab" / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_top_level_configs_dir_is_the_package_configs():
    top = Path(__file__).parents[1] / "configs"
    assert top.resolve() == CONFIGS.resolve()
    assert (top / "train.yaml").is_file()


@pytest.mark.parametrize("name", options("backbone"))
def test_every_backbone_builds_and_classifies(name):
    cfg, _ = resolve_config(compose_config([f"backbone={name}"]))
    b = cfg.backbone
    model = Classifier(create_backbone(b.library, b.name, b.pretrained, **b.kwargs), 10, b.bottleneck_dim).eval()
    logits, f = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and f.shape == (2, model.features_dim)


@pytest.mark.parametrize("name", options("optim"))
def test_every_optimizer_and_schedule_builds(name):
    cfg, _ = resolve_config(compose_config([f"optim={name}"]))
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(cfg.optim, [{"params": model.parameters(), "lr": cfg.optim.lr}])
    sched = build_scheduler(cfg.optim.scheduler, opt, total_steps=100)
    assert type(opt).__name__.lower() == name
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * lr_factor(cfg.optim.scheduler, 0, 100))
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * lr_factor(cfg.optim.scheduler, 50, 100))


@pytest.mark.parametrize("group", ["dataset", "trainer", "logger"])
def test_every_option_of_plain_groups_composes(group):
    for name in options(group):
        if group == "dataset" and name in ("image_list", "image_folder"):
            continue  # the user names the domains (tests/test_files.py); the catalog: tests/test_catalog.py
        cfg, resolved = resolve_config(compose_config([f"{group}={name}"]))
        assert resolved[group]
        if group == "dataset" and cfg.dataset.family == "digits":
            check_dataset_config(cfg.dataset)


@pytest.mark.parametrize("group", ["norm", "regularizer", "align"])
def test_method_groups_start_with_none(group):
    cfg, _ = resolve_config(compose_config([f"{group}=none"]))
    assert getattr(cfg, group) == {}
    assert build_plugins(group, getattr(cfg, group)) == {}
    for name in options(group):
        build_plugins(group, getattr(resolve_config(compose_config([f"{group}={name}"]))[0], group))


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes(name):
    moco = ["backbone.pretrained=/moco_v1_200ep_pretrain.pth.tar"] if "moco" in name else []  # a mandatory path
    cfg, _ = resolve_config(compose_config([f"experiment={name}", *moco]))
    assert cfg.experiment == name
    if cfg.dataset.family == "digits":  # file datasets need their files: tests/test_presets.py runs them on fixtures
        check_dataset_config(cfg.dataset)


def test_stacked_methods_keep_selection_order():
    cfg, _ = resolve_config(compose_config(["norm=[recorder]", "regularizer=[nan_at]", "norm.recorder.weight=0.5"]))
    assert list(cfg.norm) == ["recorder"] and cfg.norm["recorder"]["weight"] == 0.5
    plugins = build_plugins("norm", cfg.norm)
    assert plugins["recorder"].weight == 0.5


def _composition_error(overrides: list[str]) -> str:
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as info:
        compose_config(overrides)
    err = info.value
    return f"{err} {err.__cause__ or ''}"


def test_typo_key_is_rejected():
    msg = _composition_error(["trainer.max_stpes=5"])
    assert "max_stpes" in msg and "TrainerConfig" in msg


def test_wrong_type_is_rejected():
    msg = _composition_error(["trainer.max_steps=abc"])
    assert "could not be converted to Integer" in msg and "trainer.max_steps" in msg


def test_unknown_group_option_is_rejected():
    msg = _composition_error(["backbone=resnet999"])
    assert "Could not find 'backbone/resnet999'" in msg


@pytest.mark.parametrize(("override", "valid"), [("optim.name=rmsprop", "sgd"), ("logger.mode=ofline", "offline")])
def test_unknown_enum_value_is_rejected(override, valid):
    msg = _composition_error([override])
    assert override.split("=")[1] in msg and valid in msg


def test_unknown_plugin_option_is_rejected_before_data():
    cfg, _ = resolve_config(compose_config(["norm=[recorder]", "+norm.recorder.wieght=1"]))
    with pytest.raises(ConfigError, match=r"norm.recorder: unknown option\(s\) \['wieght'\]; valid options"):
        build_plugins("norm", cfg.norm)


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(ConfigError, match="backbone.pretrained must be set"):
        resolve_config(compose_config(["backbone.pretrained=???"]))


@pytest.mark.parametrize(("overrides", "match"), [
    (["dataset.source=[mnsit]"], "mnsit"),
    (["dataset.setting=dg", "dataset.source=[mnist,mnistm]"], "both a source and a target"),
    (["dataset.labels_per_class=5"], "set dataset.setting=finetune"),
    (["dataset.setting=finetune", "dataset.sample_rate=150"], r"percentage in \(0, 100\]"),
    (["dataset.family=office99"], "unknown dataset.family 'office99'"),
])
def test_bad_dataset_configs_are_rejected(overrides, match):
    cfg, _ = resolve_config(compose_config(overrides))
    with pytest.raises(ConfigError, match=match):
        check_dataset_config(cfg.dataset)


def test_slurm_launcher_config_composes_with_one_gpu_per_process():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.nodes) == (1, 1)
    assert launcher.gpus_per_node == 4  # follows trainer.devices


def test_leave_one_domain_out_preset_trains_on_the_other_domains():
    cfg, resolved = resolve_config(compose_config(["experiment=table_digits_dg", "dataset.target=[uci]"]))
    assert cfg.dataset.source == ["mnist", "synth", "mnistm"] and resolved["dataset"]["source"] == cfg.dataset.source
    assert leave_out(["a", "b", "c"], ["b"]) == ["a", "c"]


@pytest.mark.parametrize("preset, grid", [
    ("table_digits_da", {"seed": "0,1,2", "dataset.target": "[mnistm],[uci]",
                         "norm": "none,adabn,afn,stochnorm,bin,domainnorm,ibn_a,ibn_b,mixstyle,cnsn"}),
    ("table_digits_dg", {"seed": "0,1,2", "dataset.target": "[mnist],[uci],[synth],[mnistm]",
                         "norm": "none,ibn_a,ibn_b,mixstyle,cnsn,domainnorm,bin,stochnorm"}),
    ("table_digits_finetune", {"seed": "0,1,2", "dataset.labels_per_class": "5,20",
                               "regularizer": "none,l2,l2sp,delta,bss,lwf,co_tuning,bi_tuning",
                               "backbone.pretrained": "outputs/pretrained/digits_mnist/checkpoints/last.pt"}),
])
def test_table_presets_hold_their_grid_and_sweep_dir(preset, grid):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        hydra_cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True).hydra
    assert dict(hydra_cfg.sweeper.params) == grid
    assert hydra_cfg.sweeper._target_.endswith("TllabSweeper")
    assert hydra_cfg.sweep.dir == f"outputs/sweeps/{preset}"


@pytest.mark.parametrize(("overrides", "match"), [
    (["seed=-1"], r"seed=-1 is invalid: it must be in \[0, 2\*\*32\)"),
    (["dataset.data_seed=-1"], r"dataset.data_seed=-1 is invalid"),
    (["optim.momentum=-1"], r"optim.momentum=-1.0 is invalid: it must be in \[0, 1\)"),
    (["optim.betas=[0.9]"], r"optim.betas=\[0.9\] is invalid: it must be \[beta1, beta2\] in \[0, 1\)"),
    (["optim.betas=[1.5,0.999]"], r"optim.betas=\[1.5, 0.999\] is invalid"),
    (["dataset.mean=[0.5]"], r"dataset.mean=\[0.5\] is invalid: it must be one value per RGB channel"),
    (["dataset.std=[0.5,0.5,0]"], r"dataset.std=\[0.5, 0.5, 0.0\] is invalid"),
    (["trainer=ddp", "trainer.devices=0"], r"trainer.devices=0 is invalid: it must be >= 1"),
    (["+trainer.max_stpes=5"], r"trainer.max_stpes is not a config key \(did you mean trainer.max_steps\?\)"),
    (["+foo=1"], r"foo is not a config key \(top level keys: experiment, label, seed"),
])
def test_bad_values_are_refused_in_one_line_before_anything_runs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(compose_config(overrides))


def test_more_cpu_processes_than_cores_are_refused_unless_forced(tmp_path, monkeypatch):
    from tllab import launch
    from tllab.train import run

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(launch.mp, "spawn", lambda *a, **k: pytest.fail("spawned"))
    with pytest.raises(ConfigError, match=r"trainer.devices=64 would start 64 CPU processes on 2 cores; lower "
                                          r"trainer.devices \(at most 2\) or set trainer.oversubscribe=true"):
        run(compose_config(["trainer=ddp", "trainer.devices=64", "trainer.device=cpu"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(pytest.fail.Exception, match="spawned"):
        run(compose_config(["trainer=ddp", "trainer.devices=64", "trainer.device=cpu", "trainer.oversubscribe=true"]),
            tmp_path / "forced")


def test_an_unknown_backbone_argument_is_one_line():
    with pytest.raises(ConfigError, match=r"backbone.kwargs.foo is not an argument of the tllab model 'digits_cnn'"):
        resolve_and_build(["+backbone.kwargs.foo=1"])


def resolve_and_build(overrides: list[str]) -> torch.nn.Module:
    from tllab.trainer import build_model

    cfg, _ = resolve_config(compose_config(overrides))
    return build_model(cfg, [])


def test_a_list_of_options_with_an_unknown_one_names_the_available_options():
    from tllab.train import check_command_line

    with pytest.raises(ConfigError, match=r"norm=\[adabn,foonorm\]: 'foonorm' is not an option of norm; available: "
                                          r"adabn, afn, bin, .*stochnorm"):
        check_command_line(["norm=[adabn,foonorm]", "seed=1"])
    check_command_line(["norm=[adabn,mixstyle]", "regularizer=[l2sp,bss]", "seed=1"])
    check_command_line([f"hydra.searchpath=[file://{Path(__file__).parent / 'configs'}]", "norm=[recorder]"])


def test_choices_print_as_their_value_in_messages():
    from tllab.schema import Library

    assert f"{Library.tllab}" == str(Library.tllab) == "tllab" and f"{Library.timm:>6}" == "  timm"


@pytest.mark.parametrize("norm", ["bin", "domainnorm"])
def test_a_feature_map_too_small_for_the_norm_is_refused_before_any_data_is_loaded(tmp_path, monkeypatch, norm):
    from tllab import trainer
    from tllab.train import run

    monkeypatch.setattr(trainer, "build_data", lambda *a: pytest.fail("data loaded"))
    with pytest.raises(ConfigError, match=rf"backbone=resnet18 with norm={norm} cannot take 32x32 images \(.*one "
                                          r".*position.*\); set a larger dataset.image_size"):
        run(compose_config(["backbone=resnet18", f"norm={norm}"]), tmp_path / "run")

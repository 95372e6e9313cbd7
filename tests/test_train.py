"""End-to-end behaviour of the trainer: outputs, resume, NaN handling, plug-ins, wandb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import FAST, compose_config, interrupt_then_resume
from tllab.errors import NonFiniteLossError
from tllab.train import resolve_config
from tllab.trainer import Trainer

ROOT = Path(__file__).parents[1]
EVAL_SPLITS = ("source_val", "source_test", "target_test")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_short_run_writes_config_records_summary_and_done(train_run, tmp_path):
    summary = train_run("seed=3")
    run_dir = tmp_path / "run"
    assert (run_dir / "done").exists()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["seed"] == 3 and config["dataset"]["target"] == ["mnistm"]
    assert "${" not in (run_dir / "config.yaml").read_text()
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [3, 6]
    for r in recs:
        for split in EVAL_SPLITS:
            assert 0.0 <= r[f"{split}/acc"] <= 1.0 and r[f"{split}/loss"] > 0
        assert r["train/loss"] > 0 and r["time"] > 0 and r["lr"] == pytest.approx(1e-3)
        assert {k: r[k] for k in ("backbone", "norm", "regularizer", "dataset", "source", "target", "seed")} == {
            "backbone": "digits_cnn", "norm": "none", "regularizer": "none", "dataset": "digits",
            "source": "mnist", "target": "mnistm", "seed": 3}
    assert recs[1]["epoch"] == pytest.approx(6 / 57, abs=1e-4)  # 3,600 train images / 64
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["final"]["target_test/acc"] == recs[-1]["target_test/acc"]
    assert saved["best"]["step"] in (3, 6) and saved["selection_split"] == "source_val"
    assert (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "checkpoints" / "best.pt").exists()
    for name in ("last.pt", "best.pt"):  # a source model for fine-tuning: weights and class names
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert state["classes"] == [str(c) for c in range(10)] and "head.weight" in state["model"]
    # A completed run dir is not trained again.
    mtime = (run_dir / "results.jsonl").stat().st_mtime_ns
    assert train_run("seed=3")["final"] == summary["final"]
    assert (run_dir / "results.jsonl").stat().st_mtime_ns == mtime


def test_training_learns_source(train_run):
    summary = train_run("trainer.max_steps=40", "trainer.eval_every=40")
    assert summary["final"]["source_test/acc"] > 0.8


def test_resume_after_interruption_matches_uninterrupted_run(train_run, tmp_path, monkeypatch):
    # Noisy draws from the global RNG and keeps a counter buffer: RNG and plug-in state must be restored.
    overrides = ("trainer.deterministic=true", "trainer.max_steps=9", "trainer.eval_every=3", "optim=sgd",
                 "regularizer=[noisy]")
    train_run(*overrides, run_dir=tmp_path / "a")

    def train(run_dir):
        if (run_dir / "checkpoints/last.pt").exists():  # the second call: after the interruption
            assert not (run_dir / "done").exists()
            assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["step"] == 3
        train_run(*overrides, run_dir=run_dir)

    interrupt_then_resume(train, tmp_path / "b", monkeypatch)

    def metrics(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / run)]

    assert [r["step"] for r in records(tmp_path / "b")] == [3, 6, 9]
    assert metrics("a") == metrics("b")
    wa = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)
    wb = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)
    for key in wa["model"]:
        assert torch.equal(wa["model"][key], wb["model"][key]), key
    assert wa["optimizer"]["state"][0]["momentum_buffer"].equal(wb["optimizer"]["state"][0]["momentum_buffer"])
    assert wb["plugins"]["regularizer.noisy"]["calls"].item() == 9


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(train_run, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 .*regularizer.nan_at/bad=nan.*last.pt"):
        train_run("regularizer=[nan_at]", "regularizer.nan_at.at_step=5")
    run_dir = tmp_path / "run"
    assert not (run_dir / "done").exists()
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in records(run_dir)] == [3]


def test_plugin_hooks_run_in_order_and_stack_across_groups(tmp_path):
    cfg, resolved = resolve_config(compose_config([*FAST, "norm=[recorder]", "regularizer=[recorder]"]))
    trainer = Trainer(cfg, tmp_path, resolved)
    assert trainer.model.recorder_tags == ["norm", "reg"]
    summary = trainer.fit()
    norm, reg = trainer.plugins["norm.recorder"], trainer.plugins["regularizer.recorder"]
    assert reg.calls.count("loss") == 6 and reg.weight == 0.2
    assert norm.calls[:2] == ["transform_model", f"setup:{len(trainer.data.train)}"]
    assert norm.calls.count("loss") == 6 and norm.calls.count("eval_model") == 2 * 3  # 2 evaluations x 3 splits
    assert 0.0 <= norm.gate.item() <= 1.0  # after_step clamped the plug-in's own parameter
    assert any(norm.gate is p for g in trainer.optimizer.param_groups for p in g["params"])
    # A model parameter claimed by a plug-in sits only in the plug-in's group (lr 0: unchanged).
    bias = trainer.model.head.bias
    owners = [g.get("name") for g in trainer.optimizer.param_groups for p in g["params"] if p is bias]
    assert owners == ["frozen"] and torch.equal(bias.detach(), norm.head_bias_at_setup)
    rec = records(tmp_path)[-1]
    assert rec["norm"] == "recorder" and rec["regularizer"] == "recorder"
    assert rec["train/norm.recorder/feat"] > 0 and rec["train/regularizer.recorder/feat"] > 0
    assert rec["train/loss"] == pytest.approx(rec["train/ce"] + rec["train/norm.recorder/feat"]
                                              + rec["train/regularizer.recorder/feat"], rel=1e-5)
    assert summary["norm"] == "recorder"


def test_dg_and_finetune_settings(train_run, tmp_path):
    dg = train_run("experiment=digits_dg", "dataset.source=[mnist,uci]", run_dir=tmp_path / "dg")
    assert {"source_val/mnist/acc", "source_val/uci/acc", "target_test/acc"} <= set(dg["final"])
    assert dg["source"] == "mnist+uci" and dg["setting"] == "dg"
    ckpt = tmp_path / "dg" / "checkpoints" / "last.pt"
    ft = train_run("experiment=digits_finetune", f"backbone.pretrained={ckpt}", run_dir=tmp_path / "ft")
    assert ft["selection_split"] == "target_val" and "target_test/acc" in ft["final"]


def wandb_config_items(run_file: Path, keys: list[str]) -> dict:
    """Read config items from an offline ``.wandb`` log: each is a protobuf ConfigItem holding
    the key and (field 16, tag 0x82 0x01) a length-prefixed JSON value."""
    data, out = run_file.read_bytes(), {}
    for key in keys:
        i = data.rfind(key.encode() + b"\x82\x01")
        assert i >= 0, f"config key {key} not in {run_file}"
        i += len(key) + 2
        length, shift = 0, 0
        while True:  # protobuf varint
            byte = data[i]
            length |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                break
        out[key] = json.loads(data[i:i + length])
    return out


def test_wandb_offline_run_holds_resolved_config(train_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_run("logger=wandb", "trainer.max_steps=3", "seed=7")
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_config_items(run_file, list(resolved)) == resolved
    assert resolved["seed"] == 7 and resolved["logger"]["wandb"] is True
    # Group keys join the run config (dashboards group by them) and name the group and tags.
    assert wandb_config_items(run_file, ["method", "task", "setting"]) == {
        "method": "source only", "task": "mnist→mnistm", "setting": "da"}
    data = run_file.read_bytes()
    for text in ["method:source only", "task:mnist→mnistm", "dataset:digits", "digits/mnist→mnistm",
                 "source only | mnist→mnistm | seed 7"]:
        assert text.encode() in data, text


@pytest.mark.slow
def test_cli_main_job_prints_table_and_bad_config_fails_cleanly(tmp_path):
    run_dir = tmp_path / "cli"
    out = subprocess.run([sys.executable, "-m", "tllab.train", "trainer.max_steps=5", "trainer.quiet=true",
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "target_test/acc" in out.stdout and str(run_dir) in out.stdout
    bad = subprocess.run([sys.executable, "-m", "tllab.train", "dataset.source=[mnsit]",
                          f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1
    assert "tllab: error: dataset digits:" in bad.stderr and "mnsit" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert "mnsit" in (tmp_path / "bad" / "error.txt").read_text()


@pytest.mark.slow
def test_main_job_reproduces_the_reference_gap(train_run):
    """The README's main job (3 epochs, mnist -> mnistm): reference 0.956 source / 0.349 target."""
    summary = train_run("trainer.max_steps=null", "trainer.eval_every=null")
    assert summary["steps"] == 3 * 57
    assert summary["final"]["source_test/acc"] > 0.93
    assert 0.15 < summary["final"]["target_test/acc"] < 0.6


def test_grad_clip_bounds_the_update_and_amp_runs_on_cpu(tmp_path):
    cfg, resolved = resolve_config(compose_config([*FAST, "trainer.grad_clip=0.01"]))
    trainer = Trainer(cfg, tmp_path / "clip", resolved)
    trainer.train_step()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert norm == pytest.approx(0.01, rel=1e-4)  # the raw gradient norm is far larger

    cfg, resolved = resolve_config(compose_config([*FAST, "trainer.amp=true", "trainer.amp_dtype=bfloat16"]))
    trainer = Trainer(cfg, tmp_path / "amp", resolved)
    with trainer.autocast():
        logits, _ = trainer.model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.bfloat16
    summary = trainer.fit()
    assert summary["final"]["source_test/acc"] > 0.2


def test_resuming_with_another_model_or_a_corrupt_checkpoint_fails_clearly(train_run, tmp_path):
    from tllab.errors import CheckpointError, ConfigError

    run_dir = tmp_path / "run"
    first = train_run("trainer.max_steps=3", "trainer.eval_every=3", "seed=1")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["backbone"]["load_head"]  # a run of a tllab version before that key: it had the default
    for key in ("family", "domains", "aliases", "classes", "counts", "label_offset", "download", "transform",
                "resize_size", "crop_scale", "color_jitter", "skip_bad_images"):  # keys of file datasets
        del saved["dataset"][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train_run("trainer.max_steps=3", "trainer.eval_every=3", "seed=1") == first  # done, not redone
    with pytest.raises(ConfigError, match=r"holds a run with another config \(seed: 1 -> 2\)"):
        train_run("trainer.max_steps=3", "trainer.eval_every=3", "seed=2")  # even when complete
    (run_dir / "done").unlink()
    with pytest.raises(ConfigError, match=r"backbone.bottleneck_dim: None -> 32; trainer.max_steps: 3 -> 6"):
        train_run("trainer.max_steps=6", "backbone.bottleneck_dim=32", "seed=1")
    (run_dir / "config.yaml").unlink()  # without config.yaml, the checkpoint's copy of the config is checked
    with pytest.raises(ConfigError, match=r"backbone.bottleneck_dim: None -> 32; trainer.max_steps: 3 -> 6"):
        train_run("trainer.max_steps=6", "backbone.bottleneck_dim=32", "seed=1")
    assert not (run_dir / "config.yaml").exists()  # refused: nothing written
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*last.pt"):
        train_run("trainer.max_steps=6", "backbone.bottleneck_dim=32", "seed=1")
    with pytest.raises(CheckpointError, match="trainer.resume=true but .* does not exist"):
        train_run("trainer.resume=true", run_dir=tmp_path / "fresh")


def test_diverging_weights_are_never_checkpointed_or_recorded(train_run, tmp_path):
    with pytest.raises(NonFiniteLossError, match="Lower optim.lr"):
        train_run("optim=sgd", "optim.lr=1e6", "trainer.eval_every=2", "trainer.max_steps=12")
    run_dir = tmp_path / "run"
    text = (run_dir / "results.jsonl").read_text() if (run_dir / "results.jsonl").exists() else ""
    assert "NaN" not in text and "Infinity" not in text
    for line in text.splitlines():
        json.loads(line)
    for name in ("last.pt", "best.pt"):
        if (run_dir / "checkpoints" / name).exists():
            state = torch.load(run_dir / "checkpoints" / name, weights_only=True)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_plugin_can_replace_the_forward_pass_but_only_one(tmp_path):
    from tllab.errors import ConfigError

    cfg, resolved = resolve_config(compose_config([*FAST, "norm=[split_forward]"]))
    trainer = Trainer(cfg, tmp_path / "one", resolved)
    trainer.fit()
    assert trainer.plugins["norm.split_forward"].calls == 6
    cfg, resolved = resolve_config(compose_config([*FAST, "norm=[split_forward]", "regularizer=[split_forward]"]))
    with pytest.raises(ConfigError, match="norm.split_forward and regularizer.split_forward both replace"):
        Trainer(cfg, tmp_path / "two", resolved)


def test_two_plugins_with_the_same_exclusive_role_are_refused(tmp_path):
    from tllab.errors import ConfigError

    cfg, resolved = resolve_config(compose_config(
        [*FAST, "regularizer=[replaces_head,noisy]", "+regularizer.other._target_=tests.plugins.ReplacesHead"]))
    with pytest.raises(ConfigError, match="regularizer.replaces_head and regularizer.other both replace the model's "
                                          "head; they cannot be stacked"):
        Trainer(cfg, tmp_path / "run", resolved)


@pytest.mark.parametrize(("overrides", "match"), [
    (["trainer.batch_size=0"], r"trainer.batch_size=0 is invalid: it must be >= 1"),
    (["trainer.max_steps=0"], r"trainer.max_steps=0 is invalid: it must be >= 1 or null"),
    (["optim.lr=-1"], r"optim.lr=-1.0 is invalid: it must be > 0"),
    (["trainer.device=gpu"], "trainer.device=gpu is not a device name"),
    (["norm=[recorder]", "norm.recorder.weight=abc"], r"norm.recorder.weight='abc' has the wrong type: expected float"),
    (["norm=[recorder]", "dataset.setting=dg"], r"\['norm.recorder'\] need unlabelled target data"),
    (["dataset.num_classes=5"], r"dataset.num_classes=5 but the labels go up to 9"),
    (["experiment=digits_dg", "dataset.sampler=domain_balanced"], r"multiple of the number of training domains \(3\)"),
    (["dataset.crop_scale=[0.9,0.2]"], r"dataset.crop_scale=\[0.9, 0.2\] is invalid: it must be \[min, max\] with 0 <"),
    (["dataset.resize_size=16"], r"dataset.resize_size=16 is invalid: it must be >= dataset.image_size \(32\)"),
    (["dataset.label_offset=-1"], r"dataset.label_offset=-1 is invalid: it must be >= 0"),
])
def test_config_errors_fail_before_training(overrides, match, tmp_path, monkeypatch):
    from tllab.errors import ConfigError

    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("training started"))
    with pytest.raises(ConfigError, match=match):
        cfg, resolved = resolve_config(compose_config([*FAST, *overrides]))
        Trainer(cfg, tmp_path, resolved)


def test_load_head_continues_the_source_model_and_refuses_a_mismatch(pretrained, tmp_path):
    from tllab.errors import CheckpointError, ConfigError

    ckpt = pretrained()
    source = torch.load(ckpt, weights_only=True)["model"]
    cfg, resolved = resolve_config(compose_config(
        [*FAST, "experiment=digits_finetune", f"backbone.pretrained={ckpt}", "backbone.load_head=true"]))
    trainer = Trainer(cfg, tmp_path / "a", resolved)
    for key, value in trainer.model.state_dict().items():  # backbone and head: the source model
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, source[key], msg=key)
    cfg, resolved = resolve_config(compose_config([*FAST, "experiment=digits_finetune", f"backbone.pretrained={ckpt}",
                                                   "backbone.load_head=true", "backbone.bottleneck_dim=16"]))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        Trainer(cfg, tmp_path / "b", resolved)
    with pytest.raises(ConfigError, match="backbone.load_head=true needs backbone.pretrained"):
        resolve_config(compose_config(["backbone.load_head=true"]))


def test_prefetching_the_next_batch_changes_no_number_and_resumes_exactly(train_run, tmp_path, monkeypatch):
    """On CUDA the trainer fetches the next step's batches one step ahead; forced on here (CPU), a DA run
    with a target loader, interrupted and resumed, gives the records of a plain run."""
    overrides = ("trainer.deterministic=true", "trainer.max_steps=9", "trainer.eval_every=3", "optim=sgd",
                 "norm=afn")
    train_run(*overrides, run_dir=tmp_path / "plain")
    original = Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.prefetch = True

    monkeypatch.setattr(Trainer, "__init__", init)
    fetched = []
    fetch = Trainer._fetch
    monkeypatch.setattr(Trainer, "_fetch", lambda self: fetched.append(self.step) or fetch(self))
    interrupt_then_resume(lambda run_dir: train_run(*overrides, run_dir=run_dir), tmp_path / "ahead", monkeypatch)
    # steps 1, 2 fetched ahead by steps 0, 1; none ahead of a checkpoint (after steps 3, 6, 9)
    assert fetched[:3] == [0, 0, 1]

    def metrics(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / run)]

    assert metrics("plain") == metrics("ahead")


def test_channels_last_on_cpu_gives_the_same_training(train_run, tmp_path):
    a = train_run("trainer.max_steps=3", "backbone=resnet18", run_dir=tmp_path / "a")
    b = train_run("trainer.max_steps=3", "backbone=resnet18", "trainer.channels_last=true", run_dir=tmp_path / "b")
    assert b["final"]["target_test/acc"] == pytest.approx(a["final"]["target_test/acc"], abs=0.01)
    assert b["final"]["train/loss"] == pytest.approx(a["final"]["train/loss"], rel=1e-2)  # other summation order
    weights = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["model"]["backbone.conv1.weight"]
    assert weights.shape == (64, 3, 7, 7)  # checkpoints hold ordinary tensors either way


@pytest.mark.slow
def test_compiled_backbone_trains_like_the_eager_one_and_keeps_checkpoint_names(train_run, tmp_path):
    eager = train_run("trainer.max_steps=3", run_dir=tmp_path / "eager")
    compiled = train_run("trainer.max_steps=3", "trainer.compile=true", run_dir=tmp_path / "compiled")
    assert compiled["final"]["train/loss"] == pytest.approx(eager["final"]["train/loss"], rel=1e-3)
    assert compiled["final"]["target_test/acc"] == pytest.approx(eager["final"]["target_test/acc"], abs=0.01)
    a, b = (torch.load(tmp_path / d / "checkpoints/last.pt", weights_only=True)["model"] for d in ("eager", "compiled"))
    assert list(a) == list(b)  # no _orig_mod. prefix: eager and compiled checkpoints are interchangeable


@pytest.mark.parametrize(("mode", "passes"), [("joint", [16]), ("separate", [8, 8])])
def test_forward_mode_decides_which_batch_batchnorm_normalises(tmp_path, mode, passes):
    cfg, resolved = resolve_config(compose_config([*FAST, "norm=afn", "trainer.batch_size=8",
                                                   f"trainer.forward={mode}"]))
    trainer = Trainer(cfg, tmp_path, resolved)
    seen: list[int] = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    trainer.train_step()
    assert seen == passes  # separate: source and target each normalised with their own batch statistics


def test_separate_passes_are_refused_with_a_plugin_that_replaces_the_forward_pass(tmp_path):
    from tllab.errors import ConfigError

    cfg, resolved = resolve_config(compose_config([*FAST, "norm=[split_forward]", "trainer.forward=separate"]))
    with pytest.raises(ConfigError, match=r"norm.split_forward replaces the forward pass, so trainer.forward=separate"):
        Trainer(cfg, tmp_path, resolved)


def test_a_float64_run_loads_a_float64_checkpoint_without_rounding(pretrained, tmp_path):
    ckpt = pretrained("trainer.precision=float64")
    cfg, resolved = resolve_config(compose_config([*FAST, "experiment=digits_finetune", f"backbone.pretrained={ckpt}",
                                                   "trainer.precision=float64"]))
    weights = Trainer(cfg, tmp_path, resolved).model.backbone.state_dict()
    stored = torch.load(ckpt, weights_only=True)["model"]
    assert weights and all(torch.equal(v, stored[f"backbone.{k}"]) for k, v in weights.items())
    assert torch.get_default_dtype() == torch.float32  # restored after building the model

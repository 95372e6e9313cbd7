"""tllab-analyze: the proxy A-distance, t-SNE plots and loading a run's checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import FAST, compose_config
from tllab.analysis import (
    a_distance,
    domain_classifier_error,
    extract_features,
    load_run,
    main,
    resolve_checkpoint,
)
from tllab.data import build_data
from tllab.errors import CheckpointError
from tllab.train import resolve_config
from tllab.trainer import build_model


def gaussians(n_s: int, n_t: int, dim: int, shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal source and target features; the target's first coordinate moved by ``shift``."""
    g = torch.Generator().manual_seed(seed)
    f_s, f_t = torch.randn(n_s, dim, generator=g), torch.randn(n_t, dim, generator=g)
    f_t[:, 0] += shift
    return f_s, f_t


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short training run shared by the module's tests (training dominates their runtime)."""
    from tllab.train import run

    path = tmp_path_factory.mktemp("analysis") / "run"
    run(compose_config([*FAST, "trainer.max_steps=2"]), path)
    return path


def copy_run(run_dir: Path, dest: Path, **backbone: object) -> Path:
    """A copy of the run dir whose config.yaml has ``backbone`` keys changed."""
    shutil.copytree(run_dir, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["backbone"].update(backbone)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


# ---------------------------------------------------------------- a_distance
def test_a_distance_of_one_distribution_is_near_zero():
    value = a_distance(*gaussians(1000, 1000, 64, shift=0.0))
    assert abs(value) < 0.3
    # More dimensions than training rows: the classifier overfits, but not on validation.
    assert abs(a_distance(*gaussians(300, 300, 512, shift=0.0, seed=1))) < 0.3


def test_a_distance_of_separated_distributions_is_near_two():
    assert a_distance(*gaussians(1000, 1000, 64, shift=8.0)) > 1.9


def test_a_distance_matches_the_bayes_error_of_overlapping_gaussians():
    # Unit Gaussians 2 apart on one axis (15 noise axes): the best error is Phi(-1) = 0.1587.
    bayes = 0.5 * math.erfc(1 / math.sqrt(2))
    f_s, f_t = gaussians(2000, 2000, 16, shift=2.0)
    assert domain_classifier_error(f_s, f_t) == pytest.approx(bayes, abs=0.03)
    assert a_distance(f_s, f_t) == pytest.approx(2 * (1 - 2 * bayes), abs=0.12)


def test_a_distance_is_deterministic_and_seeded():
    f_s, f_t = gaussians(500, 500, 16, shift=1.0)
    assert a_distance(f_s, f_t, seed=3) == a_distance(f_s, f_t, seed=3)
    values = {a_distance(f_s, f_t, seed=s) for s in range(4)}
    assert len(values) > 1  # the seed picks the train/validation split


def test_a_distance_error_is_balanced_over_unequal_domains():
    # 10x more source rows: a plain error rate would reward predicting "source" (A about 1.6).
    f_s, f_t = gaussians(2000, 200, 16, shift=0.0)
    assert abs(a_distance(f_s, f_t)) < 0.4


def test_a_distance_needs_two_rows_per_domain():
    with pytest.raises(ValueError, match="n >= 2"):
        a_distance(torch.randn(1, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"\(n, F\)"):
        a_distance(torch.randn(10, 4), torch.randn(10, 5))


# ---------------------------------------------------------------- loading
def test_resolve_checkpoint_prefers_best_then_last(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").touch()
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    (tmp_path / "checkpoints" / "best.pt").touch()
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best.pt"
    assert resolve_checkpoint(tmp_path / "checkpoints" / "last.pt") == tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        resolve_checkpoint(tmp_path / "checkpoints")


def test_load_run_gives_the_checkpoint_model_without_pretrained_weights(run_dir, tmp_path, monkeypatch):
    # A fine-tuned run whose pretrained weights are gone: the checkpoint alone must do.
    moved = copy_run(run_dir, tmp_path / "run", pretrained=str(tmp_path / "deleted.pt"))
    monkeypatch.setattr("tllab.models.load_backbone_checkpoint",
                        lambda *a: pytest.fail("load_run read backbone.pretrained"))
    cfg, model = load_run(moved)
    assert cfg.backbone.pretrained is None and cfg.dataset.target == ["mnistm"]
    assert not model.training

    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    by_hand = build_model(resolve_config(compose_config([*FAST, "trainer.max_steps=2"]))[0], [])
    by_hand.load_state_dict(state)
    by_hand.eval()
    x = build_data(cfg.dataset, cfg.seed).eval_splits["target_test"].__getitems__(range(32))[0]
    with torch.no_grad():
        (logits, f), (logits_ref, f_ref) = model(x), by_hand(x)
    assert torch.equal(logits, logits_ref) and torch.equal(f, f_ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_extract_features_takes_a_fixed_subset(run_dir):
    cfg, model = load_run(run_dir / "checkpoints" / "last.pt")
    split = build_data(cfg.dataset, cfg.seed).eval_splits["source_test"]
    everything = extract_features(model, split, "cpu", max_samples=10_000, seed=0)
    some = extract_features(model, split, "cpu", max_samples=100, seed=0)
    assert everything.shape == (len(split), model.features_dim) and some.shape == (100, model.features_dim)
    assert torch.equal(some, extract_features(model, split, "cpu", max_samples=100, seed=0))
    rows = torch.cdist(some, everything).argmin(1)
    assert len(set(rows.tolist())) == 100 and torch.allclose(everything[rows], some, atol=1e-5)
    assert not torch.equal(some, extract_features(model, split, "cpu", max_samples=100, seed=1))


# ---------------------------------------------------------------- command line
def test_tsne_writes_a_png(run_dir, tmp_path, capsys):
    main(["tsne", str(run_dir), "--max-samples", "100"])
    out = run_dir / "analysis" / "tsne.png"
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        image.load()
    main(["tsne", str(run_dir), "--max-samples", "20", "--out", str(tmp_path / "a" / "small.png")])
    assert (tmp_path / "a" / "small.png").stat().st_size > 0


def test_a_distance_command_writes_json_matching_the_function(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "last.pt"
    main(["a-distance", str(ckpt), "--max-samples", "100"])
    result = json.loads((run_dir / "analysis" / "a_distance.json").read_text())
    assert result["num_source"] == result["num_target"] == 100
    assert result["a_distance"] == pytest.approx(2 * (1 - 2 * result["error"]))
    # mnist and mnistm are far apart after two steps of source-only training.
    assert 1.0 < result["a_distance"] <= 2.0
    assert (result["method"], result["task"], result["checkpoint"]) == ("source only", "mnist→mnistm", str(ckpt))
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (f"A-distance {result['a_distance']:.3f} (domain classifier validation error "
                    f"{result['error']:.3f}; 100 source, 100 target features)")

    cfg, model = load_run(ckpt)
    splits = build_data(cfg.dataset, cfg.seed).eval_splits
    f_s, f_t = (extract_features(model, splits[s], "cpu", 100, seed=0) for s in ("source_test", "target_test"))
    assert result["a_distance"] == a_distance(f_s, f_t, seed=0)


def broken_inputs(run_dir: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    loose = tmp / "loose" / "checkpoints"
    loose.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "last.pt", loose / "last.pt")
    garbage = copy_run(run_dir, tmp / "garbage")
    (garbage / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    return {
        "missing": (tmp / "nope", "does not exist"),
        "no config": (loose / "last.pt", "config.yaml does not exist"),
        "other model": (copy_run(run_dir, tmp / "wide", bottleneck_dim=64), "does not hold the weights"),
        "not a checkpoint": (garbage, "cannot read checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing", "no config", "other model", "not a checkpoint"])
def test_user_errors_exit_1_with_one_line(run_dir, tmp_path, capsys, case):
    path, message = broken_inputs(run_dir, tmp_path)[case]
    with pytest.raises(SystemExit) as exc:
        main(["a-distance", str(path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("tllab: error: ") and err.count("\n") == 1 and message in err


def test_unknown_split_names_the_available_ones(run_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tsne", str(run_dir), "--target-split", "target_val"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "--target-split target_val" in err and "'source_val', 'source_test', 'target_test'" in err

"""Shared fixtures: compose configs like the command line does, and run short trainings."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Pretrained weights come only from the caches tests plant: never wait on the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tllab.schema import register_configs  # noqa: E402

TESTS = Path(__file__).parent
# Fast settings for end-to-end runs: a few steps, no progress bar.
FAST = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.quiet=true", "trainer.eval_batch_size=512"]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the embedded domains once per session, in a private cache (never the user's)."""
    path = tmp_path_factory.mktemp("tllab-cache")
    os.environ["TLLAB_CACHE_DIR"] = str(path)
    os.environ["WANDB_MODE"] = "disabled"
    return path


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``train.yaml`` with ``overrides`` (plus tests/configs on the search path)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        return compose("train", overrides=[f"hydra.searchpath=[file://{TESTS / 'configs'}]", *overrides])


def interrupt_then_resume(train: Callable[[Path], Any], run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                          at_step: int = 5) -> None:
    """``train(run_dir)`` killed (KeyboardInterrupt) as it starts step ``at_step + 1``, then run again
    to the end in the same run dir."""
    from tllab.trainer import Trainer

    original = Trainer.train_step

    def crash(self):
        if self.step == at_step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(run_dir)
    monkeypatch.setattr(Trainer, "train_step", original)
    train(run_dir)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    return compose_config


@pytest.fixture
def train_run(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``train_run(*overrides, run_dir=None)`` trains in-process and returns the summary."""
    from tllab.train import run

    def _run(*overrides: str, run_dir: Path | None = None) -> dict[str, Any]:
        return run(compose_config([*FAST, *overrides]), run_dir or tmp_path / "run")

    return _run


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory, _cache_dir: Path) -> Callable[..., Path]:
    """``pretrained(*overrides)``: ``checkpoints/last.pt`` of a 2-step digits pretraining run, a
    source model for fine-tuning tests (one run per set of overrides and session)."""
    from tllab.train import run

    made: dict[tuple[str, ...], Path] = {}

    def _make(*overrides: str) -> Path:
        if overrides not in made:
            run_dir = tmp_path_factory.mktemp("pretrained")
            run(compose_config([*FAST, "trainer.max_steps=2", *overrides]), run_dir)
            made[overrides] = run_dir / "checkpoints" / "last.pt"
        return made[overrides]

    return _make

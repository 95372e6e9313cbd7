"""Command-line entry point: ``tllab-train [overrides...]`` or ``python -m tllab.train``.

Hydra composes ``configs/train.yaml`` (shipped inside the package, found as
``pkg://tllab.configs`` also from a non-editable install) against the typed schema; the run
writes into Hydra's run dir (``outputs/runs/<date>/<time>`` unless ``hydra.run.dir`` says
otherwise).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from tllab.errors import ConfigError, TllabError
from tllab.loggers import WandbRun
from tllab.schema import TrainConfig, register_configs
from tllab.trainer import Trainer

log = logging.getLogger("tllab")
register_configs()


def resolve_config(cfg: DictConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The typed config and its resolved plain-container form; a missing mandatory value
    (``???``) becomes a :class:`ConfigError` naming the key to set."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be set for this config (it is '???'); "
                          f"add {e.full_key}=<value> to the command line.") from e
    return OmegaConf.to_object(cfg), resolved


# Keys that may change when a run is resumed: they do not affect its results.
RESUMABLE_KEYS = ("trainer.quiet", "trainer.resume", "trainer.num_workers", "trainer.eval_batch_size",
                  "trainer.device", "logger.")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def claim_run_dir(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Write ``config.yaml`` into a new run dir; for a started one (checkpoint or ``done``), keep
    its config and refuse a new config that differs in a key that matters."""
    saved_file = run_dir / "config.yaml"
    started = (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "done").exists()
    if not (started and saved_file.exists()):
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(OmegaConf.to_yaml(resolved))
        return
    saved, new = _flatten(yaml.safe_load(saved_file.read_text())), _flatten(resolved)
    diff = [f"{k}: {saved.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in sorted(saved.keys() | new.keys())
            if saved.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS)]
    if diff:
        raise ConfigError(f"{run_dir} holds a run with another config ({'; '.join(diff[:6])}); rerun it with its "
                          "own config (<run dir>/config.yaml) or choose a new hydra.run.dir.")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its summary. A run dir that already holds a
    ``done`` marker is not trained again; one that holds a checkpoint is resumed. Either must
    have been started with the same config (up to :data:`RESUMABLE_KEYS`)."""
    typed, resolved = resolve_config(cfg)
    claim_run_dir(run_dir, resolved)
    if (run_dir / "done").exists() and (run_dir / "summary.json").exists():
        log.info("%s is complete (done marker); not training again", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    trainer = Trainer(typed, run_dir, resolved)
    wandb_run = WandbRun(typed.logger, resolved, trainer.keys, run_dir) if typed.logger.wandb else None
    try:
        summary = trainer.fit(wandb_run)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    if wandb_run is not None:
        wandb_run.finish()
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """The short result table of a run: evaluation accuracies and the run dir."""
    final = summary["final"]
    rows = [(f"{k}", f"{v:.4f}") for k, v in final.items()
            if k.endswith("/acc") and k.split("/")[0] in ("source_test", "target_test", "target_val", "source_val")]
    rows.append(("run dir", summary["run_dir"]))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))


@hydra.main(version_base="1.3", config_path="pkg://tllab.configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except TllabError as e:
        (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
        if hc.mode == RunMode.MULTIRUN:
            raise
        print(f"tllab: error: {e}", file=sys.stderr)
        sys.exit(1)
    print_summary(summary)
    sel = summary["selection_split"]
    return summary["best"]["metrics"].get(f"{sel}/acc") if sel else None


if __name__ == "__main__":
    main()

"""Command-line entry point: ``tllab-train [overrides...]`` or ``python -m tllab.train``.

Hydra composes ``configs/train.yaml`` (shipped inside the package, found as
``pkg://tllab.configs`` also from a non-editable install) against the typed schema; the run
writes into Hydra's run dir (``outputs/runs/<date>/<time>`` unless ``hydra.run.dir`` says
otherwise).
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from tllab.data import resolve_num_classes
from tllab.distributed import broadcast_object, dist_is_initialized, is_main
from tllab.errors import ConfigError, TllabError
from tllab.launch import join_launcher_group, spawn_ddp, train_process
from tllab.schema import TrainConfig, register_configs

log = logging.getLogger("tllab")
register_configs()


def resolve_config(cfg: DictConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The typed config and its resolved plain-container form; a missing mandatory value
    (``???``) becomes a :class:`ConfigError` naming the key to set, and ``dataset.num_classes=null``
    is replaced by the number of classes the data has (saved so with the run)."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be set for this config (it is '???'); "
                          f"add {e.full_key}=<value> to the command line.") from e
    typed: TrainConfig = OmegaConf.to_object(cfg)
    if typed.dataset.num_classes is None:
        typed.dataset.num_classes = resolved["dataset"]["num_classes"] = resolve_num_classes(typed.dataset)
    return typed, resolved


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its summary ({} on ranks other than 0): in this
    process, or in ``trainer.devices`` spawned processes for ``trainer=ddp`` (unless this process
    already belongs to a torchrun/SLURM process group). A run dir that holds a ``done`` marker is
    not trained again; one that holds a checkpoint is resumed, with the same config."""
    typed, resolved = resolve_config(cfg)
    if typed.trainer.strategy == "ddp" and not dist_is_initialized():
        return spawn_ddp(typed, resolved, run_dir)
    return train_process(typed, resolved, run_dir)


def print_summary(summary: dict[str, Any]) -> None:
    """The short result table of a run: evaluation accuracies and the run dir."""
    final = summary["final"]
    rows = [(f"{k}", f"{v:.4f}") for k, v in final.items()
            if k.endswith("/acc") and k.split("/")[0] in ("source_test", "target_test", "target_val", "source_val")]
    rows.append(("run dir", summary["run_dir"]))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))


@hydra.main(version_base="1.3", config_path="pkg://tllab.configs", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(broadcast_object(str(hc.runtime.output_dir)))  # under torchrun: rank 0's
    if is_main():
        (run_dir / "error.txt").unlink(missing_ok=True)  # from an earlier failed attempt
    try:
        summary = run(cfg, run_dir)
    except Exception as e:
        if not is_main():
            sys.exit(1)
        user_error = isinstance(e, TllabError)
        detail = "" if user_error else "".join(traceback.format_exception(e))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n{detail}")
        if hc.mode == RunMode.MULTIRUN or not user_error:
            raise  # a sweep reports it and goes on with the other jobs
        print(f"tllab: error: {e}", file=sys.stderr)
        sys.exit(1)
    if not is_main():
        return None
    print_summary(summary)
    sel = summary["selection_split"]
    return summary["best"]["metrics"].get(f"{sel}/acc") if sel else None


def main() -> None:
    """Console entry point. Under torchrun/SLURM, join the process group first; ranks other
    than 0 then run Hydra without any output of their own and use rank 0's run dir."""
    if join_launcher_group() and not is_main():
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    hydra_main()


if __name__ == "__main__":
    main()

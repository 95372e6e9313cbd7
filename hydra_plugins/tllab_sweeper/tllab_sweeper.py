"""Hydra sweeper ``hydra/sweeper=tllab`` (tllab's default): Hydra's grid, DomainBed's contract.

It expands the grid like Hydra's basic sweeper, then hands the jobs to :mod:`tllab.sweep`:
hashed job dirs, finished jobs skipped, every failure reported at the end. Hydra only finds
sweepers inside the ``hydra_plugins`` package, hence this thin module; the logic lives in
:mod:`tllab.sweep`.
"""

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf reads these annotations at runtime

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from tllab.errors import RunDirRefused
from tllab.sweep import format_jobs, plan, subdir_override, sweep_grid

log = logging.getLogger("tllab")


@dataclass
class TllabSweeperConf:  # no `from __future__ import annotations`: Hydra loads this module unregistered
    _target_: str = "hydra_plugins.tllab_sweeper.tllab_sweeper.TllabSweeper"
    # The grid of an experiment preset, like the basic sweeper's: {key: "v1,v2"}.
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP007, UP045
    # A table's rows: {row name: [overrides]}; every grid job runs once per row (tllab.sweep.expand_grid);
    # a row set to null is removed (a preset building on another drops that preset's row).
    rows: Optional[Dict[str, Any]] = None  # noqa: UP006, UP007, UP045
    # Keys whose values must differ within a job: [dataset.source, dataset.target] gives every domain pair.
    distinct: Optional[List[str]] = None  # noqa: UP006, UP007, UP045


ConfigStore.instance().store(group="hydra/sweeper", name="tllab", node=TllabSweeperConf, provider="tllab")


class TllabSweeper(Sweeper):
    """Runs the grid's unfinished jobs in ``<hydra.sweep.dir>/<job id>`` and reports failures."""

    def __init__(self, params: dict[str, str] | None = None, rows: dict[str, list[str]] | None = None,
                 distinct: list[str] | None = None) -> None:
        self.params, self.rows, self.distinct = params, rows, list(distinct or [])

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        grid = sweep_grid(arguments, self.params, self.rows, self.distinct, self.hydra_context.config_loader)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        jobs = plan(sweep_dir, grid)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        states = [job.state for job in jobs]
        todo = [job for job, state in zip(jobs, states) if state not in ("done", "running")]
        log.info("sweep %s: %d jobs, %d already done, %d running in other processes, %d to run", sweep_dir,
                 len(jobs), states.count("done"), states.count("running"), len(todo))
        # W&B groups a sweep's runs together unless the config names a group.
        group = [] if self.config.logger.group else [f"logger.group={sweep_dir.name}"]
        batch = [[*job.overrides, *group, subdir_override(job.id)] for job in todo]
        if not batch:
            print(f"sweep {sweep_dir}: " + format_jobs(jobs, ("running",)), flush=True)
            return []
        self.validate_batch_is_legal(batch)  # a bad grid fails here, before any job runs
        returns = self.launcher.launch(batch, initial_job_idx=0)
        for job, ret in zip(todo, returns):
            refused = isinstance(ret._return_value, RunDirRefused)  # the job dir holds another run: untouched
            if ret.status == JobStatus.FAILED and not job.error() and not refused:  # died before writing error.txt
                with contextlib.suppress(OSError):  # a job dir that cannot be written: the error is printed
                    job.dir.mkdir(parents=True, exist_ok=True)
                    (job.dir / "error.txt").write_text(f"{type(ret._return_value).__name__}: {ret._return_value}\n")
            if ret.status == JobStatus.FAILED and not job.error():
                log.error("job %s failed: %s", job.id, ret._return_value)
        # Jobs that other launchers train are not failures: a relaunch after they finish finds them done.
        print(f"sweep {sweep_dir}: " + format_jobs(jobs, ("failed", "running", "incomplete")), flush=True)
        if any(job.state not in ("done", "running") for job in jobs):
            sys.exit(1)
        return returns

"""Idempotent sweeps: ``tllab-sweep launch|status|delete-incomplete``.

A sweep is a Hydra multirun (``tllab-train -m ...``) run by tllab's sweeper
(``hydra_plugins/tllab_sweeper``, the default ``hydra/sweeper``), following DomainBed's contract:

- the grid is the Cartesian product of comma lists on the command line and of
  ``hydra.sweeper.params`` in an experiment preset, times the preset's ``hydra.sweeper.rows``
  (a table's rows, each a list of overrides: methods with their own recipes), less the jobs whose
  ``hydra.sweeper.distinct`` keys are equal (``[dataset.source, dataset.target]``: every ordered
  pair of different domains), see :func:`expand_grid`;
- each job's identity is a hash of its canonical overrides (:func:`job_id`; keys that do not
  change results, like ``trainer.quiet`` or ``logger.*``, are left out), and the job runs in
  ``<sweep dir>/<id>``;
- a job whose dir holds a ``done`` marker is skipped when the sweep is launched again; a started
  one resumes from its checkpoint; a failed one is run again;
- a job is trained by one process at a time (:mod:`tllab.lock`): a launcher skips the jobs that
  another live launcher trains, so several launchers (or a SLURM array) can share a sweep dir;
- a failing job never stops the others: at the end the sweep lists every failure with its error
  (from the job's ``error.txt``) and exits with status 1;
- ``<sweep dir>/sweep.json`` lists every job ever planned in the sweep, so ``status`` also
  shows jobs that never started.

Jobs run through any Hydra launcher: ``basic`` (one after another, in this process), ``joblib``
(parallel on this machine) or ``slurm`` (submitit).

Jobs planned by mistake leave the sweep with ``forget``: its overrides make a grid as ``launch``'s
do, and the planned jobs of that grid leave the manifest and lose their dirs, so neither ``status``
nor a report lists them again. A job with results (``done``) is forgotten only with
``--with-results``; a running one never.

Usage::

    tllab-sweep launch outputs/sweeps/da experiment=digits_source_only seed=0,1,2 dataset.target=[mnistm],[uci]
    tllab-sweep launch outputs/sweeps/da --launcher joblib --jobs 2 ...   # same jobs, 2 at a time
    tllab-sweep status outputs/sweeps/da
    tllab-sweep forget outputs/sweeps/da experiment=digits_source_only seed=2 dataset.target=[mnistm],[uci]
    tllab-sweep delete-incomplete outputs/sweeps/da --yes [--forget]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tllab import lock
from tllab.io import closed_pipe_exits_quietly
from tllab.launch import RESUMABLE_KEYS
from tllab.loggers import write_json_atomic

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader

MANIFEST = "sweep.json"
STATES = ("done", "running", "failed", "incomplete", "pending")


def canonical_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that define a job's results, normalised by Hydra's parser (``lr=1e-3`` and
    ``lr=0.001`` agree) and sorted; ``hydra.*`` and keys that do not change
    results (:data:`tllab.launch.RESUMABLE_KEYS`) are dropped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    canonical = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element()
        name = key.lstrip("+~")
        if name.startswith(("hydra.", "hydra/")) or name.startswith(RESUMABLE_KEYS):
            continue
        canonical.append(f"{key}={o.get_value_element_as_str()}")
    return sorted(canonical)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand_grid(grid: Sequence[Sequence[str]], rows: dict[str, Sequence[str]] | None = None,
                distinct: Sequence[str] = ()) -> list[list[str]]:
    """Each job of ``grid`` once per row of ``rows`` (row overrides first; a key the job sets
    itself, from the command line or ``params``, keeps the job's value), without the jobs whose
    ``distinct`` keys all hold the same value.

    Example:
        >>> expand_grid([["seed=0", "optim.lr=0.1"]], {"erm": [], "afn": ["norm=afn", "optim.lr=0.01"]})
        [['seed=0', 'optim.lr=0.1'], ['norm=afn', 'seed=0', 'optim.lr=0.1']]
        >>> expand_grid([["dataset.source=[A]", "dataset.target=[A]"], ["dataset.source=[A]", "dataset.target=[W]"]],
        ...             distinct=["dataset.source", "dataset.target"])
        [['dataset.source=[A]', 'dataset.target=[W]']]
    """
    jobs = []
    for job in grid:
        values = {_key(o): o.split("=", 1)[1] for o in job}
        if len(distinct) > 1 and all(k in values for k in distinct) and len({values[k] for k in distinct}) == 1:
            continue
        for row in (rows or {"": []}).values():
            jobs.append([*(o for o in row if _key(o) not in values), *job])
    return jobs


def sweep_grid(arguments: Sequence[str], params: Mapping[str, str] | None = None,
               rows: Mapping[str, Sequence[str] | None] | None = None, distinct: Sequence[str] = (),
               config_loader: ConfigLoader | None = None) -> list[list[str]]:
    """The jobs of a sweep: Hydra's sweep syntax in ``params`` (a preset's ``hydra.sweeper.params``)
    and ``arguments`` (the command line's, whose values replace params'), expanded as Hydra's basic
    sweeper does, then by :func:`expand_grid` with the preset's ``rows`` (a row set to null is
    dropped: a preset building on another removes that preset's row) and ``distinct`` keys.
    ``config_loader`` expands ``glob(...)`` over a group's options."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=config_loader)
    overrides = parser.parse_overrides([*(f"{k}={v}" for k, v in (params or {}).items()), *arguments])
    kept_rows = {name: list(row) for name, row in (rows or {}).items() if row is not None}
    return expand_grid(BasicSweeper.split_arguments(overrides, None)[0], kept_rows, distinct)


def compose_grid(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs ``tllab-sweep launch DIR overrides`` plans, without launching: the multirun config is
    composed as Hydra composes it (comma lists left out) for the sweeper settings of a preset.

    Raises:
        TllabError: the overrides do not compose (Hydra's message).
    """
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from tllab.errors import TllabError
    from tllab.schema import register_configs

    register_configs()
    with initialize_config_module(config_module="tllab.configs", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        try:
            cfg = hydra.compose_config("train", list(overrides), run_mode=RunMode.MULTIRUN)
            sweeper = OmegaConf.to_container(cfg.hydra.sweeper)
            return sweep_grid(list(cfg.hydra.overrides.task), sweeper.get("params"), sweeper.get("rows"),
                              sweeper.get("distinct") or (), hydra.config_loader)
        except HydraException as e:
            raise TllabError(" ".join(str(e).split())) from e


def job_id(overrides: Sequence[str]) -> str:
    """A job's identity: the first 12 hex digits of the SHA-1 of its canonical overrides."""
    return hashlib.sha1(json.dumps(canonical_overrides(overrides)).encode()).hexdigest()[:12]


def subdir_override(jid: str) -> str:
    """The override that puts a job in ``<sweep dir>/<id>``; quoted, because an id such as
    ``6932913849e8`` would otherwise be read as the float 6.932913849e+17."""
    return f"hydra.sweep.subdir='{jid}'"


@dataclass
class Job:
    """One job of a sweep: its overrides and its run dir ``<sweep dir>/<id>``."""

    id: str
    overrides: list[str]
    dir: Path

    @property
    def state(self) -> str:
        """``done`` (``done`` marker), ``running`` (a live process holds its lock, see
        :mod:`tllab.lock`), ``failed`` (``error.txt``), ``incomplete`` (started, not running now)
        or ``pending`` (never started)."""
        if (self.dir / "done").exists():
            return "done"
        if lock.owner(self.dir):
            return "running"
        if (self.dir / "error.txt").exists():
            return "failed"
        return "incomplete" if self.dir.exists() else "pending"

    def error(self) -> str:
        """The first line of the job's ``error.txt`` (empty if there is none)."""
        path = self.dir / "error.txt"
        return path.read_text().splitlines()[0] if path.exists() and path.stat().st_size else ""


def plan(sweep_dir: Path, grid: Sequence[Sequence[str]]) -> list[Job]:
    """The jobs of ``grid`` (one override list each; duplicates merged), added to the sweep's
    manifest, which keeps the jobs of earlier launches."""
    jobs = {job.id: job for job in load_jobs(sweep_dir)}
    planned = []
    for overrides in grid:
        jid = job_id(overrides)
        job = jobs.setdefault(jid, Job(jid, list(overrides), sweep_dir / jid))
        if job not in planned:
            planned.append(job)
    write_manifest(sweep_dir, jobs.values())
    return planned


def write_manifest(sweep_dir: Path, jobs: Iterable[Job]) -> None:
    """Replace the sweep's manifest by ``jobs``, atomically (a reader never sees half a manifest)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / MANIFEST, {"jobs": [{"id": j.id, "overrides": j.overrides} for j in jobs]})


def forget(sweep_dir: Path, jobs: Sequence[Job]) -> None:
    """Take ``jobs`` out of the manifest, then delete their dirs: neither ``status`` nor a report
    (which reads every run dir under the sweep dir) lists them again."""
    ids = {job.id for job in jobs}
    write_manifest(sweep_dir, [job for job in load_jobs(sweep_dir) if job.id not in ids])
    for job in jobs:
        if job.dir.exists():
            shutil.rmtree(job.dir)


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of the sweep's manifest (empty when there is none)."""
    path = sweep_dir / MANIFEST
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["jobs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"tllab: error: {path} is not a sweep manifest ({e}); delete it and launch the sweep again "
                         "(finished jobs are still found and skipped).") from e
    return [Job(e["id"], e["overrides"], sweep_dir / e["id"]) for e in entries]


def format_jobs(jobs: Sequence[Job], states: Sequence[str] = ("failed", "incomplete", "pending")) -> str:
    """One count line, then one line per job in ``states``: state, id, the overrides that tell it
    apart from the other jobs, and the first line of its error."""
    counts = Counter(job.state for job in jobs)
    lines = [f"{len(jobs)} jobs: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])]
    shared = set.intersection(*(set(job.overrides) for job in jobs)) if len(jobs) > 1 else set()
    for job in jobs:
        if job.state in states:
            state = job.state
            error = f"  {job.error()}" if state == "failed" else ""
            holder = f" ({lock.owner(job.dir)})" if state == "running" else ""
            own = " ".join(o for o in job.overrides if o not in shared)
            lines.append(f"  {state:<10} {job.id}  {own}{error}{holder}")
    return "\n".join(lines)


def _launch(args: argparse.Namespace) -> None:
    from tllab.errors import TllabError
    from tllab.train import check_arguments, hydra_main

    if args.config_dir:
        raise SystemExit("tllab: error: tllab-sweep takes no --config-dir or --config-path: put the dir of your "
                         "configs on TLLAB_CONFIG_PATH=DIR (then launch, forget and every job find them) or add "
                         "hydra.searchpath=[file:///absolute/DIR] to the overrides.")
    argv = ["-m", f"hydra.sweep.dir={args.dir}"]
    launcher = args.launcher or ("joblib" if args.jobs else None)
    if launcher:
        argv.append(f"hydra/launcher={launcher}")
    if args.jobs:
        argv.append(f"hydra.launcher.n_jobs={args.jobs}")
    argv += args.overrides
    try:
        check_arguments(argv)
    except TllabError as e:
        raise SystemExit(f"tllab: error: {e}") from None
    sys.argv = ["tllab-train", *argv]
    hydra_main()


def _planned_jobs(sweep_dir: Path) -> list[Job]:
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"tllab: error: {sweep_dir} holds no sweep ({MANIFEST} is missing or lists no job); "
                         "start one with tllab-sweep launch DIR OVERRIDES...")
    return jobs


def _status(args: argparse.Namespace) -> None:
    print(format_jobs(_planned_jobs(args.dir), STATES if args.all else ("failed", "running", "incomplete", "pending")))


def _forget(args: argparse.Namespace) -> None:
    from tllab.errors import TllabError

    planned = _planned_jobs(args.dir)
    try:
        ids = {job_id(overrides) for overrides in compose_grid(args.overrides)}
    except TllabError as e:
        raise SystemExit(f"tllab: error: {e}") from None
    doomed = [job for job in planned if job.id in ids]
    if not doomed:
        raise SystemExit(f"tllab: error: none of the {len(ids)} jobs of this grid is planned in {args.dir}; give the "
                         f"overrides of the launch, narrowed to the jobs to forget (tllab-sweep status {args.dir} "
                         "--all lists the planned ones).")
    states = {job.id: job.state for job in doomed}
    counts = Counter(states.values())
    if counts["running"]:
        raise SystemExit(f"tllab: error: {counts['running']} of these jobs are running (tllab-sweep status "
                         f"{args.dir}); nothing forgotten: stop them, or wait for them to end, then forget them.")
    if counts["done"] and not args.with_results:
        raise SystemExit(f"tllab: error: {counts['done']} of these jobs are done; nothing forgotten: pass "
                         "--with-results to forget them too and delete their results.")
    forget(args.dir, doomed)
    started = len(doomed) - counts["pending"]
    print(f"forgot {len(doomed)} of the sweep's {len(planned)} jobs" + (f", deleted {started} dirs" if started else ""))
    for job in doomed:
        print(f"  {states[job.id]:<10} {job.id}  {' '.join(job.overrides)}")


def _delete_incomplete(args: argparse.Namespace) -> None:
    doomed = [job for job in load_jobs(args.dir) if job.state in ("failed", "incomplete")]
    if not doomed:
        print("no failed or incomplete jobs")
        return
    print(format_jobs(doomed))
    if not args.yes and (not sys.stdin.isatty() or input("delete these job dirs? [y/N] ").lower() != "y"):
        raise SystemExit("nothing deleted (pass --yes to delete without asking)")
    if args.forget:
        forget(args.dir, doomed)
        print(f"deleted and forgot {len(doomed)} jobs; a launch of their grid plans them again")
        return
    for job in doomed:
        shutil.rmtree(job.dir)
    print(f"deleted {len(doomed)} job dirs; launch the sweep again to rerun them")


@closed_pipe_exits_quietly
def main(argv: list[str] | None = None) -> None:
    """Console entry point ``tllab-sweep``."""
    parser = argparse.ArgumentParser(prog="tllab-sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="run every job of the grid that is not done yet")
    launch.add_argument("dir", type=Path, help="sweep dir (fixed, so that a relaunch finds its jobs)")
    launch.add_argument("--launcher", choices=["basic", "joblib", "slurm"], help="Hydra launcher (default: basic)")
    launch.add_argument("--jobs", type=int, help="jobs at a time (implies --launcher joblib)")
    launch.add_argument("--config-dir", "-cd", "--config-path", "-cp", help=argparse.SUPPRESS)  # refused: one line
    launch.add_argument("overrides", nargs="*", help="tllab-train overrides; comma lists make the grid")
    status = sub.add_parser("status", help="count jobs by state and list the unfinished ones")
    status.add_argument("dir", type=Path)
    status.add_argument("--all", action="store_true", help="list finished jobs too")
    forget_cmd = sub.add_parser("forget", help="take jobs planned by mistake out of the sweep (manifest and job dirs)")
    forget_cmd.add_argument("dir", type=Path)
    forget_cmd.add_argument("--with-results", action="store_true", help="forget finished jobs too, deleting results")
    forget_cmd.add_argument("overrides", nargs="+", help="the launch's overrides, narrowed to the jobs to forget")
    delete = sub.add_parser("delete-incomplete", help="delete the dirs of failed and incomplete jobs")
    delete.add_argument("dir", type=Path)
    delete.add_argument("--yes", action="store_true", help="do not ask")
    delete.add_argument("--forget", action="store_true", help="drop them from the manifest too (no longer listed)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("launch", "forget"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("launch", "forget"):
        args.overrides += rest  # overrides may follow options: launch DIR --jobs 2 seed=0,1
    commands = {"launch": _launch, "status": _status, "forget": _forget, "delete-incomplete": _delete_incomplete}
    commands[args.command](args)


if __name__ == "__main__":
    main()

"""Running one training: in this process, in N spawned data-parallel processes, or as one rank
of a torchrun / SLURM launch.

- ``trainer=ddp trainer.devices=N``: the config is composed once (by Hydra, in the launching
  process), checked, and handed to N spawned workers joined by a gloo (CPU) or NCCL (GPU)
  process group; the launching process only waits and reports.
- Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) or ``srun`` (``SLURM_PROCID`` and
  ``MASTER_ADDR`` set), :func:`join_launcher_group` joins the group before Hydra starts; ranks
  other than 0 run Hydra without outputs and receive rank 0's run dir.

Only rank 0 writes into the run dir (config, records, checkpoints, logs, W&B).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from omegaconf import OmegaConf

import tllab
from tllab import errors
from tllab.checkpoint import load_checkpoint
from tllab.distributed import default_backend, dist_is_initialized, env_world, is_main
from tllab.errors import ConfigError, RunDirRefused, TllabError
from tllab.io import atomic_write
from tllab.loggers import WandbRun
from tllab.schema import TrainConfig
from tllab.trainer import Trainer

log = logging.getLogger("tllab")

# Result-neutral keys, one list for every use: they may change when a run is resumed, are not part of a
# sweep job's identity (tllab.sweep.job_id) and never split a report's rows (tllab.report.runs).
# trainer.eval_every changes only which steps are evaluated, not the training.
RESUMABLE_KEYS = ("trainer.quiet", "trainer.resume", "trainer.num_workers", "trainer.eval_batch_size",
                  "trainer.eval_every", "trainer.device", "trainer.oversubscribe", "logger.")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def run_config(run_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """The config of the run in ``run_dir`` and whether it came from the checkpoint: ``config.yaml``,
    or, when that is missing or unreadable, the copy inside ``checkpoints/last.pt``; ``None`` when
    the run has neither."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        if isinstance(saved, dict):
            return saved, False
    except (OSError, yaml.YAMLError):
        pass
    last = run_dir / "checkpoints" / "last.pt"
    return (load_checkpoint(last).get("config") if last.exists() else None), True


def write_hydra_files(run_dir: Path, files: dict[str, str]) -> None:
    """Hydra's own record of the command (``.hydra/config.yaml``, ``hydra.yaml``,
    ``overrides.yaml``), written by tllab once the run dir is claimed (``hydra.output_subdir`` is
    null), so that a refused command leaves an existing run untouched."""
    for name, text in files.items():
        with atomic_write(run_dir / ".hydra" / name) as tmp:
            tmp.write_text(text)


def claim_run_dir(run_dir: Path, cfg: TrainConfig, resolved: dict[str, Any],
                  hydra_files: dict[str, str] | None = None) -> None:
    """Make ``run_dir`` this command's: a new run dir gets ``config.yaml``; a started one (checkpoint
    or ``done``) keeps its config, and a new config that differs from it in a key that matters is
    refused (a key newer than the saved config counts as its default). The run's config is its
    ``config.yaml``, or the checkpoint's copy when that file is missing or unreadable (it is then
    restored). A refused command writes nothing; an accepted one removes an earlier ``error.txt``
    and writes ``hydra_files`` into ``.hydra/``.

    Raises:
        RunDirRefused: the run dir holds another run, or a started run without a readable config.
    """
    started = (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "done").exists()
    saved, restored = run_config(run_dir) if started else (None, False)
    if started and saved is None:
        raise RunDirRefused(f"{run_dir} holds a run without a readable config.yaml (and no checkpoint holding its "
                            "config); restore config.yaml or choose a new hydra.run.dir.")
    if saved is not None:
        # A key the saved config lacks (added to tllab since) had its default value then.
        defaults = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True))
        old, new = {**defaults, **flatten(saved)}, flatten(resolved)
        diff = [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in sorted(old.keys() | new.keys())
                if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS)]
        if diff:
            raise RunDirRefused(f"{run_dir} holds a run with another config ({'; '.join(diff[:6])}); rerun it with "
                                "its own config (<run dir>/config.yaml) or choose a new hydra.run.dir.")
    if saved is None or restored:
        if restored:
            log.warning("%s/config.yaml was missing or unreadable: restored from the checkpoint's copy", run_dir)
        with atomic_write(run_dir / "config.yaml") as tmp:
            tmp.write_text(OmegaConf.to_yaml(saved if restored else resolved))
    (run_dir / "error.txt").unlink(missing_ok=True)  # from an earlier failed attempt
    write_hydra_files(run_dir, hydra_files or {})
    record_provenance(run_dir, cfg, yaml.safe_load((hydra_files or {}).get("overrides.yaml", "[]")) or [])


# What decides a run's numbers; uncommitted edits elsewhere (docs, README, tests, a report just written into
# docs/results) do not make a run "dirty", so regenerating one table does not taint the next one's provenance.
CODE_PATHS = ("tllab", "hydra_plugins", "pyproject.toml", "constraints.txt")
CHECKOUT = Path(__file__).resolve().parents[1]  # the git checkout tllab runs from, if it is one


def _git(*args: str) -> str | None:
    """A git command's output in ``CHECKOUT``; None for an installed package."""
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        return subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def hardware_class(cfg: TrainConfig) -> str:
    """``GPU: <name> x<processes>`` or ``CPU: <cores> cores`` (x<processes> under trainer=ddp)."""
    processes = cfg.trainer.devices if cfg.trainer.strategy == "ddp" else 1
    if _uses_cuda(cfg):
        return f"GPU: {torch.cuda.get_device_name(0)} x{processes}"
    cores = _cores()
    return f"CPU: {cores} cores" + (f" x{processes} processes" if processes > 1 else "")


def record_provenance(run_dir: Path, cfg: TrainConfig, overrides: list[str]) -> None:
    """Append how this command was made to ``provenance.json`` (one entry per start or resume):
    tllab version, git commit and dirty flag (uncommitted changes to ``CODE_PATHS``), command-line overrides, hardware
    class, Python and torch versions. ``tllab-report`` prints them beside its tables."""
    path = run_dir / "provenance.json"
    try:
        commands = json.loads(path.read_text())["commands"] if path.exists() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        commands = []  # a damaged record is replaced, never fatal
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    commands.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "tllab": tllab.__version__, "git_commit": _git("rev-parse", "HEAD"),
                     "git_dirty": None if status is None else bool(status), "overrides": list(overrides),
                     "hardware": hardware_class(cfg), "python": platform.python_version(),
                     "torch": torch.__version__})
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"commands": commands}, indent=2) + "\n")


def check_devices(cfg: TrainConfig) -> None:
    """``trainer.devices`` processes fit this machine: GPUs visible, or CPU cores unless
    ``trainer.oversubscribe``."""
    devices = cfg.trainer.devices
    if _uses_cuda(cfg) and devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={devices} but {torch.cuda.device_count()} GPU(s) are visible; lower "
                          "trainer.devices or set trainer.device=cpu.")
    cores = _cores()
    if not _uses_cuda(cfg) and devices > cores and not cfg.trainer.oversubscribe:
        raise ConfigError(f"trainer.devices={devices} would start {devices} CPU processes on {cores} cores; lower "
                          f"trainer.devices (at most {cores}) or set trainer.oversubscribe=true.")


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    if (run_dir / "done").exists() and (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    return None


def train_process(cfg: TrainConfig, resolved: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train in this process (alone, or as one rank of a process group) and return the summary
    ({} on ranks other than 0). A finished run dir is not trained again; a started one resumes.
    The run dir must be claimed already (:func:`claim_run_dir`)."""
    done = finished_summary(run_dir)
    if done is not None:
        log.info("%s is complete (done marker); not training again", run_dir)
        return done if is_main() else {}
    trainer = Trainer(cfg, run_dir, resolved)
    wandb_run = WandbRun(cfg.logger, resolved, trainer.keys, run_dir) if cfg.logger.wandb and is_main() else None
    try:
        summary = trainer.fit(wandb_run)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    if wandb_run is not None:
        wandb_run.finish()
    return summary


def _uses_cuda(cfg: TrainConfig) -> bool:
    return cfg.trainer.device.startswith("cuda") or (cfg.trainer.device == "auto" and torch.cuda.is_available())


def _configure_worker_logging(run_dir: Path | None) -> None:
    """Spawned workers have no Hydra logging: rank 0 logs to the console and ``train.log``,
    the other ranks only print warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if run_dir is not None else logging.WARNING)


def _ddp_worker(rank: int, world: int, init_method: str, resolved: dict[str, Any], run_dir: str,
                error_dir: str) -> None:
    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), resolved))
    os.environ["LOCAL_RANK"] = str(rank)
    cuda = _uses_cuda(cfg)
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(default_backend(torch.device("cuda" if cuda else "cpu")), init_method=init_method,
                            rank=rank, world_size=world)
    _configure_worker_logging(Path(run_dir) if rank == 0 else None)
    try:
        train_process(cfg, resolved, Path(run_dir))
    except TllabError as e:
        Path(error_dir, f"rank{rank}.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise SystemExit(1) from e
    finally:
        dist.destroy_process_group()


def _start_quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (shared by the workers) without its warning about
    the semaphores of a killed worker: it removes them, which is all that is needed, and the user
    gets one line about the kill instead of "There appear to be N leaked semaphore objects"."""
    quiet = "ignore:resource_tracker:UserWarning"
    sys.warnoptions.append(quiet)  # the tracker is a new interpreter started with this process's -W flags
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(quiet)


def spawn_ddp(cfg: TrainConfig, resolved: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train with ``cfg.trainer.devices`` spawned data-parallel workers; return rank 0's summary.
    A user error in any worker is raised here as the same :class:`TllabError`."""
    devices = cfg.trainer.devices
    done = finished_summary(run_dir)
    if done is not None:
        return done
    scratch = Path(tempfile.mkdtemp(prefix="tllab-ddp-"))  # rendezvous file and errors, outside the run dir
    _start_quiet_resource_tracker()
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # "Terminating process ..." after a kill
    try:
        mp.spawn(_ddp_worker, nprocs=devices, join=True,
                 args=(devices, f"file://{scratch / 'rendezvous'}", resolved, str(run_dir), str(scratch)))
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        reports = sorted(scratch.glob("rank*.json"))
        if not reports and isinstance(e, mp.ProcessExitedException):  # killed (OOM killer, kill -9) or exited
            how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with status {e.exit_code}"
            last = run_dir / "checkpoints" / "last.pt"
            kept = f"its last checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TllabError(f"data-parallel worker rank {e.error_index} (pid {e.error_pid}) {how}, so every rank "
                             f"stopped; {kept}: rerun the same command to resume.") from None
        if not reports:
            raise
        report = json.loads(reports[0].read_text())
        raise getattr(errors, report["type"], TllabError)(report["message"]) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return json.loads((run_dir / "summary.json").read_text())


def join_launcher_group() -> bool:
    """Join the process group of a torchrun / SLURM launch (before Hydra starts); False when
    this process was not started by such a launcher."""
    world = env_world()
    if world is None or dist_is_initialized():
        return False
    rank, local_rank, size = world
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    os.environ["LOCAL_RANK"] = str(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size)
    return True

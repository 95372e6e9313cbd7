"""Command-line entry point: ``tllab-train [overrides...]`` or ``python -m tllab.train``.

Hydra composes ``configs/train.yaml`` (shipped inside the package, found as
``pkg://tllab.configs`` also from a non-editable install) against the typed schema; the run
writes into Hydra's run dir (``outputs/runs/<date>/<time>`` unless ``hydra.run.dir`` says
otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from tllab import lock
from tllab.data import resolve_num_classes
from tllab.distributed import broadcast_object, dist_is_initialized, is_main
from tllab.errors import ConfigError, RunDirRefused, TllabError
from tllab.io import check_writable_dir, closed_pipe_exits_quietly
from tllab.launch import check_devices, claim_run_dir, join_launcher_group, spawn_ddp, train_process, write_hydra_files
from tllab.schema import TrainConfig, check_known_keys, register_configs, validate_config

log = logging.getLogger("tllab")
register_configs()
SLURM_LAUNCHERS = ("slurm", "submitit_slurm")  # tllab's and hydra-submitit-launcher's


def resolve_config(cfg: DictConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The typed config and its resolved plain-container form; a missing mandatory value
    (``???``) becomes a :class:`ConfigError` naming the key to set, and ``dataset.num_classes=null``
    is replaced by the number of classes the data has (saved so with the run)."""
    check_known_keys(cfg)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be set for this config (it is '???'); "
                          f"add {e.full_key}=<value> to the command line.") from e
    typed: TrainConfig = OmegaConf.to_object(cfg)
    validate_config(typed)  # before anything is spawned or written
    if typed.dataset.num_classes is None:
        typed.dataset.num_classes = resolved["dataset"]["num_classes"] = resolve_num_classes(typed.dataset)
    return typed, resolved


def prepare(cfg: DictConfig, run_dir: Path, hydra_files: dict[str, str] | None = None
            ) -> tuple[TrainConfig, dict[str, Any]]:
    """Check the config and claim ``run_dir`` for it (rank 0): a config that is refused here
    leaves the run dir as it was (see :func:`tllab.launch.claim_run_dir`)."""
    typed, resolved = resolve_config(cfg)
    if typed.trainer.strategy == "ddp" and not dist_is_initialized():
        check_devices(typed)
    if is_main():
        claim_run_dir(run_dir, typed, resolved, hydra_files)
    return typed, resolved


def train(typed: TrainConfig, resolved: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train a claimed run dir and return the summary ({} on ranks other than 0): in this process,
    or in ``trainer.devices`` spawned processes for ``trainer=ddp`` (unless this process already
    belongs to a torchrun/SLURM process group). A run dir that holds a ``done`` marker is not
    trained again; one that holds a checkpoint is resumed."""
    if typed.trainer.strategy == "ddp" and not dist_is_initialized():
        return spawn_ddp(typed, resolved, run_dir)
    return train_process(typed, resolved, run_dir)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """:func:`prepare`, then :func:`train`: one run into ``run_dir``, resumed with the same config
    if it was started."""
    return train(*prepare(cfg, run_dir), run_dir)


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
    multirun = hc.mode == RunMode.MULTIRUN
    with contextlib.ExitStack() as owned:
        refusal = None  # busy or unusable: nothing is written into the run dir
        if is_main():
            try:
                owned.enter_context(lock.hold(run_dir))
            except TllabError as e:
                refusal = e
        refusal = broadcast_object(refusal)
        if isinstance(refusal, lock.RunDirBusy) and multirun:  # another launcher of the sweep trains it
            log.warning("skipped: %s", refusal)
            return None
        if refusal is not None and multirun:
            raise refusal  # the sweep reports it and goes on with the other jobs
        if refusal is not None:
            if is_main():
                print(f"tllab: error: {refusal}", file=sys.stderr)
            sys.exit(1)
        return _train_and_report(cfg, run_dir, multirun)


def _hydra_files(cfg: DictConfig) -> dict[str, str]:
    """What Hydra would write into ``<run dir>/.hydra`` (``hydra.output_subdir`` is null: tllab
    writes it once the run dir is claimed)."""
    hc = HydraConfig.get()
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})),
            "overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task))}


def _train_and_report(cfg: DictConfig, run_dir: Path, multirun: bool) -> float | None:
    """Claim the run dir and train (it is locked by this process); print the summary. An error
    after the claim, or in a run dir that held no run, is recorded in ``error.txt`` (a sweep lists
    it); a refused command leaves an existing run as it was."""
    hydra_files = _hydra_files(cfg)
    fresh = not any((run_dir / name).exists() for name in ("config.yaml", "done", ".hydra"))
    claimed = False
    try:
        prepared = prepare(cfg, run_dir, hydra_files)
        claimed = True
        summary = train(*prepared, run_dir)
    except Exception as e:
        if not is_main():
            sys.exit(1)
        user_error = isinstance(e, TllabError)
        if claimed or (fresh and not isinstance(e, RunDirRefused)):
            detail = "" if user_error else "".join(traceback.format_exception(e))
            (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n{detail}")
            if not claimed:  # the report reads the config of a job that failed before its claim from .hydra
                write_hydra_files(run_dir, hydra_files)
        if multirun or not user_error:
            raise  # a sweep reports it and goes on with the other jobs
        print(f"tllab: error: {e}", file=sys.stderr)
        sys.exit(1)
    if not is_main():
        return None
    print_summary(summary)
    sel = summary["selection_split"]
    return summary["best"]["metrics"].get(f"{sel}/acc") if sel else None


def check_command_line(overrides: list[str], config_dir: str | None = None) -> None:
    """What Hydra reports badly, in one line before it starts: an unknown option inside a list or
    a sweep (``norm=[adabn,foonorm]``, ``norm=adabn,foonorm``; Hydra names a group's options only
    for a single one, and a sweep would plan the bad jobs before failing), a run or sweep dir it
    cannot create (a file, a path under a file, a read-only folder), a ``TLLAB_CONFIG_PATH`` entry
    that does not exist (Hydra skips it silently), and the SLURM launcher where there is no
    SLURM (submitit fails with a traceback).

    Args:
        overrides: the command line's overrides.
        config_dir: Hydra's ``--config-dir``, a config dir searched besides tllab's own.

    Raises:
        ConfigError: naming the unknown option and the available ones, the unusable dir or entry,
            or the launchers that work here.
    """
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    from hydra_plugins.tllab_searchpath.tllab_searchpath import ENV

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra reports the syntax error itself
    search_path = create_config_search_path("pkg://tllab.configs")
    if config_dir:
        search_path.append("command-line", f"file://{Path(config_dir).absolute()}")
    for o in parsed:
        if o.get_key_element() == "hydra.searchpath" and isinstance(o.value(), list):
            for path in o.value():
                search_path.append("command-line", str(path))
    for o in parsed:
        if o.get_key_element() in ("hydra.run.dir", "hydra.sweep.dir"):
            check_writable_dir(Path(str(o.value())), o.get_key_element())
        if o.get_key_element() == "hydra/launcher" and o.value() in SLURM_LAUNCHERS and shutil.which("srun") is None:
            raise ConfigError(f"hydra/launcher={o.value()} submits SLURM jobs, but this machine has no SLURM (srun is "
                              "not on PATH); launch from a SLURM login node, or run here with hydra/launcher=joblib "
                              "or basic (tllab-sweep launch: --launcher joblib|basic).")
    repo = ConfigRepository(search_path)
    for source in repo.get_sources():
        if source.provider == ENV and not source.available():
            raise ConfigError(f"{ENV} names {source.full_path()}, which is not a config dir or an importable module; "
                              f"fix {ENV} (entries joined by {os.pathsep!r}).")
    for o in parsed:
        group, value = o.key_or_group, o.value()  # a sweep's choices may be lists: norm=[adabn,afn],[mixstyle]
        choices = value.list if isinstance(value, ChoiceSweep) else [value] if isinstance(value, list) else []
        options = [option for choice in choices for option in (choice if isinstance(choice, list) else [choice])]
        if not options or o.package or not repo.group_exists(group):
            continue
        available = repo.get_group_options(group)
        for option in options:
            if str(option) not in available:
                raise ConfigError(f"{o.input_line}: {option!r} is not an option of {group}; "
                                  f"available: {', '.join(available)}.")


def check_arguments(argv: list[str]) -> None:
    """Hydra's own parse of ``argv`` (flags and overrides), refusing in one line what Hydra answers
    with a traceback (two commands such as ``-m --cfg job``) or what would lose tllab's configs
    (``--config-path``), then :func:`check_command_line`.

    Raises:
        ConfigError: naming the fix.
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    commands = [flag for flag, given in [("--run", args.run), ("-m", args.multirun), (f"--cfg {args.cfg}", args.cfg),
                                        (f"--info {args.info}", args.info is not None),
                                        ("--shell-completion", args.shell_completion)] if given]
    if len(commands) > 1:
        raise ConfigError(f"{' and '.join(commands)} cannot be combined; give one of them (to print the config of a "
                          "job of a sweep: --cfg job without -m, one value per key).")
    if args.config_path:
        raise ConfigError("--config-path would replace tllab's own configs; add a dir of your own configs with "
                          "--config-dir DIR or TLLAB_CONFIG_PATH=DIR (see README, Adding a method).")
    check_command_line(args.overrides, args.config_dir)


@closed_pipe_exits_quietly
def main() -> None:
    """Console entry point. Under torchrun/SLURM, join the process group first; ranks other
    than 0 then run Hydra without any output of their own and use rank 0's run dir."""
    if join_launcher_group() and not is_main():
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    try:
        check_arguments(sys.argv[1:])
    except TllabError as e:
        print(f"tllab: error: {e}", file=sys.stderr)
        sys.exit(1)
    hydra_main()


if __name__ == "__main__":
    main()

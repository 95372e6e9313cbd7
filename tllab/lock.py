"""One process trains a run dir at a time: an exclusive lock on ``<run dir>/.lock``.

The lock is an ``flock`` held for the whole run by the process that trains it (the launching
process under ``trainer=ddp``, rank 0 under torchrun). The operating system releases it when that
process ends in any way, kill -9 included, so a lock is never stale: the file stays, but only a
live process holds it. The file's text names the holder (``pid 4242, host node07``) for
``tllab-sweep status``.

Several launchers may therefore share one sweep dir (two ``tllab-sweep launch`` on one machine, a
SLURM array on a shared filesystem): each job is trained by exactly one of them and the others
skip it. On NFS (v4, or v3 with the lock daemon), Linux maps ``flock`` to NFS byte-range locks,
which every client sees; on a filesystem mounted without lock support (``nolock``, some FUSE
filesystems) a lock is seen only on the machine that holds it, so launch one process per sweep
dir there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tllab.errors import ConfigError, TllabError

LOCK_FILE = ".lock"


class RunDirBusy(TllabError):
    """Another live process is training this run dir."""


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def owner(run_dir: Path) -> str | None:
    """``"pid N, host H"`` of the live process that trains ``run_dir``, or ``None`` when none does."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):  # free: its text, if any, is a dead holder's
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(run_dir: Path, wait_s: float = 1.0) -> Iterator[None]:
    """Own ``run_dir`` (created if needed) until the block ends or this process dies.

    Args:
        run_dir: the run dir to train.
        wait_s: how long to retry a lock that is taken, since ``owner`` probes it for a moment.

    Raises:
        RunDirBusy: a live process holds it (the message names the pid and host).
        ConfigError: the run dir cannot be created or written (read-only, a file in the way).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot use {run_dir} as a run dir ({e.strerror}: {e.filename}); choose another "
                          "hydra.run.dir (or hydra.sweep.dir), or fix the folder's permissions.") from e
    try:
        deadline = time.monotonic() + wait_s
        while not _try_lock(fd, fcntl.LOCK_EX):
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
                raise RunDirBusy(f"{run_dir} is being trained by {holder}; wait for it to finish (a rerun then "
                                 "finds it done) or choose another hydra.run.dir.")
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, host {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, so a waiting process never locks a deleted one

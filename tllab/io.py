"""Atomic file writes and crash-tolerant JSON lines: results and checkpoints are never left
half-written, and a record cut short by a kill or a full disk is dropped, never fatal."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tllab.errors import TllabError

log = logging.getLogger("tllab")


class WriteError(TllabError, OSError):
    """A file could not be written (no space left, over the file-size limit...)."""


def closed_pipe_exits_quietly(main: Callable[..., None]) -> Callable[..., None]:
    """A console entry point whose output may be piped into a reader that stops early
    (``tllab-sweep status DIR | head``): it then exits with status 141 (128 + SIGPIPE) and no
    output, as Unix tools do, instead of a ``BrokenPipeError`` traceback."""
    @functools.wraps(main)
    def entry_point(*args: Any, **kwargs: Any) -> None:
        try:
            main(*args, **kwargs)
            sys.stdout.flush()  # a broken pipe shows at the last write: here, not at exit
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
            sys.exit(128 + signal.SIGPIPE)

    return entry_point


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line cut short by a kill or a full disk (no
    newline, not valid JSON) is left out with a warning; a bad line elsewhere is an error.

    Raises:
        TllabError: a damaged line other than the last one.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                log.warning("%s: left out its last record, cut short by an interrupted write: %r", path, line[:80])
                break
            raise TllabError(f"{path} line {i + 1} is not JSON ({e}); the file was edited or damaged: delete that "
                             "line (or the run dir to start over).") from e
    return records


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` (atomic on
    POSIX), on failure delete it, so readers see the old file or the new one, never a partial one.

    Example:
        >>> with atomic_write(Path("/tmp/x.json")) as tmp:
        ...     _ = tmp.write_text("{}")
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a write that was killed
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise write_error(path, e, "the previous version of the file is intact") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def check_writable_dir(path: Path, key: str) -> None:
    """``path`` is a folder this process can create or write into; else one line naming ``key``.

    Raises:
        TllabError: ``path`` is a file, lies under a file, or its nearest existing folder is read-only.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise TllabError(f"{key}={path} {where}; choose another {key}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TllabError(f"{key}={path}: {existing} is not writable by this user; choose another {key} or fix "
                         "the folder's permissions.")


def write_error(path: Path, error: BaseException, kept: str) -> WriteError:
    """One line for a failed write of ``path``: the cause (no space left, file too large) and what
    was kept."""
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(error):
        cause = "no space left on the device: free some space"
    elif code == errno.EFBIG or "File too large" in str(error):
        cause = "the file is over the file-size limit (ulimit -f)"
    else:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return WriteError(f"could not write {path} ({cause}); {kept}.")

"""Atomic file writes: results and checkpoints are never left half-written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` (atomic on
    POSIX), on failure delete it, so readers see the old file or the new one, never a partial one.

    Example:
        >>> with atomic_write(Path("/tmp/x.json")) as tmp:
        ...     _ = tmp.write_text("{}")
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

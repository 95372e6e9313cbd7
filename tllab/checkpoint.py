"""Atomic checkpoint files and the random-number-generator state of a run."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tllab.errors import CheckpointError
from tllab.io import atomic_write


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``: a crash
    mid-write never leaves a truncated checkpoint behind."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


RESUME_FIX = "Delete it to start over, or point hydra.run.dir at the run you meant to resume."


def load_checkpoint(path: Path, fix: str = RESUME_FIX) -> Any:
    """``torch.load(weights_only=True)`` on CPU; an unreadable file raises :class:`CheckpointError`
    with the first line of the reason and ``fix``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in reason:  # never pass on torch's advice to unpickle an unknown file
            reason = "it holds Python objects besides tensors, which tllab does not unpickle: such a file can run code"
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} ({reason}). {fix}") from e


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also force deterministic kernels (an op that has
    none on this device, e.g. adaptive average pooling's CUDA backward, warns instead of failing)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic or torch.are_deterministic_algorithms_enabled():  # the call imports inductor (~1 s)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)

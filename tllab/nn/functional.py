"""Tensor helpers shared by the trainer and the plug-ins."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast_half(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16/bfloat16 (AMP's autocast outputs), else ``t`` itself.

    Losses, reductions and decompositions of half-precision tensors are computed in float32,
    where float16 does not overflow and bfloat16's 8-bit mantissa does not swamp small terms.
    Float32 and float64 keep their dtype: a ``trainer.precision=float64`` run, meant for exact
    numerical checks, must not be rounded through float32 anywhere.

    Example:
        >>> upcast_half(torch.ones(1, dtype=torch.bfloat16)).dtype, upcast_half(torch.ones(1).double()).dtype
        (torch.float32, torch.float64)
    """
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

"""Fused CPU kernels for normalization layers whose PyTorch composition passes over the activations
several times (DomainNorm, StochNorm's backward).

A kernel is a plain Python loop nest compiled by numba (parallel over the batch, vectorized inner
loops, cached on disk after the first compilation). It runs on contiguous float32/float64 CPU
tensors; every caller keeps a PyTorch expression of the same math for other devices and dtypes
(CUDA, bfloat16 under autocast), which the tests also use as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import torch
from numba import prange
from torch import Tensor

__all__ = ["channel_affine2", "cpu_kernel", "fusable"]

# Reassociation lets numba vectorize the reductions; NaN/Inf semantics stay IEEE (a NaN loss must
# still surface as NaN).
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def fusable(*tensors: Tensor) -> bool:
    """Whether the fused CPU kernels apply: all tensors on the CPU with one float32/float64 dtype."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype
                                                           for t in tensors)


def cpu_kernel(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` compiled by numba (lazily, on its first call; parallel, cached on disk), run on
    torch's thread count.

    Arguments are passed as they are, except tensors, which become NumPy views (no copy; they must
    be contiguous CPU tensors).
    """
    kernel = numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)(fn)

    def run(*args: Any) -> None:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        kernel(*(a.detach().numpy() if isinstance(a, Tensor) else a for a in args))

    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


def _channel_affine2_loop(a, b, s, t, u, out):
    """out[n, c, p] = s[n, c] a[n, c, p] + t[n, c] b[n, c, p] + u[n, c]"""
    n_batch, channels, positions = a.shape
    for n in prange(n_batch):
        for c in range(channels):
            ar, br, o = a[n, c], b[n, c], out[n, c]
            sc, tc, uc = s[n, c], t[n, c], u[n, c]
            for p in range(positions):
                o[p] = sc * ar[p] + tc * br[p] + uc


_channel_affine2 = cpu_kernel(_channel_affine2_loop)


def channel_affine2(a: Tensor, b: Tensor, s: Tensor, t: Tensor, u: Tensor) -> Tensor:
    r"""Per-channel (or per-instance and channel) linear combination of two tensors in one pass:
    :math:`y_{nc\ldots} = s_{nc}\, a_{nc\ldots} + t_{nc}\, b_{nc\ldots} + u_{nc}`.

    Args:
        a, b: :math:`(N, C, *)`, same shape.
        s, t, u: :math:`(C,)` (the same for every instance) or :math:`(N, C, *)` with singleton
            trailing dimensions (e.g. :math:`(N, C, 1, 1)` instance statistics).

    Returns:
        :math:`(N, C, *)`, contiguous.

    Example:
        >>> a, b = torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0)
        >>> channel_affine2(a, b, torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.ones(3))[0, :, 0]
        tensor([2., 3., 1.])
    """
    n, c = a.shape[:2]
    s, t, u = (k.reshape(-1, c).expand(n, c) for k in (s, t, u))
    if not fusable(a, b, s, t, u):
        shape = (n, c) + (1,) * (a.dim() - 2)
        return torch.addcmul(torch.addcmul(u.reshape(shape), b, t.reshape(shape)), a, s.reshape(shape)).contiguous()
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    view = (n, c, -1)
    _channel_affine2(a.view(view), b.view(view), *(k.contiguous() for k in (s, t, u)), out.view(view))
    return out

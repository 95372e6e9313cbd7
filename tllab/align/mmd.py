r"""What DAN and JAN share: tllib's Gaussian kernel (``tllib/modules/kernels.py``) and the
multi-kernel MMD estimator of ``MultipleKernelMaximumMeanDiscrepancy`` (``tllib/alignment/dan.py``:
``_update_index_matrix``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor, nn

from tllab.nn.functional import upcast_half


def squared_distances(z: Tensor) -> Tensor:
    r"""Pairwise squared Euclidean distances :math:`D_{ij} = \lVert z_i - z_j \rVert^2`.

    Computed as :math:`\lVert z_i\rVert^2 + \lVert z_j\rVert^2 - 2 z_i^\top z_j` (one matrix
    product; tllib's :math:`N \times N \times F` differences take about 60x as long on CPU, forward
    and backward, at :math:`N = 128`, :math:`F = 2048`), clamped at 0 and with a zero diagonal: the
    cancellation's rounding would leave small nonzero, even negative, values there.

    Shape:
        - z: :math:`(N, F)`; Output: :math:`(N, N)`, float32 for half-precision inputs (and under autocast).

    Example:
        >>> squared_distances(torch.tensor([[0., 0.], [3., 4.]]))
        tensor([[ 0., 25.],
                [25.,  0.]])
    """
    z = upcast_half(z)
    with torch.autocast(z.device.type, enabled=False):  # AMP's half matmul would swamp the differences
        sq = z.pow(2).sum(1)
        return (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * z @ z.T).clamp_min(0).fill_diagonal_(0)


class GaussianKernel(nn.Module):
    r"""tllib's Gaussian kernel matrix from the squared distances :math:`D` of a batch:

    .. math:: k(z_i, z_j) = \exp\Big(-\frac{D_{ij}}{2\sigma^2}\Big), \qquad
              \sigma^2 = \alpha \cdot \frac{1}{N^2} \sum_{i,j} D_{ij}

    (detached) with ``track_running_stats``, else the fixed :math:`\sigma^2`.

    Despite its name (kept from tllib), ``track_running_stats`` keeps no running average: the
    bandwidth comes from each batch (diagonal zeros included in the mean, as tllib). tllib's kernel
    takes the features and recomputes their distances; here it takes :math:`D`, computed once for
    all the kernels of a layer.

    Args:
        sigma: fixed bandwidth :math:`\sigma`; only without ``track_running_stats``. Default: None.
        track_running_stats: bandwidth from the batch. Default: True.
        alpha: :math:`\alpha`, the batch bandwidth's multiplier. Default: 1.0.

    Shape:
        - Input: :math:`(N, N)` squared distances; Output: :math:`(N, N)`.

    Example:
        >>> GaussianKernel(sigma=1.0, track_running_stats=False)(torch.tensor([[0., 2.], [2., 0.]]))
        tensor([[1.0000, 0.3679],
                [0.3679, 1.0000]])
    """

    def __init__(self, sigma: float | None = None, track_running_stats: bool = True, alpha: float = 1.0) -> None:
        super().__init__()
        if track_running_stats == (sigma is not None):
            # tllib silently ignores sigma when tracking; refused here
            raise ValueError("GaussianKernel takes either sigma (with track_running_stats=False) "
                             f"or the batch bandwidth (track_running_stats=True); got sigma={sigma}, "
                             f"track_running_stats={track_running_stats}")
        if alpha <= 0 or (sigma is not None and sigma <= 0):
            raise ValueError(f"alpha={alpha} and sigma={sigma} must be > 0")
        self.sigma, self.track_running_stats, self.alpha = sigma, track_running_stats, alpha

    def forward(self, d2: Tensor) -> Tensor:
        sigma2 = self.alpha * d2.detach().mean() if self.track_running_stats else self.sigma ** 2
        return torch.exp(-d2 / (2 * sigma2))

    def extra_repr(self) -> str:
        if self.track_running_stats:
            return f"alpha={self.alpha}"
        return f"sigma={self.sigma}"


def multi_kernel(kernels: Sequence[nn.Module], z: Tensor) -> Tensor:
    r"""The sum :math:`\sum_u k_u` of the kernel matrices of ``z`` (one layer's multi-kernel).

    Shape:
        - z: :math:`(N, F)`; Output: :math:`(N, N)` (float32 for half-precision inputs).
    """
    d2 = squared_distances(z)
    return sum(kernel(d2) for kernel in kernels)


@lru_cache(maxsize=8)
def mmd_weights(n_s: int, n_t: int, linear: bool = False) -> Tensor:
    r"""The weights :math:`W` of the MMD estimate :math:`\sum_{ij} W_{ij} K_{ij}` of the kernel
    matrix :math:`K` of ``cat([z_s, z_t])`` (tllib's ``_update_index_matrix``).

    Quadratic (unbiased, :math:`i \ne j`):

    .. math:: \frac{1}{n_s(n_s-1)}\sum_{i \ne j} k(z^s_i, z^s_j) + \frac{1}{n_t(n_t-1)}\sum_{i \ne j} k(z^t_i, z^t_j)
              - \frac{2}{n_s n_t}\sum_{i,j} k(z^s_i, z^t_j)

    (tllib assumes :math:`n_s = n_t`). Linear (:math:`n_s = n_t = n`, the DAN paper's estimator
    over the cyclic pairs :math:`(i, i')`, :math:`i' = i + 1 \bmod n`):

    .. math:: \frac{1}{n}\sum_i k(z^s_i, z^s_{i'}) + k(z^t_i, z^t_{i'}) - k(z^s_i, z^t_{i'}) - k(z^s_{i'}, z^t_i)

    tllib assigns instead of adding, so for :math:`n = 2` its two cross pairs coincide and count
    once; here they add. tllib also adds :math:`2/(n-1)` to the loss "to make it positive", a
    constant without gradient, left out: the estimate of two samples of one distribution is about 0.

    Args:
        n_s, n_t: source and target batch sizes, each at least 2.
        linear: the linear estimator. Default: False.

    Shape:
        - Output: :math:`(n_s + n_t, n_s + n_t)`, float64 on the CPU (cached; cast it to :math:`K`).

    Example:
        >>> mmd_weights(2, 2)
        tensor([[ 0.0000,  0.5000, -0.2500, -0.2500],
                [ 0.5000,  0.0000, -0.2500, -0.2500],
                [-0.2500, -0.2500,  0.0000,  0.5000],
                [-0.2500, -0.2500,  0.5000,  0.0000]], dtype=torch.float64)
    """
    if n_s < 2 or n_t < 2:
        raise ValueError(f"the MMD estimate needs at least 2 source and 2 target samples, got {n_s} and {n_t}")
    w = torch.zeros(n_s + n_t, n_s + n_t, dtype=torch.float64)
    if linear:
        if n_s != n_t:
            raise ValueError(f"the linear MMD estimate pairs source and target samples: n_s={n_s} != n_t={n_t}")
        s1 = torch.arange(n_s)
        s2, t1 = (s1 + 1) % n_s, s1 + n_s
        t2 = s2 + n_s
        for rows, cols, sign in ((s1, s2, 1.0), (t1, t2, 1.0), (s1, t2, -1.0), (s2, t1, -1.0)):
            w.index_put_((rows, cols), torch.full((n_s,), sign / n_s, dtype=torch.float64), accumulate=True)
        return w
    w[:n_s, :n_s] = 1.0 / (n_s * (n_s - 1))
    w[n_s:, n_s:] = 1.0 / (n_t * (n_t - 1))
    w[:n_s, n_s:] = w[n_s:, :n_s] = -1.0 / (n_s * n_t)
    return w.fill_diagonal_(0.0)


def mmd(kernel_matrix: Tensor, n_s: int, linear: bool = False) -> Tensor:
    r"""The MMD estimate :math:`\sum_{ij} W_{ij} K_{ij}` (:func:`mmd_weights`) of the kernel matrix of
    ``cat([z_s, z_t])``, the first ``n_s`` rows the source's.

    Shape:
        - kernel_matrix: :math:`(N, N)`; Output: scalar.
    """
    w = mmd_weights(n_s, len(kernel_matrix) - n_s, linear)
    return (kernel_matrix * w.to(kernel_matrix)).sum()


def default_alphas() -> list[float]:
    r"""tllib's DAN (and JAN feature) kernels: :math:`\alpha = 2^k`, :math:`k = -3, \dots, 1`."""
    return [2.0 ** k for k in range(-3, 2)]


class MultipleKernelMaximumMeanDiscrepancy(nn.Module):
    r"""MK-MMD (Long et al., "Learning Transferable Features with Deep Adaptation Networks",
    ICML 2015): the MMD estimate (:func:`mmd`) with the kernel :math:`k = \sum_u k_u`.

    Args:
        kernels: the kernels :math:`k_u` (modules mapping squared distances to a kernel matrix).
        linear: the linear estimator. Default: False (tllib's class; its DAN example uses true).

    Shape:
        - z_s: :math:`(n_s, F)`; z_t: :math:`(n_t, F)`; Output: scalar.

    Example:
        >>> mkmmd = MultipleKernelMaximumMeanDiscrepancy([GaussianKernel(alpha=a) for a in default_alphas()])
        >>> mkmmd(torch.randn(32, 8), torch.randn(32, 8) + 3).item() > 0.5
        True
    """

    def __init__(self, kernels: Sequence[nn.Module], linear: bool = False) -> None:
        super().__init__()
        self.kernels, self.linear = nn.ModuleList(kernels), linear

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        return mmd(multi_kernel(self.kernels, torch.cat([z_s, z_t])), len(z_s), self.linear)

    def extra_repr(self) -> str:
        return f"linear={self.linear}"

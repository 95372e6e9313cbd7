r"""AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation", 2016,
arXiv 1603.04779), exact: every BatchNorm layer evaluates with the target domain's statistics.

For each BatchNorm layer :math:`j` the source running statistics are replaced by the mean and
variance of that layer's input over *all* target images,

.. math:: \mu^t_j = \frac{1}{n}\sum_{i} x_{ij},\qquad
          \sigma^{t\,2}_j = \frac{1}{n}\sum_{i} (x_{ij} - \mu^t_j)^2,\qquad
          y_j = \gamma_j \frac{x_j - \mu^t_j}{\sqrt{\sigma^{t\,2}_j + \epsilon}} + \beta_j,

with :math:`i` running over every image and spatial position of the target split, and the
inputs :math:`x_{ij}` produced by a network whose *earlier* BatchNorm layers already use their
target statistics. :math:`\gamma, \beta` and every other weight are kept.

Common implementations only approximate this: resetting the buffers and forwarding target
batches in train mode gives an EMA (momentum 0.1) or an average of per-batch variances
(``momentum=None``, precise-BN), which misses the spread of the batch means and is wrong on
non-i.i.d. batches; one pass with every layer in train mode measures layer :math:`j`'s input
under per-batch normalization of the layers before it. Here the layers are adapted one at a
time in forward order (one pass per layer, each stopping at that layer), from float64 sums.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.data import DataModule
from tllab.data.base import ImageSet
from tllab.data.loaders import eval_loader
from tllab.distributed import all_gather_objects, all_reduce_sum, rank, world_size
from tllab.errors import ConfigError
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, SetupContext

# Batches of inputs: tensors, or tuples/lists whose first element is the input (``(x, y, d)``
# from a tllab loader); re-iterable (a DataLoader, a list) or a callable returning a fresh iterable.
Batches = Iterable[Any] | Callable[[], Iterable[Any]]


class _Reached(Exception):
    """Raised by the accumulating hook: nothing after the layer being adapted needs to run."""


def _inputs(batches: Batches) -> Iterator[Tensor]:
    for item in batches() if callable(batches) else batches:
        yield item[0] if isinstance(item, (tuple, list)) else item


def _forward_order(model: nn.Module, layers: dict[str, _BatchNorm], batches: Batches,
                   to: Callable[[Tensor], Tensor]) -> list[str]:
    """Names of ``layers`` in the order one forward pass reaches them (layers it never reaches
    are left out). Ranks without any batch take the order found by a rank with batches.

    Raises:
        ValueError: no rank has any batch.
    """
    order: list[str] = []
    seen_data = False

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in order:
                order.append(name)
        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:
        for x in _inputs(batches):
            model(to(x[:1]))  # eval mode: one image reaches every layer just as well
            seen_data = True
            break
    finally:
        for handle in handles:
            handle.remove()
    found = [o for seen, o in all_gather_objects((seen_data, order)) if seen]
    if not found:
        raise ValueError("AdaBN got no target samples: the adaptation data is empty.")
    return found[0]


def _input_stats(model: nn.Module, layer: _BatchNorm, batches: Batches, to: Callable[[Tensor], Tensor]
                 ) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and biased variance of ``layer``'s input over all ``batches`` (and
    all ranks), in float64."""
    # Float64 sums of d = x - shift, built from each batch's mean and sum of squared deviations
    # (two passes in the input's dtype: accurate, and several times faster on CPU than
    # torch.var_mean or converting activations to float64):
    # sum d = n_b (mean_b - shift), sum d^2 = M2_b + n_b (mean_b - shift)^2. The shift, the
    # source running mean, is the same on every rank (so the sums add up over ranks) and near the
    # target mean, so var = sum d^2 / n - (sum d / n)^2 loses nothing to cancellation.
    shift = layer.running_mean.detach().double()
    c = shift.numel()
    sums = torch.zeros(2 * c + 1, dtype=torch.float64, device=shift.device)  # n, sum d, sum d^2

    def accumulate(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach()
        n = x.numel() // c
        if n:
            x = upcast_half(x)
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dims)
            m2 = (x - mean.view(1, c, *([1] * (x.dim() - 2)))).square_().sum(dims)
            d = mean.double() - shift
            sums[0] += n
            sums[1:c + 1] += n * d
            sums[c + 1:] += m2.double() + n * d.square()
        raise _Reached

    handle = layer.register_forward_pre_hook(accumulate)
    try:
        for x in _inputs(batches):
            try:
                model(to(x))
            except _Reached:
                pass
    finally:
        handle.remove()
    all_reduce_sum(sums)
    n = sums[0].item()
    if n == 0:
        raise ValueError("AdaBN got no target samples: the adaptation data is empty.")
    mean_d = sums[1:c + 1] / n
    var = (sums[c + 1:] / n - mean_d.square()).clamp_min_(0)
    return shift + mean_d, var


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Batches) -> nn.Module:
    r"""A copy of ``model`` whose BatchNorm layers hold the exact statistics of the target data.

    Every ``_BatchNorm`` with running statistics (``BatchNorm1d/2d/3d``, tllab's and torch's
    ``SyncBatchNorm``, BatchNorm-derived layers) is adapted, in the order a forward pass reaches
    them: the copy runs in eval mode (dropout off, earlier layers normalizing with their adapted
    statistics), a forward pre-hook on the layer accumulates per-channel count, :math:`\sum x`
    and :math:`\sum x^2` of its input in float64 (from each batch's mean and variance, shifted
    by the source mean) over every batch and stops the pass there, and the layer's buffers are
    set to

    .. math:: \text{running\_mean} = \mu^t, \qquad \text{running\_var} = \sigma^{t\,2}
              = \tfrac{1}{n} \textstyle\sum (x - \mu^t)^2

    The **biased** (population) variance is stored, not PyTorch's unbiased training-time
    convention: eval mode normalizes with ``running_var`` as it is, and the normalization AdaBN
    prescribes divides by the target population's standard deviation (the difference is a
    factor :math:`n/(n-1)` with :math:`n` = images x positions). Weights, affine parameters,
    ``momentum`` and ``num_batches_tracked`` are copied unchanged, and the copy's train/eval
    flags are those of ``model``. Layers no forward pass reaches keep their source statistics.

    Cost: one pass per BatchNorm layer, each only up to that layer (about half a forward pass
    over the target data per layer on average).

    Under data parallelism (an initialised process group) every rank calls this with **its own
    shard** of the target data (e.g. ``eval_loader(..., rank=rank(), world=world_size())``); the
    sums are all-reduced, so every rank gets the same statistics, those of one process over the
    whole split. A rank with an empty shard takes part with zeros.

    Args:
        model: the source model; left untouched (its weights, buffers and hooks).
        batches: the unlabelled target data, iterated once per layer plus once: a re-iterable of
            input tensors or of ``(x, ...)`` tuples (a ``DataLoader``), or a callable returning a
            fresh iterable. Labels are never read.

    Returns:
        the adapted copy, on ``model``'s device and dtype.

    Shape:
        - Inputs: whatever ``model`` takes, e.g. :math:`(N, 3, H, W)`; cast to the model's
          device and floating dtype.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> target = [torch.randn(16, 3, 8, 8) + 2 for _ in range(3)]  # 3 batches of target images
        >>> adapted = adapt_batchnorm(net, target)
        >>> x = net[0](torch.cat(target))  # the BatchNorm's input on the whole target set
        >>> torch.allclose(adapted[1].running_mean, x.mean((0, 2, 3)), atol=1e-5)
        True
        >>> bool((net[1].running_mean == 0).all())  # the source model keeps its statistics
        True
    """
    if isinstance(batches, Iterator):
        raise TypeError("adapt_batchnorm iterates the batches once per BatchNorm layer; pass a re-iterable "
                        "(a DataLoader, a list) or a callable returning a fresh iterable, not an iterator.")
    adapted = copy.deepcopy(model)
    flags = [m.training for m in adapted.modules()]
    reference = next(t for t in (*adapted.parameters(), *adapted.buffers()) if t.is_floating_point())

    def to(x: Tensor) -> Tensor:
        return x.to(reference.device, reference.dtype)

    layers = {name: m for name, m in adapted.named_modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None}
    adapted.eval()
    for name in _forward_order(adapted, layers, batches, to):
        mean, var = _input_stats(adapted, layers[name], batches, to)
        layers[name].running_mean.copy_(mean)
        layers[name].running_var.copy_(var)
    for m, flag in zip(adapted.modules(), flags):
        m.training = flag
    return adapted


def adaptation_split(data: DataModule, split: str, option: str = "norm.adabn.split=") -> ImageSet:
    """The images AdaBN estimates statistics on (their labels are never read), with the evaluation
    transforms: the statistics are those of the images the model will be scored on.

    Args:
        data: the run's datasets.
        split: ``unlabeled`` (the target train split; domain adaptation only), ``train`` (the
            labelled training set: the few labelled target images when fine-tuning) or the name
            of an evaluation split (``target_val``; ``target_test`` adapts transductively, on
            the very images it is scored on: test-time adaptation, e.g. for domain generalization).
        option: how error messages name the setting.

    Raises:
        ConfigError: the split does not exist in this run.
    """
    if split == "unlabeled":
        if data.unlabeled is None:
            raise ConfigError(f"{option}unlabeled is the unlabelled target train split, which only dataset.setting=da "
                              f"has; name another split: train or one of {list(data.eval_splits)} (target_test "
                              "adapts on the test images themselves).")
        return data.unlabeled.augmented(False)
    if split == "train":
        return data.train.augmented(False)
    if split not in data.eval_splits:
        raise ConfigError(f"{option}{split} is not a split of this run; use unlabeled, train or one of "
                          f"{list(data.eval_splits)}.")
    return data.eval_splits[split]


class AdaBNStrategy(Plugin):
    """AdaBN as a plug-in: target splits (``target_*``) are evaluated with a copy of the model
    whose BatchNorm statistics are re-estimated exactly on the target data
    (:func:`adapt_batchnorm`); source splits keep the model's own statistics, so selection on
    ``source_val`` is unaffected. Training, the trained weights and the checkpoints are those of
    the model without AdaBN.

    The statistics are recomputed once per evaluation (after each optimizer step the cached copy
    is dropped), with ``trainer.eval_batch_size`` and, under data parallelism, each rank on its
    shard.
    No target batches are drawn during training (``uses_target = False``) and no labels are read.

    Args:
        split: the images to adapt on (:func:`adaptation_split`). Default: ``unlabeled``, the
            target train split of domain adaptation, as in the paper (all target images
            available without labels). Other settings must name one (``train`` when fine-tuning,
            ``target_test`` for test-time adaptation in domain generalization); a missing split
            fails in ``setup``, before training.

    Example:
        ``tllab-train norm=adabn``. On the embedded digits, mnist -> mnistm, target accuracy
        goes from 0.349 to 0.543 (design notes, 3 epochs, 3 seeds); after 30 steps from 0.27-0.38
        to 0.50-0.55 (seeds 0-4, ``tests/test_norm_adabn.py``).
    """

    def __init__(self, split: str = "unlabeled") -> None:
        super().__init__()
        self.split = split
        self._adapted: list[nn.Module] = []  # this evaluation's adapted copy (a list: not a submodule)

    def setup(self, ctx: SetupContext) -> None:
        adaptation_split(ctx.data, self.split)

    def after_step(self, model: nn.Module) -> None:
        self._adapted.clear()  # the weights moved: the next evaluation adapts again

    def eval_model(self, model: nn.Module, ctx: SetupContext, split: str) -> nn.Module:
        """Target splits are evaluated with target statistics, source splits with the model's own."""
        if not split.startswith("target"):
            return model
        if not self._adapted:
            trainer = ctx.config["trainer"]
            loader = eval_loader(adaptation_split(ctx.data, self.split), trainer["eval_batch_size"],
                                 trainer["num_workers"], rank(), world_size())
            self._adapted.append(adapt_batchnorm(model, loader))
        return self._adapted[0]

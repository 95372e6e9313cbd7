r"""IBN-Net: instance and batch normalization in one network (Pan et al., ECCV 2018).

*Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net*, X. Pan, P. Luo,
J. Shi, X. Tang, ECCV 2018 (reference code ``XingangPan/IBN-Net``, ``ibnnet/resnet_ibn.py``).
Instance normalization (IN) removes per-image appearance (colour, contrast, style) from a
feature map; batch normalization (BN) keeps the content information that separates classes.
IBN-Net puts IN in the shallow layers only, where appearance lives ("do not use IN in deep
layers", author in IBN-Net issue #22), in two published layouts:

- **IBN-a** (:func:`to_ibn_a`): in every block of ``layer1``-``layer3`` the BatchNorm after the
  block's first conv (``bn1``: after the 1x1 conv of a Bottleneck, the first 3x3 of a
  BasicBlock) becomes :class:`InstanceBatchNorm2d` (IN on half of the channels, BN on the other
  half). ``layer4`` and the stem keep BN. The paper finds it best for in-domain accuracy.
- **IBN-b** (:func:`to_ibn_b`): the stem's ``bn1`` is *replaced* by ``InstanceNorm2d(64,
  affine=True)``, and the *last* block of ``layer1`` and of ``layer2`` applies
  ``InstanceNorm2d(affine=True)`` after the residual addition, before the final ReLU. Downsample
  branches keep BN. The paper finds it best across domains (GTA5 <-> Cityscapes); it is not a
  universal win in-domain (IBN-Net issue #27).

Both work on torchvision and timm ResNets (BasicBlock, Bottleneck) and on the digits CNN; the
named constructors :func:`resnet50_ibn_a` etc. build IBN-ResNets directly (``backbone.library=tllab
backbone.name=resnet50_ibn_a``) with the official parameter names (``layer1.0.bn1.IN.weight``,
``layer1.0.bn1.BN.running_mean``, ``layer1.2.IN.weight``), so the official checkpoints' keys match.
As a normalization strategy (``norm=ibn_a`` / ``norm=ibn_b``, :class:`IBNStrategy`) the
conversion keeps the backbone's pretrained weights where a layer has a counterpart (see
:func:`to_ibn_a`, :func:`to_ibn_b`). The channel order (IN first, then BN) is the current official
``IBN`` module's; the paper-era code put BN first (its ResNet-50 ImageNet top-1 error: 22.54 vs
22.76 for the current module).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models import resnet as timm_resnet
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.models import resnet as tv_resnet

from tllab.errors import ConfigError
from tllab.models.classifier import Classifier
from tllab.models.cnn import DigitsCNN
from tllab.models.resnet import torchvision_resnet
from tllab.norm import placement
from tllab.plugin import Plugin

IBN_A_STAGES = ("layer1", "layer2", "layer3")  # IBN-a: every block of these stages
IBN_B_STAGES = ("layer1", "layer2")  # IBN-b: the last block of these stages (plus the stem)
_SUPPORTED = ("backbone=digits_cnn, backbone=resnet18/resnet34/resnet50 (torchvision) or backbone=timm "
              "backbone.name=resnet18/resnet34/resnet50 (or another timm ResNet)")


class _InstanceBatchNormFunction(torch.autograd.Function):
    r"""``y = x * scale + shift`` with ``scale = weight * invstd``, ``shift = bias - mean * scale``
    for given per-(sample, channel) statistics ``mean``, ``invstd`` of shape :math:`(N, C)`.

    The backward differentiates through the statistics: per sample for the first ``half``
    channels (IN); over the batch for the others when ``batch_stats`` (BN in training); not at
    all for them otherwise (BN with running statistics).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, half: int,
                batch_stats: bool) -> Tensor:
        scale = weight * invstd
        shift = bias - mean * scale
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.half, ctx.batch_stats = half, batch_stats
        return torch.addcmul(shift[..., None, None], x, scale[..., None, None])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        half, hw = ctx.half, h * w
        # PyTorch's fused BatchNorm backward on the (1, N*C, H, W) view treats every (sample,
        # channel) as a channel: the exact IN gradient for the first `half` channels, and per
        # (sample, channel) sums of dy and dy * xhat for all of them.
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous().view(1, n * c, h, w), x.view(1, n * c, h, w), weight.repeat(n), None, None,
            mean.reshape(-1), invstd.reshape(-1), True, 0.0, [True, True, True])
        dx, sum_dy_xhat, sum_dy = dx.view(n, c, h, w), sum_dy_xhat.view(n, c), sum_dy.view(n, c)
        # For the BN channels that dx subtracted per-sample means of dy and dy * xhat; BN subtracts
        # batch means (training) or nothing (fixed statistics). Add the difference
        # weight * invstd * (u + xhat * v) = a + b * x per (sample, channel).
        u, v = sum_dy[:, half:] / hw, sum_dy_xhat[:, half:] / hw
        if ctx.batch_stats:
            u, v = u - u.mean(0), v - v.mean(0)
        k = weight[half:] * invstd[:, half:]
        b = k * invstd[:, half:] * v
        a = k * u - b * mean[:, half:]
        dx[:, half:].add_(a[..., None, None]).addcmul_(x[:, half:], b[..., None, None])
        return dx, sum_dy_xhat.sum(0), sum_dy.sum(0), None, None, None, None


class InstanceBatchNorm2d(nn.Module):
    r"""IBN layer: instance normalization on the first channels, batch normalization on the rest.

    With :math:`h = \lfloor C \cdot ratio \rfloor`,

    .. math::
        y = \mathrm{concat}\big(\mathrm{IN}(x_{:, :h}),\ \mathrm{BN}(x_{:, h:})\big)

    where ``IN = nn.InstanceNorm2d(h, affine=True)`` normalizes each sample and channel over
    :math:`H, W` (in training *and* evaluation: it keeps no running statistics) and
    ``BN = nn.BatchNorm2d(C - h)`` normalizes each channel over :math:`N, H, W` in training
    (updating its running statistics) and with its running statistics in evaluation. Both use
    the biased variance with ``eps`` inside the square root. Channels are split as
    ``[h, C - h]`` (the original ``torch.split(x, h)`` gives more than two chunks for odd
    :math:`C` or ``ratio != 0.5``; IBN-Net pitfall).

    On CPU with float32/float64 inputs and the stock ``IN``/``BN`` sub-modules, one fused pass
    computes both halves (no split copies or concatenation; about 1.3x the time of a
    ``BatchNorm2d`` of all channels, forward plus backward). Otherwise (``BN`` converted to
    :class:`tllab.nn.SyncBatchNorm` by ``trainer.sync_bn``, hooks on a sub-module, GPU, half
    precision) the two sub-modules run on their channels.

    Args:
        planes: number of channels :math:`C`.
        ratio: fraction of channels that get IN, in (0, 1); both halves need at least one
            channel. Default: 0.5 (IBN-Net).
        eps: added to the variance of both halves. Default: 1e-5.
        momentum: BN's running-statistics factor (``None``: cumulative average). Default: 0.1.

    Shape:
        - Input: :math:`(N, C, H, W)` with :math:`H \cdot W > 1` (IN of a single value is
          undefined, in evaluation too: a ``ValueError``); :math:`N = 1` works in training.
        - Output: same shape.

    Raises:
        ValueError: a ``ratio`` outside (0, 1), or one that leaves a half without channels.

    Example:
        >>> ibn = InstanceBatchNorm2d(64)  # IN on channels 0-31, BN on 32-63
        >>> ibn(torch.randn(8, 64, 16, 16)).shape
        torch.Size([8, 64, 16, 16])
    """

    def __init__(self, planes: int, ratio: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        if not 0 < ratio < 1:
            raise ValueError(f"InstanceBatchNorm2d ratio must be in (0, 1), got {ratio}.")
        half = int(planes * ratio)
        if half < 1 or planes - half < 1:
            raise ValueError(f"InstanceBatchNorm2d({planes}, ratio={ratio}) would give {half} instance-normalized "
                             f"and {planes - half} batch-normalized channels; both need at least one (use a plain "
                             "InstanceNorm2d or BatchNorm2d, or another ratio).")
        self.planes, self.half = planes, half
        # Names as in the official IBN module, so its checkpoints' keys match (bn1.IN.weight...).
        self.IN = nn.InstanceNorm2d(half, eps=eps, affine=True)
        self.BN = nn.BatchNorm2d(planes - half, eps=eps, momentum=momentum)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, ratio: float = 0.5) -> InstanceBatchNorm2d:
        """An IBN layer replacing ``bn``, keeping its weights where they have a counterpart.

        The BN half takes channels ``[h:]`` of ``bn``: weight, bias, running statistics and
        ``num_batches_tracked`` (so in evaluation it computes what ``bn`` computed on
        those channels); the IN half's affine takes channels ``[:h]`` of ``bn``'s weight and bias
        (IN keeps no statistics). ``eps``, ``momentum``, device and dtype are ``bn``'s.

        Raises:
            ValueError: ``bn`` has no affine parameters or no running statistics.
        """
        if not (bn.affine and bn.track_running_stats):
            raise ValueError("InstanceBatchNorm2d.from_batchnorm needs a BatchNorm with affine parameters and running "
                             f"statistics, got {bn}.")
        ibn = cls(bn.num_features, ratio, bn.eps, bn.momentum).to(bn.weight.device, bn.weight.dtype)
        h = ibn.half
        with torch.no_grad():
            ibn.IN.weight.copy_(bn.weight[:h])
            ibn.IN.bias.copy_(bn.bias[:h])
            ibn.BN.weight.copy_(bn.weight[h:])
            ibn.BN.bias.copy_(bn.bias[h:])
            ibn.BN.running_mean.copy_(bn.running_mean[h:])
            ibn.BN.running_var.copy_(bn.running_var[h:])
            ibn.BN.num_batches_tracked.copy_(bn.num_batches_tracked)
        return ibn

    def extra_repr(self) -> str:
        return f"{self.planes}, half={self.half}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.planes:
            raise ValueError(f"InstanceBatchNorm2d({self.planes}) expects (N, {self.planes}, H, W) input, "
                             f"got {tuple(x.shape)}.")
        if x.shape[2] * x.shape[3] == 1:
            raise ValueError(f"InstanceBatchNorm2d got a 1x1 feature map {tuple(x.shape)}: instance normalization "
                             "needs more than one spatial element (in evaluation too). Use larger images, or do not "
                             "place IBN where the feature map is 1x1.")
        if not self._fusable(x):
            a, b = x.split([self.half, self.planes - self.half], 1)
            return torch.cat([self.IN(a), self.BN(b)], 1)
        x = x.contiguous()
        mean, invstd, batch_stats = self._statistics(x)
        weight, bias = torch.cat([self.IN.weight, self.BN.weight]), torch.cat([self.IN.bias, self.BN.bias])
        return _InstanceBatchNormFunction.apply(x, weight, bias, mean, invstd, self.half, batch_stats)

    def _fusable(self, x: Tensor) -> bool:
        # The fused pass never calls the sub-modules: not when hooks observe them (AdaBN collects
        # a BatchNorm's input with a forward pre-hook) or when they are not the stock layers.
        hooked = any(m._forward_pre_hooks or m._forward_hooks for m in (self.IN, self.BN))
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[0] > 0 and not hooked
                and type(self.IN) is nn.InstanceNorm2d and self.IN.affine and not self.IN.track_running_stats
                and type(self.BN) is nn.BatchNorm2d and self.BN.affine)

    @torch.no_grad()
    def _statistics(self, x: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Per-(sample, channel) mean and 1/std as the halves use them, and whether BN uses the
        batch's statistics; updates BN's running statistics as ``nn.BatchNorm2d`` does."""
        n, c, h, w = x.shape
        half, bn = self.half, self.BN
        # One pass over (1, N*C, H, W): every (sample, channel)'s mean and biased variance.
        mean, var = torch.batch_norm_update_stats(x.view(1, n * c, h, w), None, None, 0.0)
        mean, var = mean.view(n, c), var.view(n, c)
        batch_stats = bn.training or bn.running_mean is None
        if batch_stats:
            bn_mean = mean[:, half:].mean(0)
            # Chan's merge of per-sample statistics: exact, no E[x^2] - E[x]^2 cancellation.
            bn_var = (var[:, half:] + (mean[:, half:] - bn_mean).square()).mean(0)
            if bn.training and bn.track_running_stats:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
                count = n * h * w
                bn.running_mean.mul_(1 - factor).add_(bn_mean, alpha=factor)
                bn.running_var.mul_(1 - factor).add_(bn_var * (count / (count - 1)), alpha=factor)
        else:
            bn_mean, bn_var = bn.running_mean, bn.running_var
        mean[:, half:] = bn_mean
        invstd = torch.cat([torch.rsqrt(var[:, :half] + self.IN.eps),
                            torch.rsqrt(bn_var + bn.eps).expand(n, -1)], 1)
        return mean, invstd, batch_stats


class BasicBlockIBNb(tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` with ``IN`` after the residual addition (IBN-b)."""

    IN: nn.InstanceNorm2d

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.IN(out + identity))


class BottleneckIBNb(tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` with ``IN`` after the residual addition (IBN-b)."""

    IN: nn.InstanceNorm2d

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.IN(out + identity))


class TimmBasicBlockIBNb(timm_resnet.BasicBlock):
    """timm ``BasicBlock`` with ``IN`` after the residual addition (IBN-b)."""

    IN: nn.InstanceNorm2d

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act2(self.IN(x + shortcut))


class TimmBottleneckIBNb(timm_resnet.Bottleneck):
    """timm ``Bottleneck`` with ``IN`` after the residual addition (IBN-b)."""

    IN: nn.InstanceNorm2d

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act3(self.IN(x + shortcut))


# Block class -> its IBN-b subclass (same attributes plus `IN`, swapped in place by to_ibn_b).
_IBN_B_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    tv_resnet.BasicBlock: BasicBlockIBNb, tv_resnet.Bottleneck: BottleneckIBNb,
    timm_resnet.BasicBlock: TimmBasicBlockIBNb, timm_resnet.Bottleneck: TimmBottleneckIBNb,
}


def ibn_variant(backbone: nn.Module) -> str | None:
    """``"a"`` or ``"b"`` if ``backbone`` already has IBN-a / IBN-b layers, else ``None``."""
    modules = list(backbone.modules())
    if any(isinstance(m, InstanceBatchNorm2d) for m in modules):
        return "a"
    if any(type(m) in _IBN_B_BLOCKS.values() for m in modules) or any(
            k.startswith("ibn_b_") for k in getattr(backbone, "norm_layers", {})):
        return "b"
    return None


def _check_unconverted(backbone: nn.Module, variant: str) -> None:
    done = ibn_variant(backbone)
    if done:
        raise ConfigError(f"the backbone ({type(backbone).__name__}) already has IBN-{done} layers; converting it to "
                          f"IBN-{variant} as well is not supported. Use an IBN backbone "
                          "(backbone.library=tllab backbone.name=resnet50_ibn_a) or a plain backbone with "
                          "norm=ibn_a / norm=ibn_b, not both.")


def _batchnorm(module: nn.Module, attr: str, where: str) -> nn.BatchNorm2d:
    bn = getattr(module, attr, None)
    if type(bn) is not nn.BatchNorm2d:
        raise ConfigError(f"IBN expects {where}.{attr} to be a BatchNorm2d, found {type(bn).__name__}; apply IBN "
                          "to a plain ResNet.")
    return bn


def _instance_norm_from(bn: nn.BatchNorm2d) -> nn.InstanceNorm2d:
    """``InstanceNorm2d(affine=True)`` with ``bn``'s eps, affine weight and bias (its running
    statistics have no counterpart in IN)."""
    norm = nn.InstanceNorm2d(bn.num_features, eps=bn.eps, affine=True).to(bn.weight.device, bn.weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(bn.weight)
        norm.bias.copy_(bn.bias)
    return norm


def to_ibn_a(backbone: nn.Module, ratio: float = 0.5) -> nn.Module:
    """Turn a ResNet or the digits CNN into IBN-a, in place; returns ``backbone``.

    - torchvision / timm ResNet: in every block of ``layer1``-``layer3``, ``bn1`` (the BN after
      the block's first conv) becomes :class:`InstanceBatchNorm2d` (IBN-Net's ``ibn_cfg=('a',
      'a', 'a', None)``: 3+4+6 = 13 IBN layers in ResNet-50, 2+2+2 = 6 in ResNet-18). ``layer4``,
      the stem and the downsample branches keep BN: IN in deep layers hurts discrimination.
    - digits CNN: the BN of every block but the last (``block1``, ``block2``) becomes
      :class:`InstanceBatchNorm2d`; the last, deepest block keeps BN, the same shallow-layers rule.

    Pretrained weights carry over through :meth:`InstanceBatchNorm2d.from_batchnorm`: the BN
    half keeps the replaced BN's weights and running statistics for its channels, the IN half's
    affine takes the other channels' weight and bias.

    Args:
        backbone: a torchvision or timm ResNet (``BasicBlock``/``Bottleneck`` blocks with
            ``bn1``) or :class:`~tllab.models.cnn.DigitsCNN`.
        ratio: fraction of each IBN layer's channels that get IN. Default: 0.5.

    Raises:
        ConfigError: another backbone, one already converted, or a ``bn1`` that is not a plain
            ``BatchNorm2d``.

    Example:
        >>> net = to_ibn_a(torchvision_resnet("resnet50"))
        >>> sum(isinstance(m, InstanceBatchNorm2d) for m in net.modules())
        13
    """
    _check_unconverted(backbone, "a")
    found = _stages(backbone, "IBN-a")
    if isinstance(backbone, DigitsCNN):
        bns = [i for i, m in enumerate(backbone.features) if isinstance(m, nn.BatchNorm2d)]
        for i in bns[:len(found) - 1]:
            backbone.features[i] = InstanceBatchNorm2d.from_batchnorm(backbone.features[i], ratio)
        return backbone
    for name in IBN_A_STAGES:
        for i, block in enumerate(found[name]):
            block.bn1 = InstanceBatchNorm2d.from_batchnorm(_batchnorm(block, "bn1", f"{name}.{i}"), ratio)
    return backbone


def to_ibn_b(backbone: nn.Module) -> nn.Module:
    """Turn a ResNet or the digits CNN into IBN-b, in place; returns ``backbone``.

    - torchvision / timm ResNet (IBN-Net's ``ibn_cfg=('b', 'b', None, None)``): the stem's
      ``bn1`` is *replaced* by ``InstanceNorm2d(64, affine=True)`` taking the BN's weight and bias
      (its running statistics are dropped); the last block of ``layer1`` and of ``layer2``
      becomes its IBN-b subclass (:class:`BottleneckIBNb` etc.: same parameters, plus an
      ``IN = InstanceNorm2d(C, affine=True)`` initialised to the identity affine) that applies
      ``IN`` after the residual addition, before the final ReLU. Downsample branches keep BN.
    - digits CNN (conv -> BN -> ReLU -> max-pool blocks, no residual addition): an
      ``InstanceNorm2d(affine=True)`` normalizes the output of ``block1`` and ``block2`` (after
      the pool; the last block is left alone), registered as ``norm_layers.ibn_b_block1`` etc. and
      run by a forward hook on the pool (:func:`tllab.norm.placement.attach_after`). Like IBN-b's
      post-addition IN it normalizes what the block passes on while the block keeps its BN; an
      IN between the BN and the ReLU instead would cancel that BN's per-channel affine (its
      weight and bias would get no gradient).

    Raises:
        ConfigError: another backbone, one already converted, or ResNet blocks of another type.

    Example:
        >>> net = to_ibn_b(torchvision_resnet("resnet50"))
        >>> type(net.bn1).__name__, type(net.layer1[-1]).__name__
        ('InstanceNorm2d', 'BottleneckIBNb')
    """
    _check_unconverted(backbone, "b")
    found = _stages(backbone, "IBN-b")
    if isinstance(backbone, DigitsCNN):
        pools = list(found.values())[:min(2, len(found) - 1)]
        widths = [m.num_features for m in backbone.features if isinstance(m, nn.BatchNorm2d)]
        for i, (pool, width) in enumerate(zip(pools, widths)):
            placement.attach_after(backbone, pool, f"ibn_b_block{i + 1}", nn.InstanceNorm2d(width, affine=True))
        return backbone
    blocks = {name: found[name][-1] for name in IBN_B_STAGES}
    for name, block in blocks.items():
        if type(block) not in _IBN_B_BLOCKS:
            raise ConfigError(f"IBN-b supports torchvision and timm BasicBlock/Bottleneck ResNets; {name}[-1] is a "
                              f"{type(block).__module__}.{type(block).__name__}. Use {_SUPPORTED}.")
    backbone.bn1 = _instance_norm_from(_batchnorm(backbone, "bn1", "the stem"))
    for block in blocks.values():
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        block.__class__ = _IBN_B_BLOCKS[type(block)]
        block.IN = nn.InstanceNorm2d(last_bn.num_features, eps=last_bn.eps, affine=True).to(
            last_bn.weight.device, last_bn.weight.dtype)
    return backbone


def _stages(backbone: nn.Module, what: str) -> dict[str, nn.Module]:
    try:
        return placement.stages(backbone)
    except ConfigError:
        raise ConfigError(f"{what} needs a ResNet (layer1..layer4) or the digits CNN, not "
                          f"{type(backbone).__name__}; use {_SUPPORTED}, or backbone.library=tllab "
                          "backbone.name=resnet50_ibn_a (resnet18/34/50, _ibn_a or _ibn_b).") from None


def resnet18_ibn_a(ratio: float = 0.5, **kwargs) -> nn.Module:
    """IBN-ResNet-18-a: torchvision's ResNet-18 (random init, no ``fc``, ``out_features`` 512)
    through :func:`to_ibn_a` with IBN channel ratio ``ratio``; ``kwargs`` go to torchvision."""
    return to_ibn_a(torchvision_resnet("resnet18", **kwargs), ratio)


def resnet34_ibn_a(ratio: float = 0.5, **kwargs) -> nn.Module:
    """IBN-ResNet-34-a (``out_features`` 512); see :func:`resnet18_ibn_a`."""
    return to_ibn_a(torchvision_resnet("resnet34", **kwargs), ratio)


def resnet50_ibn_a(ratio: float = 0.5, **kwargs) -> nn.Module:
    """IBN-ResNet-50-a (``out_features`` 2048); see :func:`resnet18_ibn_a`.

    Example:
        >>> resnet50_ibn_a().out_features
        2048
    """
    return to_ibn_a(torchvision_resnet("resnet50", **kwargs), ratio)


def resnet101_ibn_a(ratio: float = 0.5, **kwargs) -> nn.Module:
    """IBN-ResNet-101-a (``out_features`` 2048); see :func:`resnet18_ibn_a`."""
    return to_ibn_a(torchvision_resnet("resnet101", **kwargs), ratio)


def resnet18_ibn_b(**kwargs) -> nn.Module:
    """IBN-ResNet-18-b: torchvision's ResNet-18 (random init, no ``fc``, ``out_features`` 512)
    through :func:`to_ibn_b`; ``kwargs`` go to torchvision."""
    return to_ibn_b(torchvision_resnet("resnet18", **kwargs))


def resnet34_ibn_b(**kwargs) -> nn.Module:
    """IBN-ResNet-34-b (``out_features`` 512); see :func:`resnet18_ibn_b`."""
    return to_ibn_b(torchvision_resnet("resnet34", **kwargs))


def resnet50_ibn_b(**kwargs) -> nn.Module:
    """IBN-ResNet-50-b (``out_features`` 2048); see :func:`resnet18_ibn_b`."""
    return to_ibn_b(torchvision_resnet("resnet50", **kwargs))


def resnet101_ibn_b(**kwargs) -> nn.Module:
    """IBN-ResNet-101-b (``out_features`` 2048); see :func:`resnet18_ibn_b`."""
    return to_ibn_b(torchvision_resnet("resnet101", **kwargs))


IBN_RESNETS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (resnet18_ibn_a, resnet34_ibn_a, resnet50_ibn_a, resnet101_ibn_a, resnet18_ibn_b,
                            resnet34_ibn_b, resnet50_ibn_b, resnet101_ibn_b)}


class IBNStrategy(Plugin):
    """IBN-Net as a normalization strategy: converts ``model.backbone`` to IBN-a or IBN-b.

    ``norm=ibn_a`` / ``norm=ibn_b``. The conversion runs in ``transform_model``, after the
    backbone's pretrained weights are loaded, and keeps them where layers have a counterpart
    (:func:`to_ibn_a`, :func:`to_ibn_b`); with ``trainer.sync_bn=true`` the BN halves are
    synchronized like any BatchNorm. A backbone that already has IBN layers (``resnet50_ibn_a``)
    is refused rather than converted twice. It takes the ``"batchnorm"`` role: stacking it with
    another BatchNorm replacement (StochNorm, BIN, DomainNorm) is refused; AdaBN, MixStyle and
    the like combine with it.

    Args:
        variant: ``"a"`` (IBN layers in ``layer1``-``layer3``) or ``"b"`` (IN in the stem and
            after the last blocks of ``layer1``, ``layer2``). Default: ``"a"``.
        ratio: IBN-a's fraction of instance-normalized channels, in (0, 1). Default: 0.5.

    Example:
        >>> model = IBNStrategy("a").transform_model(Classifier(torchvision_resnet("resnet18"), 10))
        >>> type(model.backbone.layer1[0].bn1).__name__
        'InstanceBatchNorm2d'
    """

    exclusive = "batchnorm"

    def __init__(self, variant: str = "a", ratio: float = 0.5) -> None:
        super().__init__()
        if variant not in ("a", "b"):
            raise ValueError(f"variant must be 'a' (IBN-a) or 'b' (IBN-b), got {variant!r}.")
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}.")
        if variant == "b" and ratio != 0.5:
            raise ValueError("ratio applies to IBN-a only; IBN-b uses whole InstanceNorm2d layers.")
        self.variant, self.ratio = variant, ratio

    def transform_model(self, model: Classifier) -> Classifier:
        if self.variant == "a":
            model.backbone = to_ibn_a(model.backbone, self.ratio)
        else:
            model.backbone = to_ibn_b(model.backbone)
        return model

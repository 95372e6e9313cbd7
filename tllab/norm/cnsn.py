r"""CrossNorm and SelfNorm (Tang et al., "CrossNorm and SelfNorm for Generalization under
Distribution Shifts", ICCV 2021).

CrossNorm (CN) swaps channel-wise mean and std between the instances of a training batch to
enlarge the training distribution; SelfNorm (SN) recalibrates each instance's statistics with
learned attention-like gates to bridge train and test distributions. Semantics follow the
official code (``amazon-research/crossnorm-selfnorm`` ``models/cnsn.py``) except that every
random draw comes from one ``torch.Generator``, crop boxes take a bounded number of attempts
(the official ``while True`` never ends on maps of 2x2 or smaller), and 1x1 maps are never NaN.

Placement: tllab runs one module on the output of each chosen backbone stage, i.e. the paper's
``pos=post`` position of the stage's last block (after its final ReLU). Default stages: all of
them (ResNet ``layer1``–``layer4`` as the ImageNet ResNet-50 CNSN, digits CNN ``block1``–``block3``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tllab.errors import ConfigError
from tllab.nn.fused import channel_affine2
from tllab.norm.mixstyle import instance_stats, sample_beta
from tllab.norm.placement import attach_after, resolve_stages, stage_channels, stages
from tllab.plugin import Plugin, SetupContext

__all__ = ["CNSN", "CNSNStrategy", "CrossNorm", "CrossNormStrategy", "SelfNorm", "SelfNormStrategy", "random_box"]

CROPS = ("neither", "style", "content", "both")
MIN_BOX_AREA = 0.1  # the official bbx_thres: a box must cover more than this fraction of the map


def random_box(height: int, width: int, beta: float = 1.0, generator: torch.Generator | None = None,
               tries: int = 16) -> tuple[int, int, int, int]:
    r"""A crop box ``(top, bottom, left, right)`` as the official ``cn_rand_bbox`` draws it.

    Area ratio :math:`r \sim \mathrm{Beta}(\beta, \beta)`, sides ``int(H sqrt(r))`` x ``int(W sqrt(r))``,
    uniform centre, half-sides rounded down, clipped to the map; redrawn while the box covers at
    most 10% of the map or fewer than 2 positions (an unbiased variance needs 2). After ``tries``
    failures (always on maps of 2x2 or smaller, where the half-sides round to 0) the whole map.

    Example:
        >>> random_box(2, 2, generator=torch.Generator().manual_seed(0))
        (0, 2, 0, 2)
    """
    side = sample_beta(beta, tries, generator).sqrt()
    half_h, half_w = (height * side).long() // 2, (width * side).long() // 2
    cy = torch.randint(height, (tries,), generator=generator)
    cx = torch.randint(width, (tries,), generator=generator)
    top, bottom = (cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height)
    left, right = (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)
    area = (bottom - top) * (right - left)
    ok = ((area > MIN_BOX_AREA * height * width) & (area >= 2)).nonzero()
    if len(ok) == 0:
        return 0, height, 0, width
    i = int(ok[0, 0])
    return int(top[i]), int(bottom[i]), int(left[i]), int(right[i])


def _centred_sums(g: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """:math:`\\sum_{hw} g (x - \\mu)` and :math:`\\sum_{hw} g` per instance and channel, (N, C, 1, 1) in
    ``mean``'s dtype: BatchNorm's backward reduction kernel on the (1, N*C, H, W) view reads
    ``g`` and ``x`` once and writes nothing big (3-5x faster on CPU than multiply-then-sum)."""
    n, c = x.shape[:2]
    view = (1, n * c, *x.shape[2:])
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        g.reshape(view), x.reshape(view), None, None, None, mean.flatten(), torch.ones_like(mean.flatten()),
        True, 0.0, [False, True, True])
    return dot.view_as(mean), total.view_as(mean)


class _StatsAffine(torch.autograd.Function):
    """``y = x * a + b`` with ``(a, b) = fn(mean, std, *extras)`` of ``x``'s instance statistics.

    Autograd through the statistics and an affine map costs several passes over the map in
    backward (and one more to add the two gradients of ``x``); here the small ``fn`` graph is
    differentiated by autograd and the big tensors take one reduction pass and one fused pass:
    :math:`g_a = \\sum_{hw} g\\,x`, :math:`g_b = \\sum_{hw} g`,
    :math:`dx = g\\,a + g_\\mu / n + g_\\sigma (x - \\mu) / ((n - 1) \\sigma)`.
    ``extras`` are every tensor ``fn`` needs gradients for (parameters, statistics of other
    tensors); ``b`` may be ``None``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float, fn: Callable[..., tuple[Tensor, Tensor | None]],
                *extras: Tensor) -> Tensor:
        track = any(ctx.needs_input_grad)
        mean, std = instance_stats(x, eps)  # runs without autograd inside forward
        with torch.set_grad_enabled(track):
            mean_t, std_t = mean.detach().requires_grad_(track), std.detach().requires_grad_(track)
            a, b = fn(mean_t, std_t, *extras)
        if track:
            ctx.save_for_backward(x, mean, std)
            ctx.graph = (mean_t, std_t, a, b, extras)  # the small graph, differentiated in backward
        a = a.detach().to(x.dtype)
        return x * a if b is None else torch.addcmul(b.detach().to(x.dtype), x, a)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, std = ctx.saved_tensors
        mean_t, std_t, a, b, extras = ctx.graph
        centred, total = _centred_sums(g, x, mean)
        outputs, grads = [a], [centred + mean * total]
        if b is not None:
            outputs.append(b)
            grads.append(total)
        wanted = [e for e in extras if e.requires_grad]
        g_mean, g_std, *g_wanted = torch.autograd.grad(outputs, [mean_t, std_t, *wanted], grads,
                                                       retain_graph=True, materialize_grads=True)
        dx = None
        if ctx.needs_input_grad[0]:
            n = x.shape[2] * x.shape[3]
            per_x = g_std / (std * max(n - 1, 1))
            dx = channel_affine2(g, x, *(k.to(x.dtype) for k in (a.detach(), per_x, g_mean / n - per_x * mean)))
        by_id = {id(e): d for e, d in zip(wanted, g_wanted)}
        return dx, None, None, *(by_id.get(id(e)) for e in extras)


def _cross(mean: Tensor, std: Tensor, perm: Tensor, *style: Tensor) -> tuple[Tensor, Tensor]:
    """CrossNorm's affine map: content statistics ``(mean, std)`` to the style statistics
    ``style = (mean_s, std_s)`` (default: the content's own) of the partner ``perm``."""
    mean_s, std_s = style or (mean, std)
    scale = std_s[perm] / std
    return scale, mean_s[perm] - mean * scale


class CrossNorm(nn.Module):
    r"""Exchanges channel-wise mean and std between instances (CrossNorm, 2-instance version).

    When ``active`` and in training mode, with :math:`\pi` a random permutation of the batch:

    .. math::
        y_b = \frac{x_b - \mu(x_b)}{\sigma(x_b)}\,\sigma(x_{\pi(b)}) + \mu(x_{\pi(b)}),\quad
        \sigma = \sqrt{\mathrm{Var}_{unbiased} + \epsilon}

    Gradients flow through all statistics (no detach, unlike MixStyle), so into the partner too.
    ``crop``: ``style``/``both`` take the partner's statistics from a random box (one for the
    batch); ``content``/``both`` re-style only a random box of :math:`x` (statistics of the box),
    leaving the rest unchanged. Boxes: :func:`random_box`.

    Identity (the input itself) in eval mode, when not ``active``, and for 1x1 feature maps. The
    owning strategy sets ``active`` per optimizer step (the official module resets it after every
    forward; tllab makes one activation last for the step's forward pass).

    Args:
        crop: ``"neither"``, ``"style"``, ``"content"`` or ``"both"``. Default: ``"neither"``.
        beta: :math:`\beta` of the Beta distribution of the box area. Default: 1 (uniform).
        eps: added to the variance inside the square root. Default: 1e-5 (official code).
        generator: source of the permutation and boxes; ``None``: torch's global generator.

    Shape:
        - Input: :math:`(N, C, H, W)`; Output: same shape.

    Example:
        >>> cn = CrossNorm(generator=torch.Generator().manual_seed(0))
        >>> cn.active = True
        >>> cn(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(self, crop: str = "neither", beta: float = 1.0, eps: float = 1e-5,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if crop not in CROPS:
            raise ValueError(f"CrossNorm crop={crop!r}; use one of {list(CROPS)}.")
        if beta <= 0:
            raise ValueError(f"CrossNorm beta={beta} must be > 0.")
        self.crop, self.beta, self.eps, self.generator = crop, beta, eps, generator
        self.active = False

    def extra_repr(self) -> str:
        return f"crop={self.crop}, beta={self.beta}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.applies(x):
            return x
        return self.restyle(x, *self.draw(x))

    def applies(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` changes it: training mode, ``active``, at least 2 positions."""
        return self.training and self.active and x.shape[2] * x.shape[3] >= 2

    def draw(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...], tuple[slice, ...] | None]:
        """One forward's random choices: the partner permutation, the style statistics (``()``:
        the content's own) and the content box (``None``: all of ``x``)."""
        h, w = x.shape[2:]
        perm = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        style_box = self._box(h, w) if self.crop in ("style", "both") else None
        content_box = self._box(h, w) if self.crop in ("content", "both") else None
        style = instance_stats(x[style_box] if style_box else x, self.eps) if style_box or content_box else ()
        return perm, style, content_box

    def restyle(self, x: Tensor, perm: Tensor, style: tuple[Tensor, ...], content_box: tuple[slice, ...] | None
                ) -> Tensor:
        """``x`` (or its content box) re-normalized to the partners' style statistics."""
        if content_box is None:
            return _StatsAffine.apply(x, self.eps, _cross, perm, *style)
        out = x.clone()  # outside the content box x is unchanged
        out[content_box] = _StatsAffine.apply(x[content_box], self.eps, _cross, perm, *style)
        return out

    def _box(self, h: int, w: int) -> tuple[slice, ...]:
        top, bottom, left, right = random_box(h, w, self.beta, self.generator)
        return slice(None), slice(None), slice(top, bottom), slice(left, right)


class _ChannelFC(nn.Module):
    """Channel-wise 2 -> 1 linear map of the (mean, std) pair: the official
    ``Conv1d(C, C, kernel_size=2, groups=C, bias=False)`` (same weight shape and initialization),
    written as a product because oneDNN's grouped convolution is orders of magnitude slower on
    these tiny inputs. Input :math:`(N, C, 2)`, output :math:`(N, C)`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, 2))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv1d.reset_parameters

    def forward(self, stats: Tensor) -> Tensor:
        return (stats * self.weight.squeeze(1)).sum(dim=2)


class SelfNorm(nn.Module):
    r"""Recalibrates each instance's channel statistics with learned gates (SelfNorm).

    .. math::
        s = [\mu, \sigma] \in \mathbb{R}^{N \times C \times 2},\quad
        g = \mathrm{sigmoid}(\mathrm{BN}(\mathrm{FC}_g(s))),\quad
        y = \hat{x}\,(g_\sigma \sigma) + g_\mu \mu,\quad \hat{x} = (x - \mu)/\sigma

    with :math:`\sigma = \sqrt{\mathrm{Var}_{unbiased} + 10^{-12}}`, ``FC`` a channel-wise 2 -> 1
    linear map (``Conv1d(C, C, 2, groups=C, bias=False)``) and ``BN`` a ``BatchNorm1d(C)``. By default
    (the official ``is_two=False``, used by all its models) one gate scales both:
    :math:`g_\sigma = g_\mu = g`, i.e. :math:`y = x\,g`. With ``mean_gate=True`` a second branch
    gives :math:`g_\mu = f`, i.e. :math:`y = x\,g + \mu\,(f - g)`. Runs in training and eval mode
    (eval uses the BatchNorm's running statistics); training needs a batch of at least 2 (BatchNorm1d).
    On a 1x1 map :math:`\sigma = 10^{-6}` (the unbiased variance is undefined there).

    Args:
        channels: :math:`C`.
        mean_gate: a separate gate :math:`f` for the mean (official ``is_two``). Default: False.
        eps: added to the variance inside the square root. Default: 1e-12 (official code).

    Shape:
        - Input: :math:`(N, C, H, W)`; Output: same shape.

    Example:
        >>> SelfNorm(16)(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    def __init__(self, channels: int, mean_gate: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps
        self.g_fc = _ChannelFC(channels)
        self.g_bn = nn.BatchNorm1d(channels)
        self.f_fc = _ChannelFC(channels) if mean_gate else None
        self.f_bn = nn.BatchNorm1d(channels) if mean_gate else None

    def forward(self, x: Tensor) -> Tensor:
        return _StatsAffine.apply(x, self.eps, self.gates, *self.parameters())

    def gates(self, mean: Tensor, std: Tensor, *params: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(g, mean (f - g))``: y = x g + mean (f - g) = x_hat (g std) + f mean. ``params`` (this
        module's) are only passed so that :class:`_StatsAffine` returns their gradients."""
        stats = torch.cat([mean.flatten(2), std.flatten(2)], dim=2).to(self.g_fc.weight.dtype)  # (N, C, 2)
        g = torch.sigmoid(self.g_bn(self.g_fc(stats)))[..., None, None].to(mean.dtype)
        if self.f_fc is None:
            return g, None
        f = torch.sigmoid(self.f_bn(self.f_fc(stats)))[..., None, None].to(mean.dtype)
        return g, mean * (f - g)


class CNSN(nn.Module):
    r"""The paper's CNSN block: :class:`CrossNorm` (when active) then :class:`SelfNorm`.

    Args:
        channels: :math:`C`.
        crop, beta: of the :class:`CrossNorm`. Defaults: ``"neither"``, 1.
        mean_gate: of the :class:`SelfNorm`. Default: False.
        generator: of the :class:`CrossNorm`.

    Shape:
        - Input: :math:`(N, C, H, W)`; Output: same shape.

    Example:
        >>> CNSN(16)(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    def __init__(self, channels: int, crop: str = "neither", beta: float = 1.0, mean_gate: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.crossnorm = CrossNorm(crop, beta, generator=generator)
        self.selfnorm = SelfNorm(channels, mean_gate)

    def forward(self, x: Tensor) -> Tensor:
        cn, sn = self.crossnorm, self.selfnorm
        if not cn.applies(x):
            return sn(x)
        perm, style, content_box = cn.draw(x)
        if content_box is not None:
            return sn(cn.restyle(x, perm, style, content_box))
        # CrossNorm of the whole map is an affine map of x whose output statistics follow from
        # x's, so SelfNorm's gates need no second pass: both are one fused affine map of x.
        fused = functools.partial(self._fused, num_style=len(style))
        return _StatsAffine.apply(x, cn.eps, fused, perm, *style, *sn.parameters())

    def _fused(self, mean: Tensor, std: Tensor, perm: Tensor, *rest: Tensor, num_style: int
               ) -> tuple[Tensor, Tensor]:
        """CrossNorm ``y = x a + b`` then SelfNorm ``y g + shift`` as one map ``x (a g) + (b g + shift)``;
        ``rest`` is the style statistics then SelfNorm's parameters."""
        a, b = _cross(mean, std, perm, *rest[:num_style])
        var = (std.square() - self.crossnorm.eps).clamp_min(0)  # x's unbiased variance
        g, shift = self.selfnorm.gates(mean * a + b, (a.square() * var + self.selfnorm.eps).sqrt())
        return a * g, b * g if shift is None else b * g + shift


def _attach_per_stage(model: nn.Module, names: list[str] | None, option: str, prefix: str,
                      build: Callable[[int], nn.Module]) -> list[nn.Module]:
    """``build(channels)`` after each stage of ``names`` (``None``: all stages), registered as
    ``model.norm_layers["<prefix>_<stage>"]``; returns the built modules in stage order."""
    backbone = model.backbone
    names = list(stages(backbone)) if names is None else names
    built = []
    for name, stage in resolve_stages(backbone, names, option).items():
        module = build(stage_channels(backbone, stage))
        attach_after(model, stage, f"{prefix}_{name}", module)
        built.append(module)
    return built


class CrossNormStrategy(Plugin):
    r"""CrossNorm after chosen backbone stages (``norm=crossnorm``).

    One :class:`CrossNorm` per stage (``model.norm_layers["crossnorm_<stage>"]``). Per optimizer
    step, with probability ``p``, ``active_num`` of them chosen at random are active for that
    step's forward pass; the others (and all of them otherwise) are the identity. The choice for
    step 1 is drawn in ``setup``, the next one in ``after_step``. Every draw (coin, choice,
    permutation, boxes) comes from the strategy's ``torch.Generator``, seeded with the run's
    ``seed`` and saved in checkpoints with the current choice, so runs and resumed runs are
    reproducible; data-parallel ranks share the seed, hence the choice, and permute their own batch.

    Defaults (official scripts): ``p=0.5`` and ``crop="neither"`` as the feature-space CN-only
    WRN-40-2 CIFAR runs (``cn_prob 0.5``, crop neither) and ImageNet ``run-cnsn.sh``; ``beta=1``
    everywhere; ``active_num=1`` as the segmentation config (CIFAR uses 2 with a CNSN in every
    block; tllab has one module per stage); stages: all (see the module docstring).

    Args:
        p: probability that a step activates CrossNorm. Default: 0.5.
        active_num: modules activated together. Default: 1.
        crop: ``"neither"``, ``"style"``, ``"content"`` or ``"both"``. Default: ``"neither"``.
        beta: :math:`\beta` of the crop boxes' area distribution. Default: 1.
        stages: stage names (``layer1``.. / ``block1``..); ``None``: every stage.

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = CrossNormStrategy().transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10))
        >>> list(model.norm_layers)
        ['crossnorm_block1', 'crossnorm_block2', 'crossnorm_block3']
    """

    prefix = "crossnorm"  # of the option names in messages and of the module names

    def __init__(self, p: float = 0.5, active_num: int = 1, crop: str = "neither", beta: float = 1.0,
                 stages: list[str] | None = None) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"p={p} must be in [0, 1].")
        if active_num < 1:
            raise ValueError(f"active_num={active_num} must be >= 1.")
        CrossNorm(crop, beta)  # checks the options before any data is loaded
        self.p, self.active_num, self.crop, self.beta = p, active_num, crop, beta
        self.stages = None if stages is None else list(stages)
        self.generator = torch.Generator()
        self.crossnorms: list[CrossNorm] = []  # live in model.norm_layers; a plain list keeps them out of this state

    def _build(self, channels: int) -> nn.Module:
        return CrossNorm(self.crop, self.beta, generator=self.generator)

    def transform_model(self, model: nn.Module) -> nn.Module:
        built = _attach_per_stage(model, self.stages, f"norm.{self.prefix}.stages", self.prefix, self._build)
        self.crossnorms = [m for b in built for m in b.modules() if isinstance(m, CrossNorm)]
        if self.active_num > len(self.crossnorms):
            raise ConfigError(f"norm.{self.prefix}.active_num={self.active_num} but there are only "
                              f"{len(self.crossnorms)} CrossNorm modules (stages {list(model.norm_layers)}).")
        return model

    def setup(self, ctx: SetupContext) -> None:
        self.generator.manual_seed(int(ctx.config["seed"]))
        self._activate(self._draw())

    def after_step(self, model: nn.Module) -> None:
        self._activate(self._draw())

    def _draw(self) -> list[int]:
        """Indices of the modules active for the next step: ``active_num`` of them with probability ``p``."""
        if torch.rand((), generator=self.generator).item() >= self.p:
            return []
        return sorted(torch.randperm(len(self.crossnorms), generator=self.generator)[:self.active_num].tolist())

    def _activate(self, chosen: list[int]) -> None:
        for i, cn in enumerate(self.crossnorms):
            cn.active = i in chosen

    def active_indices(self) -> list[int]:
        """Indices (in stage order) of the modules active for the current step."""
        return [i for i, cn in enumerate(self.crossnorms) if cn.active]

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "active": self.active_indices()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._activate(state["active"])


class SelfNormStrategy(Plugin):
    r"""SelfNorm after chosen backbone stages (``norm=selfnorm``).

    One :class:`SelfNorm` per stage (``model.norm_layers["selfnorm_<stage>"]``). Its parameters
    live in the model, so they train in the model's default optimizer groups and are saved,
    moved and converted (SyncBN) with it; it runs in training and evaluation. Needs a training
    batch of at least 2 (its BatchNorm1d).

    Args:
        mean_gate: a separate gate for the mean (official ``is_two``). Default: False (official).
        stages: stage names (``layer1``.. / ``block1``..); ``None``: every stage (the ImageNet
            ResNet-50 puts SelfNorm in every block of layer1-4).

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = SelfNormStrategy().transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10))
        >>> model.norm_layers.selfnorm_block2.g_fc.weight.shape
        torch.Size([64, 1, 2])
    """

    def __init__(self, mean_gate: bool = False, stages: list[str] | None = None) -> None:
        super().__init__()
        self.mean_gate = mean_gate
        self.stages = None if stages is None else list(stages)

    def transform_model(self, model: nn.Module) -> nn.Module:
        _attach_per_stage(model, self.stages, "norm.selfnorm.stages", "selfnorm",
                          lambda channels: SelfNorm(channels, self.mean_gate))
        return model


class CNSNStrategy(CrossNormStrategy):
    r"""CrossNorm then SelfNorm after chosen backbone stages: the paper's CNSN (``norm=cnsn``).

    One :class:`CNSN` per stage (``model.norm_layers["cnsn_<stage>"]``): its SelfNorm always runs,
    its CrossNorm is activated per step as in :class:`CrossNormStrategy`.

    Args:
        p, active_num, crop, beta, stages: as :class:`CrossNormStrategy`. Defaults: 0.5, 1,
            ``"neither"``, 1, every stage (ImageNet ``run-cnsn.sh``: crop neither, ``cn_prob`` 0.5;
            the CIFAR WRN CNSN runs use crop both, 0.25 and 2).
        mean_gate: as :class:`SelfNormStrategy`. Default: False.

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = CNSNStrategy().transform_model(Classifier(create_backbone("torchvision", "resnet18"), 10))
        >>> list(model.norm_layers)
        ['cnsn_layer1', 'cnsn_layer2', 'cnsn_layer3', 'cnsn_layer4']
    """

    prefix = "cnsn"

    def __init__(self, p: float = 0.5, active_num: int = 1, crop: str = "neither", beta: float = 1.0,
                 mean_gate: bool = False, stages: list[str] | None = None) -> None:
        super().__init__(p, active_num, crop, beta, stages)
        self.mean_gate = mean_gate

    def _build(self, channels: int) -> nn.Module:
        return CNSN(channels, self.crop, self.beta, self.mean_gate, self.generator)

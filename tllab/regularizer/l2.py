r"""L2 and L2-SP (Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with
Convolutional Networks", ICML 2018, arXiv 1802.01483): explicit weight penalties that replace
weight decay when fine-tuning.

.. math:: \Omega_{L2}(w) = \tfrac{\alpha}{2}\,\lVert w \rVert_2^2, \qquad
          \Omega_{L2\text{-}SP}(w) = \tfrac{\alpha}{2}\,\lVert w_S - w_S^0 \rVert_2^2
                                   + \tfrac{\beta}{2}\,\lVert w_{\bar S} \rVert_2^2

:math:`w_S` are the backbone's parameters (those the source task pretrained), :math:`w_S^0` their
values at the start of fine-tuning, :math:`w_{\bar S}` the parameters new to the target task
(bottleneck and head). As tllib's ``L2Regularization`` / ``SPRegularization``
(``tllib/regularization/delta.py``), every parameter tensor counts: weights, biases and
BatchNorm affine parameters alike (BatchNorm running statistics are buffers, not parameters).
Only trainable parameters (``requires_grad``) are summed: a frozen one adds a constant at most.

Both penalties are meant to *replace* weight decay: the recipe (tllib ``delta.py
--regularization-type l2_sp``, ``--wd 0``) sets ``optim.weight_decay=0``; a nonzero weight decay
logs a warning at start, since it pulls every weight towards 0 as well, against L2-SP's anchor.
With ``optim=sgd`` or ``adam`` (coupled decay: :math:`\lambda w` is added to the gradient), weight
decay :math:`\lambda` adds the same gradient as ``L2(weight=λ)``; AdamW's decoupled decay does not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tllab.plugin import Plugin, SetupContext, StepOutput

log = logging.getLogger("tllab")


def half_squared_norm(tensors: Iterable[Tensor], device: torch.device) -> Tensor:
    r""":math:`\tfrac12 \sum_i \lVert t_i \rVert_2^2`, a 0-d tensor (0 for no tensors) on ``device``."""
    # The float32 zero start keeps the result a tensor when every parameter is frozen; float64 promotes it.
    return 0.5 * sum((t.square().sum() for t in tensors), torch.zeros((), device=device))


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _warn_weight_decay(config: Mapping[str, Any], name: str) -> None:
    weight_decay = config.get("optim", {}).get("weight_decay", 0.0)
    if weight_decay:
        log.warning("%s replaces weight decay, but optim.weight_decay=%g also pulls every weight towards 0; the "
                    "reference recipe sets optim.weight_decay=0", name, weight_decay)


class L2(Plugin):
    r"""Penalty towards zero on every trainable parameter of the model (the "L2" baseline of
    Li et al., 2018):

    .. math:: \mathcal{L} = \mathrm{weight} \cdot \tfrac12 \sum_{w \in \theta} \lVert w \rVert_2^2

    over backbone, bottleneck and head. Logged as ``train/regularizer.l2/weights`` (weighted).

    Args:
        weight: :math:`\alpha`. Default 0.01: tllib's ``--trade-off-head`` for the same penalty
            on the head (``delta.py``), and L2-SP's ``head_weight``, so ``regularizer=l2`` and
            ``regularizer=l2sp`` differ only in the backbone's anchor (0 vs. the pretrained
            weights), the comparison of Li et al. (2018), who choose :math:`\alpha` by validation.

    Shape:
        - Output of :meth:`loss`: ``{"weights": 0-d tensor}``, float32 (float64 for a float64 model).

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
        >>> with torch.no_grad():
        ...     _ = [p.fill_(0.5) for p in model.parameters()]
        >>> n = sum(p.numel() for p in model.parameters())
        >>> out = StepOutput(0, 1, model, *[torch.zeros(1)] * 5)
        >>> L2(weight=1.0).loss(out)["weights"].item() == 0.5 * 0.25 * n  # n weights of 0.5
        True

        From the command line: ``tllab-train experiment=digits_finetune regularizer=l2
        optim.weight_decay=0`` (the full recipe is in ``configs/regularizer/l2.yaml``).
    """

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__()
        self.weight = weight

    def setup(self, ctx: SetupContext) -> None:
        _warn_weight_decay(ctx.config, "regularizer.l2")

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        params = (p for _, p in _trainable(out.model))
        return {"weights": self.weight * half_squared_norm(params, out.logits_s.device)}


class L2SP(Plugin):
    r"""L2-SP (Li et al., ICML 2018): the backbone is pulled towards its starting point
    :math:`w^0` (the pretrained weights), bottleneck and head towards zero:

    .. math:: \mathcal{L}_{backbone} = \mathrm{backbone\_weight} \cdot \tfrac12
                  \sum_{w \in \mathrm{backbone}} \lVert w - w^0 \rVert_2^2, \qquad
              \mathcal{L}_{head} = \mathrm{head\_weight} \cdot \tfrac12
                  \sum_{w \in \mathrm{bottleneck} \cup \mathrm{head}} \lVert w \rVert_2^2

    logged (weighted) as ``train/regularizer.l2sp/backbone`` and ``.../head``. Their gradients
    are ``backbone_weight·(w − w0)`` on backbone parameters only and ``head_weight·w`` on
    bottleneck and head parameters only. As tllib's ``delta.py --regularization-type l2_sp``,
    but without running a frozen source model every step (L2-SP needs only its weights).

    **Starting point.** ``setup`` (before a checkpoint is restored) snapshots every backbone
    parameter into the buffers ``w0.<parameter name>``: saved once, in the checkpoint's plug-in
    state (the model's weights are the *current* ones), and restored on resume, so a resumed run
    keeps its original anchor even if the ``backbone.pretrained`` file has changed since. The cost
    is one copy of the backbone's parameters per checkpoint (no BatchNorm statistics).
    Parameters that ``norm`` strategies add to the backbone (BIN's gates) are anchored at their
    initial values. Without ``backbone.pretrained`` the anchor is the random initialization
    (a warning says so).

    Recipe: ``optim.weight_decay=0`` (weight decay is what these terms replace; otherwise a
    warning); the other overrides of tllib's protocol are in ``configs/regularizer/l2sp.yaml``.

    Args:
        backbone_weight: :math:`\alpha`, weight of the backbone's pull towards :math:`w^0`.
            Default 0.01 (tllib ``--trade-off-backbone``; Li et al. choose :math:`\alpha, \beta` by
            cross-validation).
        head_weight: :math:`\beta`, weight of the L2 penalty on bottleneck and head. Default 0.01
            (tllib ``--trade-off-head``).

    Shape:
        - Output of :meth:`loss`: ``{"backbone": 0-d tensor, "head": 0-d tensor}``.

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> from tllab.plugin import SetupContext
        >>> model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
        >>> l2sp = L2SP()
        >>> l2sp.setup(SetupContext(model, None, torch.device("cpu"), None, {}))  # snapshot w0
        >>> out = StepOutput(0, 1, model, *[torch.zeros(1)] * 5)
        >>> l2sp.loss(out)["backbone"].item()  # still at the starting point
        0.0
        >>> with torch.no_grad():
        ...     model.backbone.features[1].bias += 1.0  # first BatchNorm: 32 biases moved by 1
        >>> round(l2sp.loss(out)["backbone"].item(), 6)  # 0.01 * 0.5 * 32
        0.16

        From the command line: ``tllab-train experiment=digits_finetune
        backbone.pretrained=<run>/checkpoints/last.pt regularizer=l2sp optim.weight_decay=0``.
    """

    def __init__(self, backbone_weight: float = 0.01, head_weight: float = 0.01) -> None:
        super().__init__()
        self.backbone_weight, self.head_weight = backbone_weight, head_weight
        # Filled in setup with one buffer per backbone parameter, mirroring its names
        # (``w0.features.0.weight`` for ``backbone.features.0.weight``), so the checkpoint's keys read like the model's.
        self.w0 = nn.Module()

    def setup(self, ctx: SetupContext) -> None:
        _warn_weight_decay(ctx.config, "regularizer.l2sp")
        if not ctx.config.get("backbone", {}).get("pretrained", True):
            log.warning("regularizer.l2sp pulls the backbone towards its random initialization: "
                        "backbone.pretrained is not set")
        for name, p in ctx.model.backbone.named_parameters():
            *path, leaf = name.split(".")
            node = self.w0
            for part in path:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]
            node.register_buffer(leaf, p.detach().clone())

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        model, device = out.model, out.logits_s.device
        w0 = dict(self.w0.named_buffers())
        backbone = half_squared_norm((p - w0[name] for name, p in _trainable(model.backbone)), device)
        head = half_squared_norm((p for m in (model.bottleneck, model.head) for _, p in _trainable(m)), device)
        return {"backbone": self.backbone_weight * backbone, "head": self.head_weight * head}

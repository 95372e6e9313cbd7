"""Co-Tuning (You et al., "Co-Tuning for Transfer Learning", NeurIPS 2020), as in tllib's
``regularization/co_tuning.py`` and ``examples/task_adaptation/image_classification/co_tuning.py``."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from tllab.checkpoint import load_checkpoint, save_atomic
from tllab.data.loaders import eval_loader
from tllab.distributed import broadcast_object, is_main
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, SetupContext, StepOutput
from tllab.regularizer.source import FeatureTap, load_source_head

log = logging.getLogger("tllab")

CACHE_FILE = "co_tuning_relationship.pt"


@torch.no_grad()
def source_probabilities(source_model: nn.Module, dataset: Dataset, device: torch.device, dtype: torch.dtype,
                         batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``softmax(source_model(x))`` and the label of every image of ``dataset``, in order, on CPU.

    ``source_model`` runs as given (the caller puts it in eval mode); the images are those the
    dataset serves, unaugmented (tllib uses its deterministic validation transform here).

    Shape:
        Returns :math:`(N, S)` float64 probabilities and :math:`(N,)` labels.
    """
    probs, labels = [], []
    for x, y, _ in eval_loader(dataset, batch_size):
        probs.append(F.softmax(source_model(x.to(device, dtype)).double(), dim=1).cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def relationship_from_probabilities(probs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    r"""The category relationship :math:`p(y_s \mid y_t)` by the paper's direct approach.

    .. math:: R_{t,s} = \frac{1}{|\{i: y_i = t\}|} \sum_{i: y_i = t} p_s(x_i)

    A target class without training images gets the uniform row :math:`1/S` (tllib divides by
    zero and gets NaN); no training label selects it, so it only keeps the matrix row-stochastic.

    Args:
        probs: source-class probabilities of each target training image, :math:`(N, S)`.
        labels: their target labels in ``[0, num_classes)``, :math:`(N,)`.
        num_classes: number of target classes :math:`C`.

    Returns:
        the row-stochastic :math:`(C, S)` matrix, in ``probs``' dtype.

    Example:
        >>> p = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]])
        >>> relationship_from_probabilities(p, torch.tensor([0, 0, 1]), 3)
        tensor([[0.6000, 0.4000],
                [0.1000, 0.9000],
                [0.5000, 0.5000]])
    """
    sums = probs.new_zeros(num_classes, probs.shape[1]).index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).to(probs.dtype)
    rel = sums / counts.clamp(min=1)[:, None]
    rel[counts == 0] = 1.0 / probs.shape[1]
    return rel


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    r"""tllib's ``CoTuningLoss``: :math:`\frac{1}{N}\sum_i -\sum_s q_{i,s} \log \mathrm{softmax}(z_i)_s`.

    Shape:
        - logits, target: :math:`(N, S)`. Output: scalar (float32 for half inputs).

    Example:
        >>> round(soft_cross_entropy(torch.zeros(1, 4), torch.tensor([[0.5, 0.5, 0.0, 0.0]])).item(), 4)  # ln 4
        1.3863
    """
    return -(target * F.log_softmax(upcast_half(logits), dim=1)).sum(1).mean()


class CoTuning(Plugin):
    r"""Co-Tuning: also train the pretrained *source head* on the target data, with soft source
    labels translated from the target labels by the category relationship.

    .. math:: \mathcal{L} = \mathrm{CE}(y_t, \hat y_t) + \lambda\, \frac{1}{N}\sum_i
              -\sum_s p(s \mid y_{t,i}) \log \mathrm{softmax}(h_s(g(x_i)))_s

    :math:`g` is the backbone being fine-tuned and :math:`h_s` the source head
    (:func:`tllab.regularizer.source.load_source_head`), trained at ``source_lr_mult`` times the
    learning rate (tllib: 0.1x under ``--finetune``). The relationship
    :math:`p(y_s \mid y_t)` (:func:`relationship_from_probabilities`) is computed once in
    ``setup``, before training, by the pretrained model in eval mode over the labelled target
    training set (unaugmented); rank 0 computes it, caches it as
    ``<run dir>/co_tuning_relationship.pt`` (a resumed run reads it back) and shares it with
    :func:`tllab.distributed.broadcast_object`. The loss term is logged as ``co_tuning``.

    The trainable source head is a sub-module of this plug-in, not of the model: it is saved once
    in the checkpoint (under ``plugins``), restored on resume, and the model keeps the keys of a
    plain classifier (``tllab-analyze`` rebuilds it without running ``setup``). Its logits use the
    backbone features of the trainer's own forward pass (a hook; ``out.f_s`` is after the target
    bottleneck).

    Args:
        weight: trade-off :math:`\lambda` (tllib ``--trade-off``). Default: 2.3.
        source_lr_mult: the source head's learning rate relative to ``optim.lr``. Default: 0.1.

    Shape:
        - ``relationship``: :math:`(C, S)` (target x source classes), rows sum to 1.

    Example:
        ``tllab-train experiment=digits_finetune backbone.pretrained=<run>/checkpoints/last.pt regularizer=co_tuning``
    """

    reads_pooled_features = True  # its source head takes the backbone's pooled features

    def __init__(self, weight: float = 2.3, source_lr_mult: float = 0.1) -> None:
        super().__init__()
        if source_lr_mult < 0:
            raise ValueError(f"source_lr_mult={source_lr_mult} must be >= 0")
        self.weight, self.source_lr_mult = weight, source_lr_mult
        self.relationship: Tensor | None = None  # a plain attribute: recomputed or read from the cache, not saved
        self.tap: FeatureTap | None = None

    def setup(self, ctx: SetupContext) -> None:
        dtype = next(ctx.model.parameters()).dtype
        head, classes = load_source_head(ctx.config["backbone"], "regularizer=co_tuning", dtype)
        head = head.to(ctx.device)
        num_classes = int(ctx.config["dataset"]["num_classes"])
        rel = self._relationship(ctx, head, (num_classes, len(classes))) if is_main() else None
        self.relationship = broadcast_object(rel).to(ctx.device, dtype)
        self.source_head = head.train()
        if self.tap is not None:
            self.tap.remove()
        self.tap = FeatureTap(ctx.model.backbone)

    def _relationship(self, ctx: SetupContext, head: nn.Module, shape: tuple[int, int]) -> Tensor:
        """Rank 0: the cached relationship if it fits ``shape``, else computed and cached."""
        path = ctx.run_dir / CACHE_FILE
        if path.is_file():
            rel = load_checkpoint(path, f"Delete {path} to recompute it.")["relationship"]
            if tuple(rel.shape) == shape:
                return rel
        backbone = ctx.model.backbone
        was_training = backbone.training
        try:  # the pretrained model, with running BatchNorm statistics, as tllib's model.eval()
            probs, labels = source_probabilities(nn.Sequential(backbone, head).eval(), ctx.data.train, ctx.device,
                                                 next(head.parameters()).dtype, _eval_batch_size(ctx.config))
        finally:
            backbone.train(was_training)
        rel = relationship_from_probabilities(probs, labels, shape[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"relationship": rel}, path)
        log.info("co-tuning: relationship p(y_s|y_t) of shape %s from %d images, cached in %s",
                 tuple(rel.shape), len(labels), path)
        return rel

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.source_head.parameters()), "lr": self.source_lr_mult * base_lr,
                 "name": "source_head"}]

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        assert self.tap is not None and self.relationship is not None, "setup() was not called"
        logits = self.source_head(self.tap.take(len(out.x_s)))
        return {"co_tuning": self.weight * soft_cross_entropy(logits, self.relationship[out.y_s])}


def _eval_batch_size(config: Any) -> int:
    return int(config.get("trainer", {}).get("eval_batch_size", 256))

"""LwF: Learning without Forgetting (Li & Hoiem, TPAMI 2017), as in tllib's
``regularization/lwf.py`` and ``examples/task_adaptation/image_classification/lwf.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, SetupContext, StepOutput
from tllab.regularizer.source import FeatureTap, frozen_copy, load_source_head


def knowledge_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    r"""Batch-mean KL divergence of the softened student from the softened teacher.

    .. math:: \frac{1}{N}\sum_i \mathrm{KL}\big(\mathrm{softmax}(t_i/T)\,\big\|\,\mathrm{softmax}(s_i/T)\big)

    As tllib's ``KnowledgeDistillationLoss`` (``reduction="batchmean"``): no :math:`T^2` factor.

    Shape:
        - student, teacher: :math:`(N, S)` logits. Output: scalar (float32 for half inputs).

    Example:
        >>> import math
        >>> t = torch.tensor([[3 * math.log(3), 0.0]])  # softmax(t / 3) = (3/4, 1/4)
        >>> round(knowledge_distillation(torch.zeros(1, 2), t, 3.0).item(), 6)  # 3/4 ln 3/2 + 1/4 ln 1/2
        0.130812
    """
    log_p = F.log_softmax(upcast_half(student) / temperature, dim=1)
    q = F.softmax(upcast_half(teacher) / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


class LwF(Plugin):
    r"""Learning without Forgetting: keep the fine-tuned backbone's *source-task* predictions
    close to those of the pretrained model.

    .. math:: \mathcal{L} = \mathrm{CE}(y_t, \hat y_t) + \lambda\,
              \mathrm{KL}\big(\mathrm{softmax}(h_s(g_0(x))/T)\,\big\|\,\mathrm{softmax}(h_s(g(x))/T)\big)

    :math:`g` is the backbone being fine-tuned, :math:`g_0` its frozen pretrained copy and
    :math:`h_s` the source head (:func:`tllab.regularizer.source.load_source_head`: the
    checkpoint's bottleneck + head, or the ImageNet classifier). As in tllib the source head is
    not optimized (tllib leaves it out of ``get_parameters``), so it is frozen too; gradients
    reach the backbone through it. The loss term is logged as ``distill``.

    Design choices:

    - **No** :math:`T^2` **factor** (tllib's ``KnowledgeDistillationLoss``; Hinton et al. scale
      by :math:`T^2`): ``weight=4, temperature=3`` are tllib's defaults and were tuned without
      it; with it the same regularization strength is ``weight=4/9``.
    - **Teacher logits on the fly.** tllib computes them once before training over the
      training set and stores them per image; tllab's trainer gives a plug-in no sample indices,
      so the frozen teacher runs on each batch under ``no_grad`` instead. tllab's training
      batches are not augmented, so this equals precomputed logits (up to floating point) and
      needs no cache; it costs one extra backbone forward per step. Under data parallelism the
      teacher is identical on every rank: it is copied from ``ctx.model`` after the trainer
      broadcast rank 0's weights, and the source head is read from the same file.
    - The teacher and the source head live in a plain list: not in ``state_dict`` (checkpoints
      hold the fine-tuned model once and no teacher; ``setup`` rebuilds it from
      ``backbone.pretrained`` on resume), untouched by ``model.train()`` (always eval mode).
    - The student's source logits use the trainer's own forward pass: a hook records the
      backbone's output (``out.f_s`` is after the target bottleneck).

    Args:
        weight: trade-off :math:`\lambda` (tllib ``--trade-off``). Default: 4.0.
        temperature: softmax temperature :math:`T` (tllib ``-T``). Default: 3.0.

    Shape:
        - ``loss`` uses ``out.x_s`` :math:`(N, 3, H, W)` and the backbone's :math:`(N, D)` features.

    Example:
        ``tllab-train experiment=digits_finetune backbone.pretrained=<run>/checkpoints/last.pt regularizer=lwf``
    """

    reads_pooled_features = True  # its source head takes the backbone's pooled features

    def __init__(self, weight: float = 4.0, temperature: float = 3.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.weight, self.temperature = weight, temperature
        self.frozen: list[nn.Module] = []  # [teacher, source head]: kept out of state_dict
        self.tap: FeatureTap | None = None

    @property
    def teacher(self) -> nn.Module:
        return self.frozen[0]

    @property
    def source_head(self) -> nn.Module:
        return self.frozen[1]

    def setup(self, ctx: SetupContext) -> None:
        head, _ = load_source_head(ctx.config["backbone"], "regularizer=lwf", next(ctx.model.parameters()).dtype)
        head = head.to(ctx.device).eval().requires_grad_(False)
        # ctx.model still holds the pretrained weights (setup runs before a checkpoint is restored).
        teacher = nn.Sequential(frozen_copy(ctx.model.backbone), head)
        self.frozen = [teacher, head]
        if self.tap is not None:
            self.tap.remove()
        self.tap = FeatureTap(ctx.model.backbone)

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        assert self.tap is not None, "setup() was not called"
        student = self.source_head(self.tap.take(len(out.x_s)))
        with torch.no_grad():
            teacher = self.teacher(out.x_s)
        return {"distill": self.weight * knowledge_distillation(student, teacher, self.temperature)}

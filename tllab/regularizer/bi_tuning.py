r"""Bi-Tuning (Zhong et al., "Bi-tuning of Pre-trained Representations", arXiv 2011.06182, 2020).

Fine-tuning with two contrastive heads on top of the classifier, each against per-class queues of
keys produced by a momentum copy of the model (MoCo-style). Semantics follow tllib
(``tllib/regularization/bi_tuning.py`` and ``examples/task_adaptation/image_classification/bi_tuning.py``)
with these differences:

- **Views.** tllab has no train-time augmentation pipeline, so the plug-in makes the query and key
  views itself from the labelled batch: two independent :func:`random_resized_crop` draws (plus
  an optional horizontal flip) from its own seeded generator. tllib's cross-entropy is computed on
  the query view; here it stays the trainer's, on the unaugmented batch, and the query features
  come from one extra forward of the model on the query view inside :meth:`BiTuning.loss`.
- **Vectorised.** tllib loops over the batch (and the enqueue writes one sample at a time); here
  logits and enqueue are batched tensor ops with the same results (:func:`enqueue_per_class`).
- **Data parallelism.** Every rank enqueues the keys of all ranks (rank-major order), so the queues
  stay identical on all ranks.
- **Projector init.** tllib's ``--pretrained-fc`` (loading a MoCo fc into the projector) silently
  loads nothing (key mismatch under ``strict=False``) and is never used in its scripts; the
  projector is always freshly initialised here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tllab.distributed import all_gather_cat, broadcast_tensors
from tllab.errors import ConfigError
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, SetupContext, StepOutput

__all__ = ["BiTuning", "classifier_contrastive_logits", "contrastive_logits", "contrastive_targets",
           "enqueue_per_class", "random_resized_crop"]


def random_resized_crop(x: Tensor, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                        flip: bool = False, generator: torch.Generator | None = None) -> Tensor:
    r"""A random crop of each image, resized back to the input size (bilinear), optionally flipped.

    Per image: area fraction :math:`s \sim U(\text{scale})`, aspect ratio :math:`r` log-uniform in
    ``ratio``; the crop is :math:`w = \min(1, \sqrt{s r})`, :math:`h = \min(1, \sqrt{s / r})` of the
    image's width and height (torchvision's ``RandomResizedCrop`` redraws instead of clamping), at
    a uniform position inside the image; with ``flip`` it is mirrored with probability 0.5. One
    batched ``grid_sample``; the random draws come from ``generator`` on the CPU.

    Args:
        x: images :math:`(N, C, H, W)` (normalised floats).
        scale: range of the crop's area fraction. Default: (0.2, 1.0) (tllib's train transform).
        ratio: range of the crop's aspect ratio w/h. Default: (3/4, 4/3) (torchvision).
        flip: random horizontal flip (off for digits, where a mirrored image changes meaning).
        generator: source of the random draws; ``None``: torch's global generator.

    Shape:
        - Input: :math:`(N, C, H, W)`; Output: same shape, dtype and device.

    Example:
        >>> x = torch.randn(4, 3, 32, 32)
        >>> random_resized_crop(x, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 32, 32])
        >>> torch.allclose(random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x, atol=1e-5)
        True
    """
    n = x.shape[0]
    u = torch.rand(n, 5, dtype=torch.float64, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * log_r.exp()).sqrt().clamp(max=1)
    h = (area / log_r.exp()).sqrt().clamp(max=1)
    # affine_grid maps output coords in [-1, 1] to input coords: a crop of half-size (w, h) centred at (cx, cy)
    cx, cy = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
    sign = torch.where((u[:, 4] < 0.5) & flip, -1.0, 1.0).to(w)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    xf = upcast_half(x)
    grid = F.affine_grid(theta.to(xf.device, xf.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


def _positives_first(scores: Tensor, labels: Tensor) -> Tensor:
    """``(N, C, K)`` scores against every class's queue -> ``(N, C*K)``: the sample's own class
    first, then the other classes in increasing order (each queue in slot order), as tllib."""
    n, c, k = scores.shape
    others = torch.arange(c - 1, device=labels.device).expand(n, -1)
    order = torch.cat([labels[:, None], others + (others >= labels[:, None]).long()], 1)  # (N, C)
    return scores.gather(1, order[:, :, None].expand(-1, -1, k)).reshape(n, c * k)


def contrastive_logits(q: Tensor, k: Tensor, queue: Tensor, labels: Tensor, T: float) -> Tensor:
    r"""Log-probabilities of the projector contrast: the key, the own-class queue, the others.

    .. math::
        \ell_i = \mathrm{log\,softmax}\big([\,q_i\cdot k_i,\ q_i\cdot Q_{:,y_i,:},\
                 q_i\cdot Q_{:,c\neq y_i,:}\,] / T\big)

    Args:
        q: normalised query projections :math:`(N, D)` (differentiable).
        k: normalised key projections :math:`(N, D)`.
        queue: per-class key queue :math:`(D, C, K)`.
        labels: classes :math:`(N,)`.
        T: temperature.

    Shape:
        - Output: :math:`(N, 1 + C K)`; columns ``0..K`` are the positives.
    """
    d, c, kk = queue.shape
    cur = (q * k).sum(1, keepdim=True)
    queued = _positives_first((q @ queue.reshape(d, c * kk)).view(-1, c, kk), labels)
    return F.log_softmax(torch.cat([cur, queued], 1) / T, dim=1)


def classifier_contrastive_logits(hn_q: Tensor, prototypes: Tensor, queue: Tensor, labels: Tensor,
                                  T: float) -> Tensor:
    r"""Log-probabilities of the classifier contrast: each sample's class prototype scored against
    the sample and against every queued feature.

    With :math:`w_c = \mathrm{normalize}([W_c, b_c])` (the head's row and bias, no gradient, as
    tllib's ``.data``) and :math:`\hat h = \mathrm{normalize}([h, 1])`:

    .. math::
        \ell_i = \mathrm{log\,softmax}\big([\,\hat h_i\cdot w_{y_i},\ Q_{:,y_i,:}\cdot w_{y_i},\
                 Q_{:,c\neq y_i,:}\cdot w_{y_i}\,] / T\big)

    Args:
        hn_q: normalised query features with a constant 1 appended :math:`(N, F+1)`.
        prototypes: normalised :math:`[W, b]` :math:`(C, F+1)`.
        queue: per-class feature queue :math:`(F+1, C, K)`.
        labels: classes :math:`(N,)`.
        T: temperature.

    Shape:
        - Output: :math:`(N, 1 + C K)`; columns ``0..K`` are the positives.
    """
    f, c, k = queue.shape
    w = prototypes[labels]
    cur = (hn_q * w).sum(1, keepdim=True)
    queued = _positives_first((w @ queue.reshape(f, c * k)).view(-1, c, k), labels)
    return F.log_softmax(torch.cat([cur, queued], 1) / T, dim=1)


def contrastive_targets(n: int, num_classes: int, K: int, device: torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Tensor:
    """tllib's ``labels_c``: :math:`1/(K+1)` on the ``K+1`` positive columns, 0 elsewhere;
    :math:`(n, 1 + C K)`."""
    t = torch.zeros(n, 1 + num_classes * K, device=device, dtype=dtype)
    t[:, : K + 1] = 1 / (K + 1)
    return t


@torch.no_grad()
def enqueue_per_class(queues: Sequence[Tensor], ptr: Tensor, keys: Sequence[Tensor], labels: Tensor) -> None:
    r"""First-in-first-out per class, in place: sample :math:`i`, the :math:`j`-th of class
    :math:`c` in batch order, is written to slot :math:`(\mathrm{ptr}_c + j) \bmod K` of
    ``queue[:, c]``; then :math:`\mathrm{ptr}_c \mathrel{+}= n_c \pmod K`.

    Equal to tllib's sample-by-sample enqueue in batch order (earlier samples of a class are older):
    when a class has more than K samples in the batch, only its last K survive, so the earlier
    ones are skipped rather than overwritten (a scatter with repeated indices has no defined winner).
    Under data parallelism pass the keys of all ranks concatenated in rank order.

    Args:
        queues: tensors :math:`(D_j, C, K)`, updated in place.
        ptr: per-class next slot :math:`(C,)` (long), updated in place.
        keys: one :math:`(N, D_j)` tensor per queue.
        labels: classes :math:`(N,)`.

    Example:
        >>> q, ptr = torch.zeros(1, 2, 3), torch.zeros(2, dtype=torch.long)
        >>> enqueue_per_class([q], ptr, [torch.arange(1.0, 6.0)[:, None]], torch.tensor([0, 1, 0, 0, 0]))
        >>> q[0].tolist(), ptr.tolist()
        ([[5.0, 3.0, 4.0], [2.0, 0.0, 0.0]], [1, 1])
    """
    num_classes, K = queues[0].shape[1:]
    onehot = F.one_hot(labels, num_classes)
    rank_in_class = (onehot.cumsum(0) * onehot).sum(1) - 1
    count = onehot.sum(0)
    keep = rank_in_class >= count[labels] - K
    cls, slot = labels[keep], (ptr[labels] + rank_in_class)[keep] % K
    for queue, key in zip(queues, keys):
        queue[:, cls, slot] = key[keep].T.to(queue.dtype)
    ptr.copy_((ptr + count) % K)


def _normalize_with_one(h: Tensor) -> Tensor:
    """:math:`\\mathrm{normalize}([h, 1])`, the feature paired with the head's bias."""
    return F.normalize(torch.cat([h, h.new_ones(h.shape[0], 1)], 1), dim=1)


class BiTuning(Plugin):
    r"""Bi-Tuning regularizer (``regularizer=bi_tuning``): contrastive and classifier-contrastive
    losses against per-class queues of momentum-encoded keys.

    Each step, from the labelled batch :math:`x` with labels :math:`y`, two views
    :math:`x_q, x_k` (:func:`random_resized_crop`); the model gives :math:`h_q` on :math:`x_q`
    (an extra forward with gradient), the key encoder (a momentum copy of model and projector)
    gives :math:`h_k` on :math:`x_k` (no gradient); :math:`z = \mathrm{normalize}(P h)` with the
    projector :math:`P`. With the uniform target :math:`t` (:func:`contrastive_targets`):

    .. math::
        L = \mathrm{CE} + \lambda\,\big(\mathrm{KL}(t \,\|\, \ell^z) + \mathrm{KL}(t \,\|\, \ell^y)\big)

    (KL averaged over the batch, ``batchmean``): :math:`\ell^z` = :func:`contrastive_logits`
    against ``queue_z`` before this batch's keys are enqueued, :math:`\ell^y` =
    :func:`classifier_contrastive_logits` against ``queue_h`` after they are — the order of
    tllib, whose classifier contrast reads the queue after its enqueue loop. Keys
    :math:`(\hat h_k, z_k)` of all ranks are enqueued per class (:func:`enqueue_per_class`). After
    every optimizer step :math:`\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q` (parameters
    only; the key encoder's BatchNorm statistics follow its own train-mode forwards, as in tllib).

    The trainer's cross-entropy stays on the unaugmented batch; the query forward adds about one
    forward and backward per step and the key forward one more forward (roughly 2.3x the compute
    of plain fine-tuning), and the model's BatchNorm statistics see both the batch and the query
    view. The key encoder, queues, pointers and the augmentation generator are saved in the
    plug-in's state (resumable); the key encoder is a second copy of model and projector, so
    checkpoints are about twice the model's size.

    Args:
        weight: :math:`\lambda`, applied to both terms. Default: 1.0 (tllib ``--trade-off``).
        K: queue length per class. Default: 40.
        m: key-encoder momentum. Default: 0.999.
        T: temperature of both contrasts. Default: 0.07.
        projection_dim: projector output width (one ``Linear``, no MLP). Default: 128.
        projector_lr_mult: projector learning rate as a multiple of ``optim.lr``. Default: 0.1
            (tllib with ``--finetune``).
        head_init_std: re-initialise the head to :math:`W \sim N(0, \text{std}^2)`, :math:`b = 0`
            (tllib's Bi-Tuning classifier); ``None`` keeps the model's init. Default: 0.01.
        crop_scale: area range of the views' random crops. Default: (0.2, 1.0) (tllib).
        crop_ratio: aspect-ratio range of the crops. Default: (0.75, 4/3) (torchvision).
        flip: random horizontal flip of the views. Default: False (digits; tllib's ImageNet-style
            recipe flips: set true for natural images).

    Shape:
        Both loss terms are scalars; the logits are :math:`(N, 1 + C K)`; ``queue_h``
        :math:`(F+1, C, K)`, ``queue_z`` :math:`(\text{projection\_dim}, C, K)`, ``queue_ptr`` :math:`(C,)`.

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> reg = BiTuning(K=4)
        >>> model = reg.transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10))
        >>> # the trainer then calls reg.setup(ctx), reg.loss(out) every step, reg.after_step(model)
    """

    def __init__(self, weight: float = 1.0, K: int = 40, m: float = 0.999, T: float = 0.07,
                 projection_dim: int = 128, projector_lr_mult: float = 0.1, head_init_std: float | None = 0.01,
                 crop_scale: tuple[float, float] = (0.2, 1.0), crop_ratio: tuple[float, float] = (0.75, 4 / 3),
                 flip: bool = False) -> None:
        super().__init__()
        if K < 1 or projection_dim < 1:
            raise ValueError(f"K={K} and projection_dim={projection_dim} must be >= 1.")
        if not 0 <= m <= 1:
            raise ValueError(f"m={m} must be in [0, 1].")
        if T <= 0:
            raise ValueError(f"T={T} must be > 0.")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={list(crop_scale)} must be [lo, hi] with 0 < lo <= hi <= 1.")
        if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio={list(crop_ratio)} must be [lo, hi] with 0 < lo <= hi.")
        self.weight, self.K, self.m, self.T = weight, K, m, T
        self.projection_dim, self.projector_lr_mult = projection_dim, projector_lr_mult
        self.head_init_std = head_init_std
        self.crop_scale, self.crop_ratio, self.flip = tuple(crop_scale), tuple(crop_ratio), flip
        self.generator = torch.Generator()

    def transform_model(self, model: nn.Module) -> nn.Module:
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear) or head.bias is None:
            raise ConfigError("regularizer.bi_tuning needs the model's head to be an nn.Linear with a bias "
                              f"(its class prototypes [W, b]); got {type(head).__name__}.")
        if self.head_init_std is not None:
            nn.init.normal_(head.weight, 0, self.head_init_std)
            nn.init.zeros_(head.bias)
        return model

    def setup(self, ctx: SetupContext) -> None:
        model = ctx.model
        head: nn.Linear = model.head
        like = {"device": head.weight.device, "dtype": head.weight.dtype}
        num_classes, features_dim = head.out_features, head.in_features
        self.projector = nn.Linear(features_dim, self.projection_dim).to(**like)
        # The key encoder lives in this plug-in's state so a resumed run continues its momentum average.
        self.key_model = copy.deepcopy(model)
        self.key_projector = copy.deepcopy(self.projector)
        for p in [*self.key_model.parameters(), *self.key_projector.parameters()]:
            p.requires_grad_(False)
        for name, dim in (("queue_h", features_dim + 1), ("queue_z", self.projection_dim)):
            self.register_buffer(name, F.normalize(torch.randn(dim, num_classes, self.K, **like), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(num_classes, dtype=torch.long, device=like["device"]))
        broadcast_tensors(t for t in self.state_dict().values() if isinstance(t, Tensor))  # identical on all ranks
        self.generator.manual_seed(int(ctx.config["seed"]))

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.projector.parameters()), "lr": self.projector_lr_mult * base_lr,
                 "name": "projector"}]

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        model, y = out.model, out.y_s
        x_q, x_k = (random_resized_crop(out.x_s, self.crop_scale, self.crop_ratio, self.flip, self.generator)
                    for _ in range(2))
        _, h_q = model(x_q)
        z_q = F.normalize(upcast_half(self.projector(h_q)), dim=1)
        with torch.no_grad():
            self.key_model.train(model.training)
            _, h_k = self.key_model(x_k)
            z_k = F.normalize(upcast_half(self.key_projector(h_k)), dim=1)
        # A copy: the enqueue below writes the buffer in place, which the backward of q @ queue reads.
        logits_z = contrastive_logits(z_q, z_k, upcast_half(self.queue_z).clone(), y, self.T)
        self.enqueue(_normalize_with_one(upcast_half(h_k)), z_k, y)
        head = model.head
        prototypes = F.normalize(upcast_half(torch.cat([head.weight, head.bias[:, None]], 1).detach()), dim=1)
        hn_q = _normalize_with_one(upcast_half(h_q))
        logits_y = classifier_contrastive_logits(hn_q, prototypes, upcast_half(self.queue_h), y, self.T)
        target = contrastive_targets(len(y), self.queue_ptr.shape[0], self.K, y.device, logits_z.dtype)
        return {"contrastive": self.weight * F.kl_div(logits_z, target, reduction="batchmean"),
                "classifier_contrastive": self.weight * F.kl_div(logits_y, target, reduction="batchmean")}

    @torch.no_grad()
    def enqueue(self, hn_k: Tensor, z_k: Tensor, labels: Tensor) -> None:
        """Enqueue the keys :math:`(N, F+1)`, :math:`(N, D)` of every rank (gathered in rank order,
        in one collective), so all ranks' queues stay identical."""
        dtype = torch.promote_types(torch.promote_types(hn_k.dtype, z_k.dtype), torch.float32)  # exact labels
        keys = all_gather_cat(torch.cat([hn_k.to(dtype), z_k.to(dtype), labels[:, None].to(dtype)], 1))
        f = hn_k.shape[1]
        enqueue_per_class([self.queue_h, self.queue_z], self.queue_ptr, [keys[:, :f], keys[:, f:-1]],
                          keys[:, -1].long())

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        keys = [*self.key_model.parameters(), *self.key_projector.parameters()]
        queries = [*model.parameters(), *self.projector.parameters()]
        torch._foreach_mul_(keys, self.m)
        torch._foreach_add_(keys, queries, alpha=1 - self.m)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

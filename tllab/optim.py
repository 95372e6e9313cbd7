"""Optimizers and learning-rate schedules (with warmup), built from the ``optim`` config."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from tllab.schema import OptimConfig, SchedulerConfig


def build_optimizer(cfg: OptimConfig, param_groups: list[dict[str, Any]]) -> Optimizer:
    """SGD (momentum, optional nesterov), Adam or AdamW over ``param_groups``.

    Each group carries its own ``lr`` (backbone multiplier, plug-in groups); ``weight_decay``
    applies to groups that do not set their own.
    """
    # the schema's enums are str subclasses, so they compare equal to plain strings
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(cfg: SchedulerConfig, step: int, total_steps: int) -> float:
    r"""Multiplier of every group's initial lr at optimizer step ``step``.

    Linear warmup from ``warmup_start_factor`` to 1 over ``warmup_steps``, then with
    :math:`t` = steps after warmup and :math:`T` = steps after warmup in the run:

    - ``none``: 1
    - ``step``: :math:`\gamma^{\#\{m \in milestones : m \le step\}}`
    - ``cosine``: :math:`\eta + (1 - \eta) \frac{1}{2}(1 + \cos(\pi t / T))`, :math:`\eta` = ``min_lr_factor``
    - ``inv`` (tllib): :math:`(1 + \gamma_{inv}\, step)^{-p}`
    """
    if step < cfg.warmup_steps:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / cfg.warmup_steps
    name = cfg.name
    if name == "step":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if name == "cosine":
        t, span = step - cfg.warmup_steps, max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))
    if name == "inv":
        return (1 + cfg.inv_gamma * step) ** (-cfg.inv_power)
    return 1.0


def build_scheduler(cfg: SchedulerConfig, optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """A per-step ``LambdaLR`` applying :func:`lr_factor`; its state is checkpointed."""
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps))

"""How a run is named in records, reports and dashboards.

Every record of ``results.jsonl`` carries :func:`group_keys`, so tables and W&B dashboards can
group runs by any axis without reading configs. ``method`` is the row of a paper table and
``task`` its column; both come from the config alone (a failed run is placed in its cell too).
"""

from __future__ import annotations

from typing import Any

from tllab.schema import Setting, TrainConfig


def method_name(cfg: TrainConfig) -> str:
    """The row label: ``cfg.label`` if set, else the stacked methods joined by ``+`` in the order
    norm, regularizer, align (``ibn_a+mixstyle+l2sp``, ``adabn+cdan``); a run without methods is
    ``source only`` (domain adaptation),
    ``erm`` (domain generalization), ``fine-tune`` or ``scratch`` (fine-tuning with or without
    ``backbone.pretrained``; ``scratch+bss`` when a method trains from scratch)."""
    if cfg.label:
        return cfg.label
    methods = [*cfg.norm, *cfg.regularizer, *cfg.align]
    setting = Setting(cfg.dataset.setting)
    if setting == Setting.finetune and not cfg.backbone.pretrained:
        return "+".join(["scratch", *methods])
    if methods:
        return "+".join(methods)
    return {Setting.da: "source only", Setting.dg: "erm", Setting.finetune: "fine-tune"}[setting]


def task_name(cfg: TrainConfig) -> str:
    """The column label: ``mnist→mnistm`` or ``A→W`` (domain adaptation), the held-out target ``S``
    (domain generalization), ``mnistm 5/class`` or ``CUB 15%`` (fine-tuning subsets). Domains are
    named by their keys (``amazon`` is ``A``; a list file by its stem)."""
    ds = cfg.dataset
    source, target = "+".join(map(ds.domain_key, ds.source)), "+".join(map(ds.domain_key, ds.target))
    setting = Setting(ds.setting)
    if setting == Setting.da:
        return f"{source}→{target}"
    if setting == Setting.finetune and ds.labels_per_class is not None:
        return f"{target} {ds.labels_per_class}/class"
    if setting == Setting.finetune and ds.sample_rate is not None:
        return f"{target} {ds.sample_rate:g}%"
    return target


def group_keys(cfg: TrainConfig) -> dict[str, Any]:
    """The config keys that group runs in tables and dashboards (copied into every record)."""
    return {
        "experiment": cfg.experiment,
        "method": method_name(cfg),
        "task": task_name(cfg),
        "backbone": cfg.backbone.name,
        "norm": "+".join(cfg.norm) or "none",
        "regularizer": "+".join(cfg.regularizer) or "none",
        "align": "+".join(cfg.align) or "none",
        "dataset": cfg.dataset.name,
        "setting": Setting(cfg.dataset.setting).value,
        "source": "+".join(map(cfg.dataset.domain_key, cfg.dataset.source)),
        "target": "+".join(map(cfg.dataset.domain_key, cfg.dataset.target)),
        "seed": cfg.seed,
    }

"""The plug-in interface shared by normalization strategies and fine-tuning regularizers.

A method is one :class:`Plugin` subclass in one file (``tllab/norm/<name>.py`` or
``tllab/regularizer/<name>.py``) plus one YAML (``configs/norm/<name>.yaml``)::

    # @package norm.mystrategy
    _target_: tllab.norm.mystrategy.MyStrategy
    weight: 0.1

The trainer calls the hooks below in this order and knows nothing else about a method:

1. ``transform_model(model)`` — once, before the model moves to the device. Replace or wrap
   layers (IBN, StochNorm, MixStyle insertion...). Return the (possibly new) model.
2. ``setup(ctx)`` — once, after the model is on the device, before the optimizer exists and
   before a checkpoint is restored (so ``ctx.model`` still holds the pretrained weights).
   Snapshot the source model, run a preparation pass over ``ctx.data`` (e.g. Co-Tuning's
   relationship, DELTA's channel attention) and cache results in ``ctx.run_dir``.
3. ``param_groups(model, base_lr)`` — optimizer parameter groups for the plug-in's own trainable
   parameters (extra heads) and for model parameters it wants treated differently (BIN's gates:
   own lr, no weight decay). A parameter named here is removed from the model's default groups.
   Default: all trainable parameters of the plug-in at ``base_lr``.
4. ``loss(out)`` — every training step: named extra loss terms from the step's source and
   target inputs, features and logits (:class:`StepOutput`). The trainer adds them to the
   cross-entropy and logs each under ``train/<plugin>/<term>``.
5. ``after_step(model)`` — after every optimizer step (clamping gates, momentum encoders).
6. ``eval_model(model, ctx)`` — before every evaluation: return the model to evaluate (AdaBN
   returns a copy with target-adapted BatchNorm statistics; the trained weights stay untouched).

A plug-in is an ``nn.Module``: its parameters and buffers are moved with the model and saved in
checkpoints with ``state_dict``. Keep frozen snapshots (a source model) out of the state dict by
storing them in a plain attribute list, so checkpoints never hold them twice.
Set ``uses_target = True`` when ``loss`` needs unlabelled target batches (domain adaptation):
the trainer then draws them and forwards source and target together.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import get_class
from torch import Tensor, nn

from tllab.errors import ConfigError

if TYPE_CHECKING:
    from tllab.data import DataModule
    from tllab.models.classifier import Classifier


@dataclass
class StepOutput:
    """What one training step computed; the input of :meth:`Plugin.loss`.

    ``*_s`` are labelled (source) tensors, ``*_t`` unlabelled target tensors (``None`` unless a
    plug-in sets ``uses_target``). ``d_s`` holds each source sample's domain index.
    """

    step: int
    model: nn.Module
    x_s: Tensor
    y_s: Tensor
    d_s: Tensor
    logits_s: Tensor
    f_s: Tensor
    x_t: Tensor | None = None
    logits_t: Tensor | None = None
    f_t: Tensor | None = None


@dataclass
class SetupContext:
    """What a plug-in may use in ``setup`` and ``eval_model``."""

    model: nn.Module
    data: DataModule
    device: torch.device
    run_dir: Path
    config: Mapping[str, Any]


class Plugin(nn.Module):
    """Base class of normalization strategies and fine-tuning regularizers (see module doc)."""

    uses_target: bool = False

    def transform_model(self, model: Classifier) -> Classifier:
        return model

    def setup(self, ctx: SetupContext) -> None:
        pass

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": base_lr}] if params else []

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        return {}

    def after_step(self, model: nn.Module) -> None:
        pass

    def eval_model(self, model: nn.Module, ctx: SetupContext) -> nn.Module:
        return model


def build_plugins(group: str, node: Mapping[str, Any]) -> dict[str, Plugin]:
    """Instantiate the plug-ins selected in one stackable group, in selection order.

    Each entry's keys are checked against the class's constructor, so a misspelt option fails
    here (before any data is loaded) with the list of valid options.

    Args:
        group: ``"norm"`` or ``"regularizer"`` (used in messages).
        node: the composed group, ``{name: {"_target_": "pkg.Class", **kwargs}}``.

    Returns:
        ``{name: plugin}`` in the order of ``node``.
    """
    plugins: dict[str, Plugin] = {}
    for name, spec in node.items():
        spec = dict(spec)
        target = spec.pop("_target_", None)
        if target is None:
            raise ConfigError(f"{group}.{name} has no _target_; set it to a tllab.plugin.Plugin subclass.")
        try:
            cls = get_class(target)
        except Exception as e:  # hydra wraps ImportError/AttributeError
            raise ConfigError(f"{group}.{name}: cannot import {target!r} ({e}).") from e
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise ConfigError(f"{group}.{name}: {target} is not a tllab.plugin.Plugin subclass.")
        params = inspect.signature(cls.__init__).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        valid = [k for k in params if k != "self" and params[k].kind is not params[k].VAR_POSITIONAL]
        unknown = [k for k in spec if k not in valid]
        if unknown and not accepts_any:
            raise ConfigError(f"{group}.{name}: unknown option(s) {unknown}; valid options: {valid}.")
        try:
            plugins[name] = cls(**spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{group}.{name}: {e}") from e
    return plugins

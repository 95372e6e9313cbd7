"""The plug-in interface shared by normalization strategies, fine-tuning regularizers and
domain-alignment methods.

A method is one :class:`Plugin` subclass in one file (``tllab/norm/<name>.py``,
``tllab/regularizer/<name>.py`` or ``tllab/align/<name>.py``) plus one YAML (``configs/norm/<name>.yaml``)::

    # @package norm.mystrategy
    _target_: tllab.norm.mystrategy.MyStrategy
    weight: 0.1

The trainer calls the hooks below in this order and knows nothing else about a method; within
each hook the plug-ins run group by group (``norm``, then ``regularizer``, then ``align``), each
group in its selection order:

1. ``transform_model(model)`` — once, before the model moves to the device. Replace or wrap
   layers (IBN, StochNorm, MixStyle insertion...). Return the (possibly new) model. Plug-ins
   with ``exclusive = "head"`` transform first, so the others see the final features and head.
2. ``setup(ctx)`` — once, after the model is on the device, before the optimizer exists and
   before a checkpoint is restored (so ``ctx.model`` still holds the pretrained weights).
   Snapshot the source model, run a preparation pass over ``ctx.data`` (e.g. Co-Tuning's
   relationship, DELTA's channel attention) and cache results in ``ctx.run_dir``.
3. ``param_groups(model, base_lr)`` — optimizer parameter groups for the plug-in's own trainable
   parameters (extra heads) and for model parameters it wants treated differently (BIN's gates:
   own lr, no weight decay). A parameter named here is removed from the model's default groups.
   Default: all trainable parameters of the plug-in at ``base_lr``.
4. ``forward_step(model, x_s, x_t)`` — optional, at most one plug-in per run: replaces the
   trainer's forward pass (by default one pass over ``cat([x_s, x_t])``), e.g. for
   domain-specific BatchNorm that must see source and target separately. Returns
   ``(logits_s, f_s, logits_t, f_t)``.
5. ``loss(out)`` — every training step: named extra loss terms from the step's source and
   target inputs, features and logits (:class:`StepOutput`; ``out.progress`` in [0, 1] for
   ramped weights). The trainer adds them to the cross-entropy and logs each under
   ``train/<group>.<name>/<term>``.
6. ``extra_updates(out, forward, update)`` — optional, after the step's optimizer update: more
   updates on the same batch, for methods whose parts minimise different losses (MCD's heads,
   then its features). ``forward(out)`` runs the trainer's forward pass again on ``out``'s
   inputs and returns a new :class:`StepOutput`; ``update(loss, params)`` takes one optimizer
   step that moves only ``params`` (gradients averaged over ranks, clipping, AMP and the
   non-finite check as in the main step). Returns named terms to log.
7. ``after_step(model)`` — after every iteration's updates (clamping gates, momentum encoders).
8. ``eval_model(model, ctx, split)`` — before evaluating each split (``source_val``,
   ``target_test``...): return the model to evaluate it with (AdaBN returns, for target splits,
   a copy with target-adapted BatchNorm statistics, computed once per evaluation; the trained
   weights stay untouched).

A plug-in is an ``nn.Module``: its parameters and buffers are moved with the model and saved in
checkpoints with ``state_dict``. Keep frozen snapshots (a source model) out of the state dict by
storing them in a plain attribute list, so checkpoints never hold them twice.
Set ``uses_target = True`` when ``loss`` needs unlabelled target batches (domain adaptation):
the trainer then draws them and forwards source and target together. Set ``exclusive`` to a
role (``"batchnorm"``, ``"head"``) that at most one plug-in of a run may take: stacking two
BatchNorm replacements fails naming both.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
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
    plug-in sets ``uses_target``). ``d_s`` holds each source sample's domain index. ``step``
    counts optimizer steps before this one, out of ``total_steps``.
    """

    step: int
    total_steps: int
    model: nn.Module
    x_s: Tensor
    y_s: Tensor
    d_s: Tensor
    logits_s: Tensor
    f_s: Tensor
    x_t: Tensor | None = None
    logits_t: Tensor | None = None
    f_t: Tensor | None = None

    @property
    def progress(self) -> float:
        """Training progress in [0, 1] (for loss-weight ramps such as DANN's)."""
        return self.step / max(1, self.total_steps)


Forward = Callable[[StepOutput], StepOutput]
Update = Callable[[Tensor, Sequence[nn.Parameter]], None]


@dataclass
class SetupContext:
    """What a plug-in may use in ``setup`` and ``eval_model``."""

    model: nn.Module
    data: DataModule
    device: torch.device
    run_dir: Path
    config: Mapping[str, Any]


class Plugin(nn.Module):
    """Base class of normalization strategies, regularizers and alignment methods (see module doc)."""

    uses_target: bool = False
    # A role only one plug-in of a run may take, e.g. "batchnorm" (replaces every BatchNorm) or
    # "head" (replaces the classifier head); two plug-ins with the same role are refused.
    exclusive: str | None = None
    # Reads the backbone's pooled features through a hook on ``model.backbone`` (a source head on
    # them): refused with ``backbone.head=encoding``, which reads the backbone's feature map instead.
    reads_pooled_features: bool = False

    def transform_model(self, model: Classifier) -> Classifier:
        return model

    def setup(self, ctx: SetupContext) -> None:
        pass

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": base_lr}] if params else []

    def forward_step(self, model: nn.Module, x_s: Tensor, x_t: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        raise NotImplementedError  # only plug-ins that replace the forward pass override this

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        return {}

    def extra_updates(self, out: StepOutput, forward: Forward, update: Update) -> dict[str, Tensor]:
        return {}

    def after_step(self, model: nn.Module) -> None:
        pass

    def eval_model(self, model: nn.Module, ctx: SetupContext, split: str) -> nn.Module:
        return model


def overrides_forward(plugin: Plugin) -> bool:
    return type(plugin).forward_step is not Plugin.forward_step


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a config value fits a constructor annotation (scalars, Optional, unions, lists)."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        return isinstance(value, (list, tuple))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def build_plugins(group: str, node: Mapping[str, Any]) -> dict[str, Plugin]:
    """Instantiate the plug-ins selected in one stackable group, in selection order.

    Each entry's keys and value types are checked against the class's constructor, so a
    misspelt option or a wrong type fails here (before any data is loaded) with a readable
    message.

    Args:
        group: ``"norm"``, ``"regularizer"`` or ``"align"`` (used in messages).
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
        hints = typing.get_type_hints(cls.__init__)
        for key, value in spec.items():
            if key in hints and not _matches(value, hints[key]):
                raise ConfigError(f"{group}.{name}.{key}={value!r} has the wrong type: expected "
                                  f"{getattr(hints[key], '__name__', hints[key])}.")
        try:
            plugins[name] = cls(**spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{group}.{name}: {e}") from e
    return plugins

"""Small plug-ins used to test the trainer's plug-in interface."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from tllab.plugin import Plugin, SetupContext, StepOutput


class Recorder(Plugin):
    """Records which hooks ran, adds ``weight * mean(f_t^2)`` (needs target data), owns one
    trainable scalar and keeps it clamped to [0, 1] after every step; with ``freeze_head_bias``
    it claims the model's head bias into its own group with lr 0."""

    uses_target = True

    def __init__(self, weight: float = 0.1, tag: str = "r", freeze_head_bias: bool = False) -> None:
        super().__init__()
        self.weight, self.tag, self.freeze_head_bias = weight, tag, freeze_head_bias
        self.gate = nn.Parameter(torch.tensor(2.0))
        self.calls: list[str] = []
        self.target_labels_seen: list[int] = []

    def transform_model(self, model):
        self.calls.append("transform_model")
        model.recorder_tags = [*getattr(model, "recorder_tags", []), self.tag]
        return model

    def setup(self, ctx: SetupContext) -> None:
        self.calls.append(f"setup:{len(ctx.data.train)}")
        self.head_bias_at_setup = ctx.model.head.bias.detach().clone()

    def param_groups(self, model, base_lr):
        groups = [{"params": [self.gate], "lr": base_lr}]
        if self.freeze_head_bias:
            groups.append({"params": [model.head.bias], "lr": 0.0, "weight_decay": 0.0, "name": "frozen"})
        return groups

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        self.calls.append("loss")
        assert out.f_t is not None and out.f_t.shape[0] == out.x_t.shape[0]
        return {"feat": self.weight * out.f_t.pow(2).mean() + 0 * self.gate}

    def after_step(self, model) -> None:
        with torch.no_grad():
            self.gate.clamp_(0, 1)

    def eval_model(self, model, ctx, split):
        self.calls.append("eval_model")
        return copy.deepcopy(model)


class NanAt(Plugin):
    """Returns a NaN loss term at optimizer step ``at_step`` (1-based)."""

    def __init__(self, at_step: int = 3) -> None:
        super().__init__()
        self.at_step = at_step

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        value = float("nan") if out.step + 1 == self.at_step else 0.0
        return {"bad": out.logits_s.new_tensor(value)}


class Noisy(Plugin):
    """A loss term drawn from the global torch RNG, scaled by a counter kept in a buffer: a resumed
    run only matches an uninterrupted one if RNG states and plug-in state are restored."""

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        self.calls += 1
        scale = self.weight * torch.rand(()) * (1 + self.calls % 3)
        return {"noise": scale * out.f_s.pow(2).mean()}


class SplitForward(Plugin):
    """Forwards source and target separately (as domain-specific BatchNorm would) and counts calls."""

    uses_target = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward_step(self, model, x_s, x_t):
        self.calls += 1
        logits_s, f_s = model(x_s)
        logits_t, f_t = model(x_t)
        return logits_s, f_s, logits_t, f_t


class FailOnSeed(Plugin):
    """Raises a RuntimeError in setup when the run's seed is ``seed`` (a forced sweep failure);
    otherwise adds ``weight * mean(logits_s^2)`` so it trains differently from no method."""

    def __init__(self, seed: int = 1, weight: float = 0.01) -> None:
        super().__init__()
        self.seed, self.weight = seed, weight

    def setup(self, ctx: SetupContext) -> None:
        if ctx.config["seed"] == self.seed:
            raise RuntimeError(f"forced failure for seed {self.seed}")

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        return {"logit": self.weight * out.logits_s.pow(2).mean()}


class ReplacesHead(Plugin):
    """Claims the ``head`` role, so two of them cannot be stacked."""

    exclusive = "head"

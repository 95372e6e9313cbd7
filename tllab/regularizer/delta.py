r"""DELTA: DEep Learning Transfer using feature map with Attention (Li et al., ICLR 2019).

Fine-tuning regularizer that keeps the fine-tuned backbone's intermediate feature maps close to
those of the frozen pretrained backbone on the same images, channel by channel weighted by how
much the target task relies on each pretrained channel; the new layers (bottleneck and head) get
a plain L2 penalty instead of weight decay. Semantics follow tllib
(``tllib/regularization/delta.py`` and ``examples/task_adaptation/image_classification/delta.py``)
with these differences, each documented where it happens:

- the distance is a **mean over the batch** (tllib sums over the batch, which makes its
  trade-off depend on the batch size and, under data parallelism, on the number of ranks; the
  paper writes the regularizer per sample, next to each sample's loss, which this mean matches);
  ``reduction="sum"`` gives tllib's number (tllib's 0.01 at batch 48 is ``weight=0.48`` here);
- the hooked layers default to the backbone's stage outputs (:func:`tllab.norm.placement.stages`),
  so any supported backbone works (tllib: four fixed ``conv3`` of ResNet-50/101 only);
- the channel attention zeroes a channel of the layer's *output* with a forward hook (tllib
  edits conv weights), uses an explicit softmax dimension, accepts "all batches", and instead of
  fine-tuning a whole model for 10 epochs first fits only the new bottleneck and head on frozen
  pretrained features for ``attention_steps`` steps: cheap, and the estimate then measures the
  pretrained channels the regularizer actually constrains;
- the attention is computed once on rank 0, cached in ``<run dir>/delta_attention.pt`` and
  shared with the other ranks.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tllab.checkpoint import load_checkpoint, save_atomic
from tllab.data.loaders import eval_loader
from tllab.distributed import broadcast_object, is_main
from tllab.errors import ConfigError
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, SetupContext, StepOutput
from tllab.regularizer.l2 import half_squared_norm
from tllab.regularizer.source import frozen_copy

__all__ = ["DELTA", "LayerOutputs", "estimate_channel_attention", "feature_map_distance"]

log = logging.getLogger("tllab")

ATTENTION_FILE = "delta_attention.pt"
REDUCTIONS = ("mean", "sum")


class _Record:
    """Forward hook appending the module's output to ``store``. A plain object, so
    ``copy.deepcopy(model)`` (AdaBN's evaluation copy) gives a copy recording into its own list."""

    def __init__(self, store: list[Tensor], grad_only: bool) -> None:
        self.store, self.grad_only = store, grad_only

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not self.grad_only or torch.is_grad_enabled():
            self.store.append(output)


class LayerOutputs:
    """Captures the outputs of named submodules of ``model`` through forward hooks.

    Hooks are registered at construction; use it as a context manager to remove them on exit, or
    keep it to capture every forward pass (:class:`DELTA` keeps one on the trained model). Each
    forward appends one output per layer until :meth:`take` collects and clears them.

    Args:
        model: any module.
        names: dotted submodule names relative to ``model`` (``"layer1"``, ``"layer1.2.conv3"``,
            ``"features.3"``), resolved with ``get_submodule``.
        grad_only: record only forward passes run with gradients enabled (training steps, not
            the no-grad evaluation), so evaluation maps are never held in memory.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with LayerOutputs(net, ["0", "2"]) as lo:
        ...     _ = net(torch.randn(5, 4))
        >>> {k: tuple(v.shape) for k, v in lo.take().items()}
        {'0': (5, 3), '2': (5, 2)}
    """

    def __init__(self, model: nn.Module, names: Sequence[str], grad_only: bool = False) -> None:
        self.names = list(names)
        self._stores: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self._handles: list[RemovableHandle] = []
        for name in self.names:
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise ConfigError(f"{type(model).__name__} has no submodule {name!r} ({e}).") from e
            self._handles.append(module.register_forward_hook(_Record(self._stores[name], grad_only)))

    def take(self) -> dict[str, Tensor]:
        """Each layer's outputs since the last call, concatenated along dim 0 (one forward pass:
        its output itself); clears them. Raises ``RuntimeError`` if nothing was recorded."""
        if any(not self._stores[n] for n in self.names):
            raise RuntimeError(f"no output recorded for layers {self.names}; run a forward pass first.")
        out = {n: s[0] if len(s) == 1 else torch.cat(s) for n, s in self._stores.items()}
        for store in self._stores.values():
            store.clear()
        return out

    def remove(self) -> None:
        """Remove the hooks (recorded outputs stay available to :meth:`take`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LayerOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def feature_map_distance(src: Sequence[Tensor], tgt: Sequence[Tensor], attention: Sequence[Tensor] | None = None,
                         reduction: str = "mean") -> Tensor:
    r"""DELTA's behavioural distance between source and target feature maps, summed over layers.

    Plain (tllib ``BehavioralRegularization``), per layer :math:`l`:

    .. math:: \Omega_l = \tfrac{1}{2} \textstyle\sum_b \lVert F^t_{l,b} - F^s_{l,b} \rVert_F^2

    Attention-weighted (tllib ``AttentionBehavioralRegularization``), with :math:`C, H, W` the
    layer's channels and spatial size and :math:`a_{l,c}` its channel weights (summing to 1):

    .. math:: \Omega_l = \tfrac{1}{2} \textstyle\sum_{b,c} C\, a_{l,c}\,
              \lVert F^t_{l,b,c} - F^s_{l,b,c} \rVert_2^2 / (H W)

    The factor :math:`C` is tllib's: uniform weights :math:`a_c = 1/C` give the plain distance
    divided by :math:`HW`. The result is :math:`\sum_l \Omega_l` divided by the batch size for
    ``reduction="mean"`` (default: batch-size and rank-count invariant, the paper's per-sample
    form) or not for ``"sum"`` (tllib). The source maps are detached; the sum is in the maps' dtype
    (float32 for half-precision maps).

    Args:
        src: per layer, the frozen source model's maps :math:`(B, C, *)`.
        tgt: per layer, the trained model's maps, same shapes.
        attention: per layer, channel weights :math:`(C,)`; ``None`` for the plain distance.
        reduction: ``"mean"`` or ``"sum"`` over the batch.

    Returns:
        a scalar tensor.

    Example:
        >>> s, t = [torch.zeros(2, 1, 1, 2)], [torch.ones(2, 1, 1, 2)]
        >>> feature_map_distance(s, t).item(), feature_map_distance(s, t, [torch.ones(1)]).item()
        (1.0, 0.5)
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(src) != len(tgt) or (attention is not None and len(attention) != len(src)):
        raise ValueError("src, tgt (and attention) need one entry per layer")
    per_layer = []
    for i, (s, t) in enumerate(zip(src, tgt)):
        diff = (upcast_half(t) - upcast_half(s.detach())).flatten(2)  # (B, C, H*W)
        if attention is None:
            per_layer.append(0.5 * diff.pow(2).sum())
        else:
            per_channel = diff.pow(2).mean(2)  # ||.||^2 / (H*W)
            per_layer.append(0.5 * (diff.shape[1] * attention[i].to(per_channel) * per_channel).sum())
    total = sum(per_layer)
    return total / len(tgt[0]) if reduction == "mean" else total


class _ZeroChannels:
    """Forward hook for ``k = len(channels)`` replicas of a batch of ``batch`` samples: zeroes
    ``channels[i]`` of replica ``i``. An output of the unreplicated batch is first tiled ``k``
    times, so the layers before the hooked one run once per batch instead of once per channel."""

    def __init__(self, channels: Tensor, batch: int) -> None:
        self.channels, self.batch = channels, batch

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        k = len(self.channels)
        if output.shape[0] == self.batch and k > 1:
            output = output.repeat(k, *([1] * (output.dim() - 1)))
        mask = torch.ones(k, output.shape[1], dtype=output.dtype, device=output.device)
        mask[torch.arange(k), self.channels.to(output.device)] = 0
        mask = mask.repeat_interleave(self.batch, 0)
        return output * mask.view(*mask.shape, *([1] * (output.dim() - 2)))


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out  # a Classifier returns (logits, features)


def _tiled_logits(model: nn.Module, x: Tensor, k: int) -> Tensor | None:
    """Logits of ``x`` with the hooked layer's output tiled ``k`` times, or ``None`` where the
    model cannot continue with a larger batch after the layer (a residual add across it fails)."""
    try:
        logits = _logits(model, x)
    except RuntimeError:
        return None
    return logits if logits.shape[0] == k * len(x) else None


@torch.no_grad()
def estimate_channel_attention(model: nn.Module, layers: Sequence[str], batches: Iterable[Sequence[Tensor]],
                               temperature: float = 5.0, samples_per_pass: int = 256) -> list[Tensor]:
    r"""Channel weights of each layer from the loss increase when that channel is removed.

    For layer :math:`l` and output channel :math:`c`,
    :math:`\Delta_{l,c} = \mathrm{mean}_i\,[\mathrm{CE}(x_i, y_i;\ F_{l,c} := 0) - \mathrm{CE}(x_i, y_i)]`
    over all samples of ``batches`` (the channel is zeroed by a forward hook on the layer's output,
    in eval mode), then :math:`a_l = \mathrm{softmax}(z(\Delta_l) / T)` with :math:`z` the z-score
    over the layer's channels (population std; a layer whose channels all matter equally, or a
    single channel, gets uniform weights). Channels are evaluated ``samples_per_pass // B`` at a
    time on replicas of the batch made at the layer's output (the layers before it run once; where
    a skip connection spans the layer, the input is replicated instead), so the cost per batch is
    one forward pass plus :math:`C_l` passes through what follows each layer :math:`l`.

    Args:
        model: maps inputs to logits (or ``(logits, features)``); restored to its mode afterwards.
        layers: dotted submodule names of ``model`` whose outputs are :math:`(B, C, *)`.
        batches: ``(x, y, ...)`` batches on the model's device (the target's labelled data).
        temperature: :math:`T`. Default: 5 (tllib).
        samples_per_pass: replicated samples per forward pass (memory vs. speed).

    Returns:
        per layer, CPU weights :math:`(C_l,)` summing to 1, in the loss's dtype (float32; float64
        for a float64 model).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2, 2))
        >>> a = estimate_channel_attention(net, ["0"], [(torch.randn(4, 1, 1, 1), torch.tensor([0, 1, 0, 1]))])
        >>> a[0].shape, round(a[0].sum().item(), 4)
        (torch.Size([2]), 1.0)
    """
    was_training = model.training
    model.eval()  # BatchNorm must not mix the replicas (nor update its statistics)
    deltas: list[Tensor | None] = [None] * len(layers)
    tile = [True] * len(layers)  # whether tiling at the layer works for this model
    count = 0
    try:
        for batch in batches:
            x, y = batch[0], batch[1]
            n = len(y)
            with LayerOutputs(model, layers) as lo:
                base = F.cross_entropy(upcast_half(_logits(model, x)), y, reduction="none")
            widths = [fm.shape[1] for fm in lo.take().values()]
            k_max = max(1, samples_per_pass // n)
            for li, (name, width) in enumerate(zip(layers, widths)):
                delta = torch.zeros(width, dtype=torch.float64)
                for start in range(0, width, k_max):
                    channels = torch.arange(start, min(start + k_max, width))
                    k = len(channels)
                    handle = model.get_submodule(name).register_forward_hook(_ZeroChannels(channels, n))
                    try:
                        logits = _tiled_logits(model, x, k) if tile[li] else None
                        if logits is None:  # a skip connection around the layer: replicate the input
                            tile[li] = False
                            logits = _logits(model, x.repeat(k, *([1] * (x.dim() - 1))))
                    finally:
                        handle.remove()
                    loss = F.cross_entropy(upcast_half(logits), y.repeat(k), reduction="none").view(k, n)
                    delta[start:start + k] = (loss - base).sum(1).double().cpu()
                deltas[li] = delta if deltas[li] is None else deltas[li] + delta
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("estimate_channel_attention got no batches")
    out = []
    for delta in deltas:
        mean_delta = delta / count
        z = (mean_delta - mean_delta.mean()) / mean_delta.std(correction=0).clamp_min(1e-12)
        out.append(torch.softmax(z / temperature, dim=0).to(base.dtype))  # float64 stays float64
    return out


def _fit_new_layers(model: nn.Module, batches: Sequence[Sequence[Tensor]], steps: int, lr: float) -> None:
    """Fit ``model``'s bottleneck and head (SGD, momentum 0.9) on the frozen backbone's features of
    ``batches``, computed once; eval mode throughout, so no BatchNorm statistics change and, with
    SyncBatchNorm, no collective runs while only rank 0 is here."""
    model.eval()
    with torch.no_grad():
        feats = [(model.backbone(b[0]), b[1]) for b in batches]
    params = [p for m in (model.bottleneck, model.head) for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for step in range(steps):
        f, y = feats[step % len(feats)]
        loss = F.cross_entropy(upcast_half(model.head(model.bottleneck(f))), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _layer_paths(backbone: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Dotted paths (relative to ``backbone``) of ``layers``: stage names (``layer1``, ``block2``)
    or submodule paths; ``None``: every stage's output."""
    from tllab.norm.placement import stages  # imported on use: it loads tllab.models

    paths = {id(m): n for n, m in backbone.named_modules()}
    if layers is None:
        return [paths[id(m)] for m in stages(backbone).values()]
    try:
        available = stages(backbone)
    except ConfigError:
        available = {}
    return [paths[id(available[n])] if n in available else n for n in layers]


class DELTA(Plugin):
    r"""DELTA regularizer for fine-tuning (Li et al., "DELTA: DEep Learning Transfer using Feature
    Map with Attention for Convolutional Networks", ICLR 2019).

    .. math::
        \mathcal{L} = \mathrm{CE} + \alpha\, \Omega_{fm}\big(F^t(x), F^s(x)\big)
                      + \beta\, \tfrac{1}{2} \textstyle\sum_{w \in \text{bottleneck, head}} \lVert w \rVert^2

    with :math:`\Omega_{fm}` = :func:`feature_map_distance` between the trained backbone's and the
    frozen pretrained backbone's outputs of ``layers`` on the labelled batch, attention-weighted
    with :func:`estimate_channel_attention` when ``attention``. Logged terms: ``feature_map``
    (:math:`\alpha\Omega_{fm}`) and ``head``. Use it with ``optim.weight_decay=0``: the head term
    replaces weight decay (tllib's recipe). Defaults are tllib's (``--trade-off-backbone 0.01
    --trade-off-head 0.01 --regularization-type attention_feature_map``, 10 attention batches of
    32), except ``reduction`` (see the module doc) and the short head fit before the estimate.

    In ``setup`` (on the pretrained weights) it keeps a frozen eval-mode copy of the backbone out
    of the state dict (checkpoints never hold it), registers permanent hooks recording the trained
    model's ``layers`` outputs during gradient-enabled forward passes (the trainer's own forward,
    so no second pass), and computes the attention once: rank 0 loads
    ``<run dir>/delta_attention.pt`` if it exists for the same layers (resume, rerun; delete it to
    re-estimate), else fits a copy's bottleneck and head on frozen features for
    ``attention_steps`` steps and estimates on the first ``attention_batches`` labelled batches;
    the other ranks receive it with :func:`tllab.distributed.broadcast_object`. In domain
    adaptation the trainer forwards ``cat([x_s, x_t])`` (or, with a plug-in's own forward, source
    first); only the first ``len(x_s)`` rows, the labelled images, are regularized.

    Args:
        weight: :math:`\alpha`. Default: 0.01.
        head_weight: :math:`\beta`. Default: 0.01.
        attention: weight channels by estimated importance; ``False``: plain distance.
        layers: stage names (``layer1``..``layer4``, ``block1``..``block3``) or dotted paths in
            the backbone (tllib's ResNet-50: ``[layer1.2.conv3, layer2.3.conv3, layer3.5.conv3,
            layer4.2.conv3]``); ``None``: every stage's output.
        attention_batches: labelled batches for the estimate (``None``: all). Default: 10.
        attention_batch_size: their size. Default: 32.
        attention_steps: SGD steps fitting the bottleneck and head before the estimate. Default: 100.
        attention_lr: their learning rate. Default: 0.01.
        reduction: ``"mean"`` (default) or ``"sum"`` (tllib) over the batch.

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
        >>> delta = DELTA(attention=False)
        >>> delta.setup(SetupContext(model, None, torch.device("cpu"), Path("/tmp/delta-doc"), {}))
        >>> x = torch.randn(4, 3, 32, 32)
        >>> logits, f = model(x)
        >>> out = StepOutput(0, 1, model, x, torch.zeros(4, dtype=torch.long), torch.zeros(4), logits, f)
        >>> sorted(delta.loss(out)), delta.loss_layers
        (['feature_map', 'head'], ['features.3', 'features.7', 'features.11'])
    """

    def __init__(self, weight: float = 0.01, head_weight: float = 0.01, attention: bool = True,
                 layers: list[str] | None = None, attention_batches: int | None = 10,
                 attention_batch_size: int = 32, attention_steps: int = 100, attention_lr: float = 0.01,
                 reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if layers is not None and not layers:
            raise ValueError("layers is empty; name at least one layer, or null for every stage")
        if attention_batches is not None and attention_batches < 1:
            raise ValueError(f"attention_batches must be >= 1 or null (all), got {attention_batches}")
        self.weight, self.head_weight, self.attention = weight, head_weight, attention
        self.layers, self.reduction = layers, reduction
        self.attention_batches, self.attention_batch_size = attention_batches, attention_batch_size
        self.attention_steps, self.attention_lr = attention_steps, attention_lr
        self.loss_layers: list[str] = []
        # Plain lists: nn.Module does not register their contents, so the frozen source backbone
        # and the attention stay out of state_dict and checkpoints.
        self._source: list[nn.Module] = []
        self._capture: list[LayerOutputs] = []
        self._weights: list[Tensor] = []

    def setup(self, ctx: SetupContext) -> None:
        model = ctx.model
        self.loss_layers = _layer_paths(model.backbone, self.layers)
        source = frozen_copy(model.backbone)  # without the hooks on the trained model
        self._source = [source]
        LayerOutputs(source, self.loss_layers).remove()  # fail now, on every rank, on an unknown layer
        if self.attention:
            weights = self._load_or_estimate(ctx) if is_main() else None
            self._weights = [w.to(ctx.device) for w in broadcast_object(weights)]
        self._capture = [LayerOutputs(model.backbone, self.loss_layers, grad_only=True)]

    def _load_or_estimate(self, ctx: SetupContext) -> list[Tensor]:
        path = Path(ctx.run_dir) / ATTENTION_FILE
        if path.exists():
            cached = load_checkpoint(path, fix=f"Delete {path} to estimate the attention again.")
            if cached["layers"] == self.loss_layers:
                log.info("DELTA: channel attention loaded from %s", path)
                return cached["attention"]
            log.warning("DELTA: %s is for layers %s, not %s; estimating again", path, cached["layers"],
                        self.loss_layers)
        batches = []
        dtype = next(ctx.model.parameters()).dtype
        for i, batch in enumerate(eval_loader(ctx.data.train, self.attention_batch_size)):
            if self.attention_batches is not None and i == self.attention_batches:
                break
            batches.append((batch[0].to(ctx.device, dtype), batch[1].to(ctx.device)))
        probe = copy.deepcopy(ctx.model)  # the new head is random: fit it first, on a copy
        _fit_new_layers(probe, batches, self.attention_steps, self.attention_lr)
        weights = estimate_channel_attention(probe, [f"backbone.{n}" for n in self.loss_layers], batches)
        save_atomic({"layers": self.loss_layers, "attention": weights}, path)
        log.info("DELTA: channel attention of %s estimated on %d images, saved to %s", self.loss_layers,
                 sum(len(b[1]) for b in batches), path)
        return weights

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        if not self._source:
            raise RuntimeError("DELTA.loss before DELTA.setup")
        n = len(out.x_s)
        captured = self._capture[0].take()
        tgt = [captured[name][:n] for name in self.loss_layers]  # the labelled rows come first
        with torch.no_grad(), LayerOutputs(self._source[0], self.loss_layers) as lo:
            self._source[0](out.x_s)
        source_maps = lo.take()
        src = [source_maps[name] for name in self.loss_layers]
        fm = feature_map_distance(src, tgt, self._weights if self.attention else None, self.reduction)
        new_params = [upcast_half(p) for m in (out.model.bottleneck, out.model.head) for p in m.parameters()]
        head = half_squared_norm(new_params, fm.device)
        return {"feature_map": self.weight * fm, "head": self.head_weight * head}

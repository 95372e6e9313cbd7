r"""MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021).

Mixes the per-instance channel statistics (the "style") of feature maps between the samples of
a training batch, after chosen backbone stages. Semantics follow the official code
(``KaiyangZhou/mixstyle-release`` ``reid/models/mixstyle.py`` = Dassl ``dassl/modeling/ops/mixstyle.py``)
with three deliberate differences: every random draw (the coin, :math:`\lambda`, the partner
permutation) comes from one ``torch.Generator`` so runs are reproducible; ``crossdomain`` mixing
works for any number of domains and odd batch sizes; and a 1x1 feature map (whose unbiased
variance is undefined) is passed through unchanged instead of turning into NaN.

Also home of the helpers the CrossNorm/SelfNorm layers share: :func:`instance_stats` and
:func:`sample_beta`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from tllab.errors import ConfigError
from tllab.nn.functional import upcast_half
from tllab.norm.placement import attach_after, resolve_stages, stages
from tllab.plugin import Plugin, SetupContext

__all__ = ["MixStyle", "MixStyleStrategy", "instance_stats", "sample_beta"]

MIX_MODES = ("random", "crossdomain")


class _InstanceStats(torch.autograd.Function):
    """Per-instance channel mean and std with a one-pass backward. ``torch.var_mean`` is several
    times slower than a whole BatchNorm on CPU and its autograd graph takes extra passes over
    the map; here the forward is a mean and a norm of the centred map, and the backward is the
    single fused pass :math:`dx = g_\\mu / n + g_\\sigma (x - \\mu) / ((n - 1) \\sigma)`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        dof = max(x.shape[2] * x.shape[3] - 1, 1)  # unbiased; a single position has variance 0
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (torch.linalg.vector_norm(x - mean, dim=(2, 3), keepdim=True).square() / dof + eps).sqrt()
        ctx.save_for_backward(x, mean, std)
        ctx.dof = dof
        return mean, std

    @staticmethod
    def backward(ctx: Any, g_mean: Tensor, g_std: Tensor) -> tuple[Tensor, None]:
        x, mean, std = ctx.saved_tensors
        per_x = g_std / (std * ctx.dof)
        return torch.addcmul(g_mean / (x.shape[2] * x.shape[3]) - per_x * mean, x, per_x), None


def instance_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""Per-instance channel mean and std, :math:`\sigma = \sqrt{\mathrm{Var}_{unbiased} + \epsilon}`.

    Differentiable (one fused backward pass). Half-precision inputs (AMP) are reduced in float32.
    With a single spatial position the unbiased variance is undefined; 0 is used there, so
    :math:`\sigma = \sqrt{\epsilon}`.

    Args:
        x: :math:`(N, C, H, W)` features.
        eps: added to the variance inside the square root.

    Returns:
        ``(mean, std)``, each :math:`(N, C, 1, 1)`.
    """
    return _InstanceStats.apply(upcast_half(x), eps)


def _log_gamma(shape: float, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` float64 draws of log Gamma(shape, 1): Marsaglia & Tsang (2000) for shape >= 1, boosted
    below 1 by G(a) = G(a + 1) U^(1/a) in log space (G(0.1) underflows float32 otherwise)."""
    a = shape + 1 if shape < 1 else shape
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while len(todo):  # each round accepts > 95% of the remaining draws
        z = torch.randn(len(todo), dtype=torch.float64, generator=generator)
        u = torch.rand(len(todo), dtype=torch.float64, generator=generator)
        v = (1 + c * z) ** 3
        log_v = v.clamp_min(1e-300).log()
        ok = (v > 0) & (u.log() < 0.5 * z * z + d - d * v + d * log_v)
        out[todo[ok]] = math.log(d) + log_v[ok]
        todo = todo[~ok]
    if shape < 1:
        out += (1 - torch.rand(n, dtype=torch.float64, generator=generator)).log() / shape  # U in (0, 1]
    return out


def sample_beta(alpha: float, n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""``n`` draws of :math:`\mathrm{Beta}(\alpha, \alpha)` from ``generator`` (float64, CPU).

    ``torch.distributions.Beta`` cannot take a generator, so this is the ratio of two Gamma draws,
    :math:`\lambda = G_1 / (G_1 + G_2) = \mathrm{sigmoid}(\log G_1 - \log G_2)`.

    Example:
        >>> lam = sample_beta(0.1, 100_000, torch.Generator().manual_seed(0))
        >>> round(((lam > 0.1) & (lam < 0.9)).double().mean().item(), 2)  # 18.7% for alpha=0.1
        0.19
    """
    log_g = _log_gamma(alpha, 2 * n, generator)
    return torch.sigmoid(log_g[:n] - log_g[n:])


class MixStyle(nn.Module):
    r"""Mixes instance-level feature statistics between the samples of a training batch.

    With probability ``p`` per call (one coin for the whole batch), in training mode:

    .. math::
        \mu, \sigma = \mathrm{sg}\big(\mathrm{mean}_{HW}(x), \sqrt{\mathrm{Var}_{HW}(x) + \epsilon}\big),\quad
        \lambda_b \sim \mathrm{Beta}(\alpha, \alpha),\\
        y_b = \frac{x_b - \mu_b}{\sigma_b}\,\big(\lambda_b\sigma_b + (1-\lambda_b)\sigma_{\pi(b)}\big)
              + \lambda_b\mu_b + (1-\lambda_b)\mu_{\pi(b)}

    with unbiased variance and ``sg`` = stop-gradient (the statistics are detached so the network
    cannot undo the augmentation; :math:`\partial y / \partial x = \sigma_{mix} / \sigma`).
    The partner permutation :math:`\pi` is

    - ``random``: a random permutation of the batch (a sample may be its own partner);
    - ``crossdomain``: the batch is ``num_domains`` equal contiguous domain chunks, domain-major
      (what ``dataset.sampler=domain_balanced`` draws); chunk :math:`d` takes its partners from chunk
      :math:`(d + s) \bmod D`, :math:`s` uniform in :math:`1..D-1`, in a random order, so a sample is
      never mixed with its own domain. With 2 domains this is the official two-halves swap.

    Identity (the input itself) in eval mode, when the coin says no, and for 1x1 feature maps.

    Args:
        p: probability of mixing, per call. Default: 0.5.
        alpha: :math:`\alpha` of the Beta distribution of :math:`\lambda`. Default: 0.1.
        eps: added to the variance inside the square root. Default: 1e-6.
        mix: ``"random"`` or ``"crossdomain"``. Default: ``"random"``.
        num_domains: domain chunks of a ``crossdomain`` batch; ``None`` means 2 (the official layout).
        generator: source of every random draw (coin, :math:`\lambda`, :math:`\pi`); ``None``: torch's
            global generator.

    Shape:
        - Input: :math:`(N, C, H, W)`; Output: same shape, dtype and device.

    Example:
        >>> ms = MixStyle(p=1.0, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(8, 16, 4, 4)
        >>> ms(x).shape, torch.equal(ms.eval()(x), x)
        (torch.Size([8, 16, 4, 4]), True)
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6, mix: str = "random",
                 num_domains: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"MixStyle p={p} must be in [0, 1].")
        if alpha <= 0:
            raise ValueError(f"MixStyle alpha={alpha} must be > 0.")
        if eps <= 0:
            raise ValueError(f"MixStyle eps={eps} must be > 0.")
        if mix not in MIX_MODES:
            raise ValueError(f"MixStyle mix={mix!r}; use one of {list(MIX_MODES)}.")
        if num_domains is not None and num_domains < 2:
            raise ValueError(f"MixStyle num_domains={num_domains}: cross-domain mixing needs >= 2 domains.")
        self.p, self.alpha, self.eps, self.mix = p, alpha, eps, mix
        self.num_domains = num_domains
        self.generator = generator

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}, eps={self.eps}, mix={self.mix}"

    def partners(self, batch: int) -> Tensor:
        """The partner permutation :math:`\\pi` for a batch of ``batch`` samples (CPU, int64)."""
        g = self.generator
        if self.mix == "random":
            return torch.randperm(batch, generator=g)
        d = self.num_domains or 2
        if batch % d:
            raise ValueError(f"MixStyle(mix='crossdomain') needs a batch of {d} equal domain chunks, got "
                             f"{batch} samples; train with dataset.sampler=domain_balanced and a "
                             f"trainer.batch_size that is a multiple of {d}.")
        k = batch // d
        shift = int(torch.randint(1, d, (), generator=g))
        source_chunk = (torch.arange(d) + shift) % d
        order = torch.rand(d, k, generator=g).argsort(dim=1)  # a random order within each chunk
        return (source_chunk[:, None] * k + order).reshape(-1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[2] * x.shape[3] < 2:
            return x
        if torch.rand((), generator=self.generator).item() >= self.p:
            return x
        batch = x.shape[0]
        mu, sig = instance_stats(x.detach(), self.eps)
        lam = sample_beta(self.alpha, batch, self.generator).to(mu).view(batch, 1, 1, 1)
        perm = self.partners(batch).to(x.device)
        sig_mix = lam * sig + (1 - lam) * sig[perm]
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        scale = sig_mix / sig
        # (x - mu) / sig * sig_mix + mu_mix, as one fused pass over x
        return torch.addcmul((mu_mix - mu * scale).to(x.dtype), x, scale.to(x.dtype))


class MixStyleStrategy(Plugin):
    r"""MixStyle after chosen backbone stages (``norm=mixstyle``).

    One :class:`MixStyle` per stage, run on the stage's output by
    :func:`tllab.norm.placement.attach_after` (``model.norm_layers["mixstyle_<stage>"]``); each flips
    its own coin per forward, as Dassl's one shared instance applied after several stages does.
    All of them draw from the strategy's ``torch.Generator``, seeded with the run's ``seed`` in
    ``setup`` and saved in checkpoints, so runs (and resumed runs) are reproducible.

    Placement: by default every stage but the last, never next to the classifier (the authors'
    advice): ResNets (torchvision and timm) ``layer1``–``layer3`` as Dassl's ``resnet18_ms_l123``
    used on PACS; the digits CNN ``block1``–``block2``.

    ``mix="crossdomain"`` needs domain-major batches of equal domain chunks: it requires
    ``dataset.setting=dg`` (in domain adaptation the forward batch may be ``[source | target]``
    with unequal parts) and ``dataset.sampler=domain_balanced``, and mixes across
    ``len(train_domains)`` chunks. Under data parallelism the balanced sampler gives every rank's
    batch this layout, so mixing within the local batch is correct on every rank; ranks share the
    seed (the same coins and :math:`\lambda`\ s) but mix their own samples.

    Args:
        p: probability of mixing, per stage and forward. Default: 0.5 (paper).
        alpha: Beta(:math:`\alpha`, :math:`\alpha`) parameter of :math:`\lambda`. Default: 0.1 (paper).
        eps: added to the variance inside the square root. Default: 1e-6 (official code).
        mix: ``"random"`` or ``"crossdomain"`` (mixing with another domain). Default: ``"random"``.
        stages: stage names (``layer1``.. / ``block1``..); ``None``: every stage but the last.

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = MixStyleStrategy().transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10))
        >>> list(model.norm_layers)
        ['mixstyle_block1', 'mixstyle_block2']
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6, mix: str = "random",
                 stages: list[str] | None = None) -> None:
        super().__init__()
        MixStyle(p, alpha, eps, mix)  # checks the options before any data is loaded
        self.p, self.alpha, self.eps, self.mix = p, alpha, eps, mix
        self.stages = None if stages is None else list(stages)
        self.generator = torch.Generator()
        self.layers: list[MixStyle] = []  # live in model.norm_layers; a plain list keeps them out of this state

    def transform_model(self, model: nn.Module) -> nn.Module:
        backbone = model.backbone
        names = list(stages(backbone))[:-1] if self.stages is None else self.stages
        for name, stage in resolve_stages(backbone, names, "norm.mixstyle.stages").items():
            layer = MixStyle(self.p, self.alpha, self.eps, self.mix, generator=self.generator)
            attach_after(model, stage, f"mixstyle_{name}", layer)
            self.layers.append(layer)
        return model

    def setup(self, ctx: SetupContext) -> None:
        self.generator.manual_seed(int(ctx.config["seed"]))
        if self.mix != "crossdomain":
            return
        dataset = ctx.config["dataset"]
        if dataset["setting"] != "dg" or dataset["sampler"] != "domain_balanced":
            raise ConfigError("norm.mixstyle.mix=crossdomain mixes each sample with another domain of a "
                              "domain-major batch; set dataset.setting=dg and dataset.sampler=domain_balanced "
                              f"(got setting={dataset['setting']}, sampler={dataset['sampler']}).")
        domains = len(ctx.data.train_domains)
        if domains < 2:
            raise ConfigError(f"norm.mixstyle.mix=crossdomain needs >= 2 training domains, got "
                              f"{ctx.data.train_domains}; use mix=random or more dataset.source domains.")
        for layer in self.layers:
            layer.num_domains = domains

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

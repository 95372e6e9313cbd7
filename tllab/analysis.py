"""Analysis of a trained checkpoint: t-SNE plots, the proxy A-distance and AdaBN.

The analysis tools of the Transfer-Learning-Library (tllib), for tllab runs: the model is rebuilt from the
run's ``config.yaml`` and loaded with the checkpoint's weights; its features (the classifier's
second output) are computed on the source and target test splits (``--source-split`` /
``--target-split`` pick any evaluation split of the run, e.g. ``target_test/uci``)::

    tllab-analyze tsne outputs/runs/2026-11-21/10-00-00-000000
    tllab-analyze tsne <run> --max-samples 500 --out tsne.png
    tllab-analyze a-distance <run>/checkpoints/last.pt --max-samples 500
    python -m tllab.analysis a-distance <run> --device cuda
    tllab-analyze adabn <run>                     # target accuracy before/after AdaBN

``adabn`` evaluates the checkpoint on ``--split target_test`` as it is and after AdaBN
(:func:`tllab.norm.adabn.adapt_batchnorm`: every BatchNorm re-estimated exactly on the run's
unlabelled target train split, ``--adapt-split``), with the run's ``trainer.eval_batch_size``,
so "after" equals what a ``norm=adabn`` run reports for the same weights (without AMP).

``CKPT`` is a checkpoint file inside its run dir (``<run>/checkpoints/<name>.pt``) or the run
dir itself (then ``best.pt``, else ``last.pt``). Outputs go to ``<run>/analysis/`` unless
``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from tllab.checkpoint import load_checkpoint
from tllab.data import build_data
from tllab.data.arrays import ArrayDataset
from tllab.data.loaders import eval_loader
from tllab.errors import CheckpointError, ConfigError, TllabError
from tllab.io import closed_pipe_exits_quietly
from tllab.keys import method_name, task_name
from tllab.loggers import write_json_atomic
from tllab.nn.functional import upcast_half
from tllab.norm.adabn import adapt_batchnorm, adaptation_split
from tllab.plugin import build_plugins
from tllab.schema import Precision, TrainConfig
from tllab.trainer import build_model, resolve_device

CHECKPOINT_FIX = "Pass a run dir or <run dir>/checkpoints/<name>.pt."


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint file ``path`` names: the file itself, or a run dir's ``checkpoints/best.pt``
    (the selected model), else its ``checkpoints/last.pt``."""
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise CheckpointError(f"{path} holds no checkpoints/best.pt or checkpoints/last.pt; pass the run dir of a "
                              "run trained with trainer.save_checkpoints=true, or a checkpoint file.")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. {CHECKPOINT_FIX}")
    return path


def load_config(run_dir: Path) -> TrainConfig:
    """The typed config of a run, from ``<run_dir>/config.yaml`` checked against the schema."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: a checkpoint is analysed with its run's config, so keep it at "
                          "<run dir>/checkpoints/<name>.pt next to <run dir>/config.yaml.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not a config of this tllab version ({str(e).splitlines()[0]}); restore the "
                          "run's config.yaml or analyse the run with the tllab version that trained it.") from e


def load_run(ckpt: Path, device: str = "cpu") -> tuple[TrainConfig, nn.Module]:
    """The run's config and its model holding the checkpoint's weights, in eval mode on ``device``.

    ``ckpt`` is a checkpoint file or a run dir (see :func:`resolve_checkpoint`). The model is built
    as the trainer builds it (backbone, bottleneck, head, each plug-in's ``transform_model``) but
    with ``backbone.pretrained`` unset: every weight comes from the checkpoint, so pretrained
    weights are neither needed nor read. It runs in the run's ``trainer.precision``.
    """
    path = resolve_checkpoint(Path(ckpt))
    cfg = load_config(path.parent.parent)
    cfg.backbone.pretrained = None
    plugins = [*build_plugins("norm", cfg.norm).values(), *build_plugins("regularizer", cfg.regularizer).values(),
               *build_plugins("align", cfg.align).values()]
    # In the run's dtype before loading, so a float64 run's weights are not rounded.
    model = build_model(cfg, plugins).to(getattr(torch, Precision(cfg.trainer.precision).value))
    state = load_checkpoint(path, CHECKPOINT_FIX)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not hold the weights of the model {path.parent.parent}/config.yaml "
                              f"describes ({reason}); keep each checkpoint in its own run dir.") from e
    return cfg, model.to(resolve_device(device)).eval()


@torch.no_grad()
def extract_features(model: nn.Module, dataset: ArrayDataset, device: str | torch.device, max_samples: int,
                     seed: int, batch_size: int = 256) -> Tensor:
    """Features (the model's second output) of at most ``max_samples`` images of ``dataset``:
    all of them when the split is no larger, else a random subset drawn with ``seed`` (the same
    subset every time), in index order. Returns a float32 CPU tensor :math:`(n, F)`."""
    n = len(dataset)
    if n > max_samples:
        indices = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        dataset = dataset.subset(indices)
    dtype = next(model.parameters()).dtype  # the run's trainer.precision
    # Eval mode: BatchNorm uses running statistics, so a feature does not depend on its batch.
    return torch.cat([model(x.to(device, dtype))[1].float().cpu() for x, _, _ in eval_loader(dataset, batch_size)])


def domain_classifier_error(f_s: Tensor, f_t: Tensor, epochs: int = 300, seed: int = 0) -> float:
    r"""Validation error of a linear domain classifier telling source features from target ones.

    Source rows are labelled 1 and target rows 0; each domain is split 50/50 into train and
    validation at random (``seed``). The features are standardised with the training half's
    per-dimension mean and std (the class of linear classifiers is unchanged, the optimisation
    gets well conditioned whatever the feature scale). Logistic regression starts at zero and
    takes ``epochs`` full-batch Adam steps (lr 0.01) on the cross-entropy; 300 steps reach a
    stable error on 2 x 1000 features of 2048 dimensions in under a second on one CPU thread.

    The error is balanced, the mean of the two domains' error rates
    :math:`\epsilon = \tfrac12 (\epsilon_s + \epsilon_t)`: with equal numbers of source and
    target rows it is exactly ``1 - validation accuracy``; with unequal numbers chance stays at
    0.5 instead of the smaller domain's share (the training loss weighs both domains equally too).

    Args:
        f_s, f_t: source and target features, :math:`(n_s, F)` and :math:`(n_t, F)`, at least two
            rows each.
        epochs: optimizer steps over the whole training half.
        seed: seed of the train/validation split (the only randomness).

    Returns:
        the balanced validation error in [0, 1]; 0.5 is chance.
    """
    if f_s.dim() != 2 or f_s.shape[1:] != f_t.shape[1:] or min(len(f_s), len(f_t)) < 2:
        raise ValueError(f"need two (n, F) feature sets with n >= 2, got {tuple(f_s.shape)} and {tuple(f_t.shape)}")
    g = torch.Generator().manual_seed(seed)
    halves = [torch.randperm(len(f), generator=g).tensor_split(2) for f in (f_s, f_t)]
    # Train source, train target, validation source, validation target.
    parts = [f.detach().float().cpu()[h[i]] for i in (0, 1) for f, h in zip((f_s, f_t), halves)]
    train = torch.cat(parts[:2])
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)  # a constant dimension stays 0: its weight never moves
    x_s, x_t, v_s, v_t = ((p - mean) / std for p in parts)
    w = torch.zeros(x_s.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=0.01)
    # Matrix-vector steps are too small to share among threads: thread synchronisation costs more
    # than the arithmetic, over ten times more on a machine whose cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                loss = (F.binary_cross_entropy_with_logits(x_s @ w + b, torch.ones(len(x_s)))
                        + F.binary_cross_entropy_with_logits(x_t @ w + b, torch.zeros(len(x_t)))) / 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        wrong_s, wrong_t = int((v_s @ w + b <= 0).sum()), int((v_t @ w + b > 0).sum())
    return (wrong_s / len(v_s) + wrong_t / len(v_t)) / 2


def a_distance(f_s: Tensor, f_t: Tensor, epochs: int = 300, seed: int = 0) -> float:
    r"""Proxy A-distance between two feature sets (Ben-David et al., 2007; tllib's ``a_distance``).

    .. math:: \hat{d}_\mathcal{A} = 2 (1 - 2 \epsilon)

    with :math:`\epsilon` the validation error of a linear domain classifier
    (:func:`domain_classifier_error`, same arguments). Not clamped to [0, 2], as in tllib:
    indistinguishable domains give values scattered around 0, slightly negative ones included
    (the classifier did a little worse than chance on validation), and clamping them to 0 would
    bias averages over seeds and runs upwards.

    Returns:
        :math:`\hat{d}_\mathcal{A}` in [-2, 2]: about 0 for indistinguishable domains, 2 for
        linearly separable ones.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a_distance(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 5)
        2.0
    """
    return 2 * (1 - 2 * domain_classifier_error(f_s, f_t, epochs, seed))


def tsne_embedding(features: Tensor, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding :math:`(n, 2)` of ``features`` :math:`(n, F)`, ``n >= 2``.

    sklearn's ``TSNE(init="pca", perplexity=min(30, n - 1), random_state=seed)`` on the raw
    features, as in tllib: t-SNE fits each point's kernel width to the perplexity, so the
    features' overall scale does not matter, while per-dimension standardisation would blow up
    near-constant (dead ReLU) dimensions and show a geometry the head never sees.
    """
    from sklearn.manifold import TSNE  # slow to import; only this command needs it

    tsne = TSNE(n_components=2, init="pca", perplexity=min(30, len(features) - 1), random_state=seed)
    return tsne.fit_transform(features.double().numpy())


def plot_tsne(f_s: Tensor, f_t: Tensor, out: Path, labels: tuple[str, str] = ("source", "target"),
              title: str = "", seed: int = 0) -> Path:
    """Scatter plot of the joint t-SNE embedding (:func:`tsne_embedding`) of source (red) and
    target (blue) features, saved as a PNG at ``out`` (parent folders created); returns ``out``."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone

    points = tsne_embedding(torch.cat([f_s, f_t]), seed)
    fig = Figure(figsize=(6, 6), dpi=150)
    ax = fig.subplots()
    for part, label, color in ((points[:len(f_s)], labels[0], "tab:red"), (points[len(f_s):], labels[1], "tab:blue")):
        ax.scatter(part[:, 0], part[:, 1], s=6, c=color, alpha=0.6, linewidths=0, label=f"{label}, n={len(part)}")
    ax.set_xticks([])  # t-SNE coordinates carry no meaning
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=3)
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def split_label(cfg: TrainConfig, split: str) -> str:
    """Legend name of an evaluation split: its domain(s) and the split, e.g. ``mnistm (target_test)``."""
    role, _, domain = split.partition("/")
    domains = cfg.dataset.source if role.startswith("source") else cfg.dataset.target
    return f"{domain or '+'.join(domains)} ({split})"


def domain_features(ckpt: Path, source_split: str, target_split: str, max_samples: int, seed: int,
                    device: str = "cpu") -> tuple[TrainConfig, Tensor, Tensor]:
    """Load the run of ``ckpt`` (:func:`load_run`) and return its config and the features of at
    most ``max_samples`` images of each of two evaluation splits (:func:`extract_features`)."""
    cfg, model = load_run(ckpt, device)
    splits = build_data(cfg.dataset, cfg.seed).eval_splits
    for option, split in (("--source-split", source_split), ("--target-split", target_split)):
        if split not in splits:
            raise ConfigError(f"{option} {split} is not an evaluation split of this run; use one of {list(splits)}.")
    model_device = next(model.parameters()).device
    f_s = extract_features(model, splits[source_split], model_device, max_samples, seed)
    f_t = extract_features(model, splits[target_split], model_device, max_samples, seed)
    return cfg, f_s, f_t


def _tsne_command(args: argparse.Namespace) -> None:
    ckpt = resolve_checkpoint(args.ckpt)
    cfg, f_s, f_t = domain_features(ckpt, args.source_split, args.target_split, args.max_samples, args.seed,
                                    args.device)
    out = args.out or ckpt.parent.parent / "analysis" / "tsne.png"
    title = f"{method_name(cfg)}, {task_name(cfg)} ({ckpt.name})"
    labels = (split_label(cfg, args.source_split), split_label(cfg, args.target_split))
    print(plot_tsne(f_s, f_t, out, labels, title, args.seed))


def _a_distance_command(args: argparse.Namespace) -> None:
    ckpt = resolve_checkpoint(args.ckpt)
    cfg, f_s, f_t = domain_features(ckpt, args.source_split, args.target_split, args.max_samples, args.seed,
                                    args.device)
    error = domain_classifier_error(f_s, f_t, args.epochs, args.seed)
    value = 2 * (1 - 2 * error)
    out = args.out or ckpt.parent.parent / "analysis" / "a_distance.json"
    write_json_atomic(out, {
        "a_distance": value, "error": error, "num_source": len(f_s), "num_target": len(f_t),
        "source_split": args.source_split, "target_split": args.target_split, "checkpoint": str(ckpt),
        "method": method_name(cfg), "task": task_name(cfg), "seed": args.seed, "epochs": args.epochs})
    print(f"A-distance {value:.3f} (domain classifier validation error {error:.3f}; "
          f"{len(f_s)} source, {len(f_t)} target features)")
    print(out)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ArrayDataset, batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode, as the trainer evaluates) on
    ``dataset``, in the model's device and dtype; the model's train/eval flag is restored."""
    was_training = model.training
    model.eval()
    reference = next(model.parameters())
    correct = loss = 0.0
    for x, y, _ in eval_loader(dataset, batch_size):
        logits, _ = model(x.to(reference.device, reference.dtype))
        y = y.to(reference.device)
        correct += (logits.argmax(1) == y).sum().item()
        loss += F.cross_entropy(upcast_half(logits), y, reduction="sum").item()
    model.train(was_training)
    return {"acc": correct / len(dataset), "loss": loss / len(dataset)}


def adabn_gain(ckpt: Path, split: str = "target_test", adapt_split: str = "unlabeled", batch_size: int | None = None,
               device: str = "cpu") -> dict[str, Any]:
    """Accuracy of a checkpoint on ``split`` before and after AdaBN on ``adapt_split``
    (:func:`tllab.norm.adabn.adaptation_split`: ``unlabeled`` is the run's target train split).

    ``batch_size`` defaults to the run's ``trainer.eval_batch_size`` (batch sizes change float
    rounding, so this reproduces the trainer's numbers exactly). Returns the JSON record of
    ``tllab-analyze adabn``: ``before`` and ``after`` (``acc``, ``loss``), ``gain`` (accuracy),
    the splits, their sizes and the run's method and task.
    """
    ckpt = resolve_checkpoint(ckpt)
    cfg, model = load_run(ckpt, device)
    data = build_data(cfg.dataset, cfg.seed)
    if split not in data.eval_splits:
        raise ConfigError(f"--split {split} is not an evaluation split of this run; "
                          f"use one of {list(data.eval_splits)}.")
    images = adaptation_split(data, adapt_split, option="--adapt-split ")
    batch_size = batch_size or cfg.trainer.eval_batch_size
    before = accuracy(model, data.eval_splits[split], batch_size)
    after = accuracy(adapt_batchnorm(model, eval_loader(images, batch_size)), data.eval_splits[split], batch_size)
    return {"before": before, "after": after, "gain": after["acc"] - before["acc"], "split": split,
            "adapt_split": adapt_split, "num_eval": len(data.eval_splits[split]), "num_adapt": len(images),
            "batch_size": batch_size, "checkpoint": str(ckpt), "method": method_name(cfg), "task": task_name(cfg)}


def _adabn_command(args: argparse.Namespace) -> None:
    ckpt = resolve_checkpoint(args.ckpt)
    record = adabn_gain(ckpt, args.split, args.adapt_split, args.batch_size, args.device)
    out = args.out or ckpt.parent.parent / "analysis" / "adabn.json"
    write_json_atomic(out, record)
    print(f"{args.split} accuracy {record['before']['acc']:.4f} before AdaBN, {record['after']['acc']:.4f} after "
          f"({record['gain']:+.4f}; statistics from {record['num_adapt']} images of {args.adapt_split})")
    print(out)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tllab-analyze", description="Analysis of a trained checkpoint: t-SNE plots and the proxy A-distance "
                                          "between source and target features, accuracy before/after AdaBN.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{tsne,a-distance,adabn}")
    for name, run, help_, out in (
            ("tsne", _tsne_command, "t-SNE plot of source and target features", "<run>/analysis/tsne.png"),
            ("a-distance", _a_distance_command, "proxy A-distance between source and target features",
             "<run>/analysis/a_distance.json")):
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.set_defaults(run=run)
        sub.add_argument("ckpt", type=Path, metavar="CKPT", help="run dir or <run dir>/checkpoints/<name>.pt")
        sub.add_argument("--source-split", default="source_test", help="evaluation split of the source images")
        sub.add_argument("--target-split", default="target_test", help="evaluation split of the target images")
        sub.add_argument("--max-samples", type=_at_least(2), default=1000,
                         help="images per domain: a fixed random subset of larger splits (default 1000)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the subsets, t-SNE and domain classifier")
        sub.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
        sub.add_argument("--out", type=Path, help=f"output file (default {out})")
        if name == "a-distance":
            sub.add_argument("--epochs", type=_at_least(1), default=300,
                             help="full-batch steps of the domain classifier (default 300)")
    help_ = "accuracy before and after AdaBN (BatchNorm statistics re-estimated on the target train split)"
    sub = commands.add_parser("adabn", help=help_, description=help_)
    sub.set_defaults(run=_adabn_command)
    sub.add_argument("ckpt", type=Path, metavar="CKPT", help="run dir or <run dir>/checkpoints/<name>.pt")
    sub.add_argument("--split", default="target_test", help="evaluation split to score (default target_test)")
    sub.add_argument("--adapt-split", default="unlabeled",
                     help="images to re-estimate the statistics on: unlabeled (the target train split of a domain "
                          "adaptation run, default), train, or an evaluation split")
    sub.add_argument("--batch-size", type=_at_least(1), help="default: the run's trainer.eval_batch_size")
    sub.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    sub.add_argument("--out", type=Path, help="output file (default <run>/analysis/adabn.json)")
    return parser


@closed_pipe_exits_quietly
def main(argv: list[str] | None = None) -> None:
    """Console entry point ``tllab-analyze``; an error the user can fix prints one line and exits 1."""
    args = build_parser().parse_args(argv)
    try:
        args.device = str(resolve_device(args.device, option="--device "))
        args.run(args)
    except TllabError as e:
        print(f"tllab: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

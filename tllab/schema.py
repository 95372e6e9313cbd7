"""Typed configuration schema.

Every config group except the stackable method groups (``norm``, ``regularizer``, ``align``) has a dataclass
here. ``register_configs()`` stores the top-level :class:`TrainConfig` in Hydra's ConfigStore as
``train_schema``; ``configs/train.yaml`` lists it first in its defaults, so every YAML file and
every command-line override is checked against these types while Hydra composes the config:
a misspelt key, a value of the wrong type or an unknown enum option fails before any data loads.

The method groups are mappings ``name -> {_target_: ..., **kwargs}``; their keys are checked
against the method's constructor in :func:`tllab.plugin.build_plugins`, also before data loads.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tllab.errors import ConfigError


class Choice(str, Enum):
    """A config choice; prints as its value (``tllab``, not ``Library.tllab``) in messages."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Library(Choice):
    tllab = "tllab"
    torchvision = "torchvision"
    timm = "timm"


class Setting(Choice):
    da = "da"  # labelled source(s) + unlabelled target train split
    dg = "dg"  # labelled sources; the target is never seen in training
    finetune = "finetune"  # labelled subset of the target train split


class SamplerName(Choice):
    random = "random"  # shuffled batches from the union of the training domains
    domain_balanced = "domain_balanced"  # every (per-rank) batch: the same number from each domain


class OptimName(Choice):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class SchedulerName(Choice):
    none = "none"
    step = "step"
    cosine = "cosine"
    inv = "inv"  # tllib's inverse decay: lr * (1 + gamma * step) ** -power


class Precision(Choice):
    float32 = "float32"
    float64 = "float64"  # for exact numerical comparisons (slow)


class AmpDtype(Choice):
    bfloat16 = "bfloat16"
    float16 = "float16"


class Strategy(Choice):
    single = "single"  # one process
    ddp = "ddp"  # data parallel: one process per device, gradients averaged, optional SyncBN


class HeadName(Choice):
    linear = "linear"  # global pooling (the backbone's own), optional bottleneck, linear classifier
    encoding = "encoding"  # Deep TEN: 1x1 conv, BN, ReLU, Encoding(head_dim, head_codes), L2-normalise, linear


class ForwardMode(Choice):
    joint = "joint"  # one pass over cat(source, target): BatchNorm normalises both domains together (tllib's DANN...)
    separate = "separate"  # one pass per domain: each normalised with its own batch statistics (tllib's AFN)


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class BackboneConfig:
    library: Library = Library.tllab
    name: str = "digits_cnn"
    # None (random init), "imagenet" (tllab/models/weights.py) or a file: tllab checkpoint, state dict, MoCo
    pretrained: str | None = None
    # which ImageNet weights: a torchvision weights name (default IMAGENET1K_V1, as tllib) or a timm tag
    weights: str | None = None
    # Also load the checkpoint's bottleneck and head (same classes: keep training the source model)
    load_head: bool = False
    bottleneck_dim: int | None = None
    head: HeadName = HeadName.linear
    head_dim: int = 128  # encoding head: D, channels of the codewords
    head_codes: int = 32  # encoding head: K, number of codewords
    dropout: float = 0.0  # before the head (tllib's DG --freeze-bn adds 0.1)
    freeze_bn: bool = False  # backbone BatchNorm layers stay in eval mode (tllib's DG --freeze-bn, PACS)
    kwargs: dict[str, Any] = field(default_factory=dict)


class TransformName(Choice):
    tllib = "tllib"  # train: Resize(R, R) -> RandomResizedCrop(S) -> HFlip (-> ColorJitter); eval: Resize -> CenterCrop
    resize = "resize"  # train and eval: resize to (S, S) only, as the embedded digits (no augmentation)


@dataclass
class DatasetConfig:
    name: str = "digits"
    family: str = "digits"  # how domains are read: digits | image_list | image_folder (tllab/data/)
    setting: Setting = Setting.da
    source: list[str] = field(default_factory=lambda: ["mnist"])
    target: list[str] = field(default_factory=lambda: ["mnistm"])
    num_classes: int | None = 10  # null: counted from dataset.classes or the class folders
    val_fraction: float = 0.1  # held out of each source train split for model selection
    labels_per_class: int | None = None  # finetune: labelled target images per class
    sample_rate: float | None = None  # finetune: percent of the target train split (tllib)
    sampler: SamplerName = SamplerName.random  # labelled training batches
    image_size: int = 32
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    data_seed: int = 0  # seed of the domain generation (mnistm/synth/corruptions)
    root: str | None = None  # data folder of file datasets (else $TLLAB_DATA_DIR/<name>); cache folder of digits
    # File datasets (tllab/data/image_list.py, image_folder.py); the catalog YAMLs fill these in.
    domains: Any = None  # key -> list/folder, or {train, test, val, subsets}
    aliases: dict[str, str] = field(default_factory=dict)  # full domain name -> key (amazon -> A)
    classes: Any = None  # class names by label: a list, or a file with one name per line
    counts: dict[str, int] = field(default_factory=dict)  # images per list file in the published lists
    label_offset: int = 0  # the lists' first label (tllib's PACS lists count from 1); subtracted on reading
    download: list[Any] = field(default_factory=list)  # [{folder, archive, url, md5}] for `tllab-data download`
    transform: TransformName = TransformName.resize  # file datasets: image_list.yaml sets tllib
    resize_size: int | None = None  # tllib preset: side R of the first resize; null: round(image_size * 256 / 224)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale range
    color_jitter: bool = False  # tllib preset: ColorJitter(0.5, 0.5, 0.5, 0.5) after the flip
    skip_bad_images: bool = False  # leave out images that cannot be read (counted in the log and summary)

    def __post_init__(self) -> None:
        # Untyped (Any) in the schema so that `dataset.domains={a: a.txt}` can replace it on the command line
        self.domains = dict(self.domains or {})

    def domain_key(self, name: str) -> str:
        """The canonical name of a domain: its key for a full name (``amazon`` -> ``A``), the file
        stem for a list file or folder given as a path, else the name itself."""
        if name in self.aliases:
            return self.aliases[name]
        if name not in self.domains and is_path(name):
            return Path(name).stem
        return name


def is_path(name: str) -> bool:
    """Whether a domain name is a list file or folder given by its path (not a key)."""
    return "/" in name or name.endswith(".txt")


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.none
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    milestones: list[int] = field(default_factory=list)  # step: steps at which lr *= gamma
    gamma: float = 0.1
    inv_gamma: float = 0.001
    inv_power: float = 0.75
    min_lr_factor: float = 0.0  # cosine: final lr = lr * min_lr_factor


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adam
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    backbone_lr_mult: float = 1.0  # tllib uses 0.1 when fine-tuning a pretrained backbone
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class TrainerConfig:
    strategy: Strategy = Strategy.single
    devices: int = 1  # ddp: processes started on this machine (ignored under torchrun/SLURM)
    oversubscribe: bool = False  # ddp on CPU: allow more processes than this machine has cores
    sync_bn: bool = False  # ddp: synchronize BatchNorm statistics over all ranks
    forward: ForwardMode = ForwardMode.joint  # domain adaptation: source and target in one pass or two
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (ddp: cuda uses the rank's local GPU)
    epochs: int = 3
    iters_per_epoch: int | None = None  # None: one pass over the labelled train set
    batch_size: int = 64  # per process: ddp over N processes trains on N * batch_size per step
    eval_batch_size: int = 256
    eval_every: int | None = None  # steps between evaluations; None: every epoch
    max_steps: int | None = None  # smoke mode: stop after this many optimizer steps
    precision: Precision = Precision.float32  # dtype of weights and inputs
    amp: bool = False
    amp_dtype: AmpDtype = AmpDtype.bfloat16
    channels_last: bool | None = None  # NHWC weights and inputs (faster convolutions on GPUs); null: on CUDA
    compile: bool = False  # torch.compile the backbone (first steps slower while it compiles)
    grad_clip: float | None = None  # max global gradient norm
    deterministic: bool = False
    resume: bool = False  # require a checkpoint in the run dir (resuming is automatic anyway)
    save_checkpoints: bool = True
    num_workers: int | None = None  # null: 0 for in-memory data, up to 8 per process for file datasets
    quiet: bool = False  # no progress bar (evaluation lines still go to the log)


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "tllab"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline  # the WANDB_MODE environment variable overrides it
    group: str | None = None  # default: "<dataset>/<source>-><target>"
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    experiment: str = "default"
    label: str | None = None  # row label in reports and dashboards (default: tllab.keys.method_name)
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    norm: dict[str, Any] = field(default_factory=dict)
    regularizer: dict[str, Any] = field(default_factory=dict)
    align: dict[str, Any] = field(default_factory=dict)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def leave_out(domains: list[str], held_out: list[str]) -> list[str]:
    """``${leave_out:[mnist,uci,synth],${dataset.target}}``: the domains that are not held out
    (leave-one-domain-out sweeps sweep only ``dataset.target``)."""
    return [d for d in domains if d not in held_out]


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore and register tllab's resolvers (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("leave_out", lambda domains, held_out: leave_out(list(domains), list(held_out)),
                                    replace=True)


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Refuse keys the schema does not have. Hydra adds any key given with ``+`` (``+trainer.max_stpes=5``)
    even to a typed node; only the free-form nodes (``norm``, ``regularizer``, ``align``, ``backbone.kwargs``:
    checked by their plug-in or model builder) take new keys.

    Raises:
        ConfigError: naming the unknown key and the closest known one.
    """
    typed = OmegaConf.get_type(cfg) not in (dict, None)
    known = [f.name for f in dataclasses.fields(OmegaConf.get_type(cfg))] if typed else []
    for key in cfg:
        if typed and key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            where = f"{prefix or 'top level'} keys: {', '.join(known)}"
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" ({where})"
            raise ConfigError(f"{prefix}{key} is not a config key{hint}; remove it from the command line (a key added "
                              "with + must still be one the schema knows, see tllab/schema.py).")
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none():
            check_known_keys(node, f"{prefix}{key}.")


def validate_config(cfg: TrainConfig) -> None:
    """Range checks the types cannot express; raises :class:`ConfigError` naming the key."""
    t, o, d = cfg.trainer, cfg.optim, cfg.dataset
    checks = [
        ("seed", cfg.seed, 0 <= cfg.seed < 2**32, "in [0, 2**32)"),
        ("dataset.data_seed", d.data_seed, 0 <= d.data_seed < 2**32, "in [0, 2**32)"),
        ("trainer.epochs", t.epochs, t.epochs >= 1, ">= 1"),
        ("trainer.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
        ("trainer.eval_batch_size", t.eval_batch_size, t.eval_batch_size >= 1, ">= 1"),
        ("trainer.iters_per_epoch", t.iters_per_epoch, t.iters_per_epoch is None or t.iters_per_epoch >= 1,
         ">= 1 or null"),
        ("trainer.eval_every", t.eval_every, t.eval_every is None or t.eval_every >= 1, ">= 1 or null"),
        ("trainer.max_steps", t.max_steps, t.max_steps is None or t.max_steps >= 1, ">= 1 or null"),
        ("trainer.grad_clip", t.grad_clip, t.grad_clip is None or t.grad_clip > 0, "> 0 or null"),
        ("trainer.num_workers", t.num_workers, t.num_workers is None or t.num_workers >= 0, ">= 0 or null"),
        ("trainer.devices", t.devices, t.devices >= 1, ">= 1"),
        ("optim.lr", o.lr, o.lr > 0, "> 0"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "[beta1, beta2] in [0, 1)"),
        ("optim.backbone_lr_mult", o.backbone_lr_mult, o.backbone_lr_mult >= 0, ">= 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.scheduler.warmup_steps", o.scheduler.warmup_steps, o.scheduler.warmup_steps >= 0, ">= 0"),
        ("dataset.num_classes", d.num_classes, d.num_classes is None or d.num_classes >= 2, ">= 2 or null"),
        ("dataset.image_size", d.image_size, d.image_size >= 8, ">= 8"),
        ("dataset.resize_size", d.resize_size, d.resize_size is None or d.resize_size >= d.image_size,
         f">= dataset.image_size ({d.image_size}) or null"),
        ("dataset.crop_scale", d.crop_scale, len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
         "[min, max] with 0 < min <= max <= 1"),
        ("dataset.label_offset", d.label_offset, d.label_offset >= 0, ">= 0"),
        ("dataset.mean", d.mean, len(d.mean) == 3, "one value per RGB channel ([r, g, b])"),
        ("dataset.std", d.std, len(d.std) == 3 and all(v > 0 for v in d.std), "one value > 0 per RGB channel"),
        ("backbone.dropout", cfg.backbone.dropout, 0 <= cfg.backbone.dropout < 1, "in [0, 1)"),
        ("backbone.bottleneck_dim", cfg.backbone.bottleneck_dim,
         cfg.backbone.bottleneck_dim is None or cfg.backbone.bottleneck_dim >= 1, ">= 1 or null"),
        ("backbone.head_dim", cfg.backbone.head_dim, cfg.backbone.head_dim >= 1, ">= 1"),
        ("backbone.head_codes", cfg.backbone.head_codes, cfg.backbone.head_codes >= 1, ">= 1"),
    ]
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is invalid: it must be {rule}.")
    if cfg.backbone.weights and cfg.backbone.pretrained != "imagenet":
        raise ConfigError(f"backbone.weights={cfg.backbone.weights} chooses ImageNet weights; set "
                          "backbone.pretrained=imagenet or drop backbone.weights.")
    if cfg.backbone.head == HeadName.encoding and cfg.backbone.bottleneck_dim:
        raise ConfigError("backbone.head=encoding replaces the bottleneck (its features are the normalised "
                          "encoding); drop backbone.bottleneck_dim.")
    if cfg.backbone.load_head and cfg.backbone.pretrained in (None, "imagenet"):
        raise ConfigError(f"backbone.load_head=true needs backbone.pretrained=<tllab checkpoint>, not "
                          f"{cfg.backbone.pretrained}; set backbone.pretrained or drop backbone.load_head.")
    domains = 1 if d.setting == "finetune" else len(d.source)
    if d.sampler == "domain_balanced" and t.batch_size % domains:
        raise ConfigError(f"dataset.sampler=domain_balanced needs trainer.batch_size ({t.batch_size}) to be a "
                          f"multiple of the number of training domains ({domains}).")

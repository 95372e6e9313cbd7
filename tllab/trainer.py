"""The one trainer: domain adaptation, domain generalization, fine-tuning and pretraining.

Iteration-based epochs over infinite loaders; each step draws a labelled batch (and an
unlabelled target batch when a plug-in uses one), computes cross-entropy plus every plug-in's
loss terms, and takes one optimizer step (then any further updates a plug-in asks for on the
same batch, such as MCD's). Methods change behaviour only through
:class:`tllab.plugin.Plugin` hooks; nothing here knows any single method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tllab.checkpoint import load_checkpoint, rng_state, save_atomic, seed_everything, set_rng_state
from tllab.data import DataModule, build_data, check_dataset_config
from tllab.data.loaders import ForeverLoader, eval_loader
from tllab.distributed import (
    all_gather_objects,
    all_reduce_sum,
    broadcast_tensors,
    dist_is_initialized,
    is_main,
    local_rank,
    rank,
    world_size,
)
from tllab.errors import CheckpointError, ConfigError, NonFiniteLossError
from tllab.keys import group_keys
from tllab.loggers import ResultsFile, WandbRun, write_json_atomic
from tllab.models import Classifier, create_backbone
from tllab.models.pretrained import load_head_checkpoint
from tllab.nn import convert_sync_batchnorm
from tllab.nn.functional import upcast_half
from tllab.optim import build_optimizer, build_scheduler, lr_factor
from tllab.plugin import Plugin, SetupContext, StepOutput, build_plugins, overrides_forward
from tllab.schema import AmpDtype, ForwardMode, HeadName, Precision, TrainConfig, validate_config

log = logging.getLogger("tllab")


def resolve_device(name: str, local_rank: int = 0, option: str = "trainer.device=") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; other names are checked against this machine.
    Under data parallelism a plain ``cuda`` means this process's GPU, ``cuda:<local rank>``.
    ``option`` is how error messages name the setting (``--device `` for a command-line flag)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist_is_initialized():
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{option}{name} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}{name} but CUDA is not available; use {option}cpu or auto.")
    return device


def build_model(cfg: TrainConfig, plugins: Iterable[Plugin]) -> nn.Module:
    """The run's model: backbone -> optional bottleneck -> head, then each plug-in's
    ``transform_model`` in order, head replacements first (also used to rebuild a checkpoint's model for analysis)."""
    model: nn.Module = Classifier(
        create_backbone(cfg.backbone.library, cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.weights,
                        **cfg.backbone.kwargs),
        cfg.dataset.num_classes, cfg.backbone.bottleneck_dim, cfg.backbone.dropout, cfg.backbone.freeze_bn,
        str(cfg.backbone.head), cfg.backbone.head_dim, cfg.backbone.head_codes)
    if cfg.backbone.load_head and cfg.backbone.pretrained:  # (analysis rebuilds without pretrained weights)
        load_head_checkpoint(model, cfg.backbone.pretrained)
    # the head is settled first (AFN, MCD, MDD replace it), so that plug-ins reading its width see the final one
    for plugin in sorted(plugins, key=lambda p: p.exclusive != "head"):
        model = plugin.transform_model(model)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_image_size(model: nn.Module, cfg: TrainConfig) -> None:
    """One zero image through the model in eval mode, before any data is loaded: a layer that
    cannot take ``dataset.image_size`` (a feature map reduced to one position for Batch-Instance
    Norm or DomainNorm, a pooling window larger than its input) fails here in one line."""
    size = cfg.dataset.image_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except ConfigError:
        raise  # already names its fix
    except (ValueError, RuntimeError) as e:
        norm = ",".join(cfg.norm) or "none"
        raise ConfigError(f"backbone={cfg.backbone.name} with norm={norm} cannot take {size}x{size} images "
                          f"({str(e).splitlines()[0].rstrip('.')}); set a larger dataset.image_size or choose "
                          "another backbone or norm.") from None
    finally:
        model.train(was_training)


class Trainer:
    """Builds everything a run needs from its config and trains it (see the module docstring).

    Args:
        cfg: the composed, typed config.
        run_dir: the run's output folder (checkpoints, records, summary).
        resolved: the resolved config as plain containers (saved with the run and to W&B).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, resolved: dict[str, Any]) -> None:
        self.cfg, self.run_dir, self.resolved = cfg, run_dir, resolved
        self.rank, self.world, self.main = rank(), world_size(), is_main()
        tc = cfg.trainer
        # Everything a user can get wrong in the config fails here, before any data is loaded.
        validate_config(cfg)
        seed_everything(cfg.seed, tc.deterministic)
        self.plugins: dict[str, Plugin] = {
            **{f"norm.{k}": v for k, v in build_plugins("norm", cfg.norm).items()},
            **{f"regularizer.{k}": v for k, v in build_plugins("regularizer", cfg.regularizer).items()},
            **{f"align.{k}": v for k, v in build_plugins("align", cfg.align).items()},
        }
        self._check_plugin_combination()
        check_dataset_config(cfg.dataset)
        if cfg.dataset.setting == "finetune" and not cfg.backbone.pretrained:
            log.warning("fine-tuning from random init (backbone.pretrained=null): the train-from-scratch baseline")
        self.device = resolve_device(tc.device, local_rank())
        self.keys = group_keys(cfg)
        self.dtype = getattr(torch, Precision(tc.precision).value)
        with _default_dtype(self.dtype):  # float64: a float64 checkpoint loads without rounding through float32
            model = build_model(cfg, self.plugins.values())
            check_image_size(model, cfg)
        if tc.sync_bn:
            model = convert_sync_batchnorm(model)
            for plugin in self.plugins.values():  # discriminators, extra heads (a plug-in is never a BN itself)
                convert_sync_batchnorm(plugin)
        self.model = model.to(self.device, self.dtype)
        channels_last = tc.channels_last if tc.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        broadcast_tensors(self.model.state_dict().values())  # every rank starts from rank 0's weights
        self.data: DataModule = build_data(cfg.dataset, cfg.seed)
        for plugin in self.plugins.values():
            plugin.to(self.device, self.dtype)
        self.ctx = SetupContext(self.model, self.data, self.device, run_dir, resolved)
        for plugin in self.plugins.values():
            plugin.setup(self.ctx)
        if tc.compile:  # in place: parameter names (and checkpoints) stay those of the eager model
            self.model.backbone.compile()

        plugin_groups = [g for p in self.plugins.values() for g in p.param_groups(self.model, cfg.optim.lr)]
        claimed = {id(q) for g in plugin_groups for q in g["params"]}
        groups = [{**g, "params": [q for q in g["params"] if id(q) not in claimed]}
                  for g in self.model.get_parameters(cfg.optim.lr, cfg.optim.backbone_lr_mult)]
        self.optimizer = build_optimizer(cfg.optim, [g for g in groups if g["params"]] + plugin_groups)
        global_batch = tc.batch_size * self.world
        self.iters_per_epoch = tc.iters_per_epoch or max(1, math.ceil(len(self.data.train) / global_batch))
        self.total_steps = tc.epochs * self.iters_per_epoch
        if tc.max_steps is not None:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.eval_every = tc.eval_every or self.iters_per_epoch
        self.scheduler = build_scheduler(cfg.optim.scheduler, self.optimizer, self.total_steps)
        amp_dtype = getattr(torch, AmpDtype(tc.amp_dtype).value)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if tc.amp else contextlib.nullcontext)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=tc.amp and amp_dtype == torch.float16 and self.device.type == "cuda")

        self.pin_memory = self.device.type == "cuda"
        self.prefetch = self.device.type == "cuda"  # copy the next step's batch while this step computes
        self._ahead: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None
        shard = {"num_workers": tc.num_workers, "rank": self.rank, "world": self.world, "pin_memory": self.pin_memory}
        self.source_loader = ForeverLoader(self.data.train, tc.batch_size, seed=2 * cfg.seed,
                                           balanced=cfg.dataset.sampler == "domain_balanced", **shard)
        uses_target = any(p.uses_target for p in self.plugins.values())
        self.target_loader = (ForeverLoader(self.data.unlabeled, tc.batch_size, seed=2 * cfg.seed + 1, **shard)
                              if uses_target else None)
        # Per-rank randomness (dropout, augmentation) after the identical initialization.
        seed_everything(cfg.seed + 1_000_003 * self.rank, tc.deterministic)

        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.results = ResultsFile(run_dir)
        self.per_class = ResultsFile(run_dir, "per_class.jsonl")  # split -> accuracy of each class
        self.ckpt_dir = run_dir / "checkpoints"
        self.step = 0
        self.skipped = 0  # training images left out (dataset.skip_bad_images) since the last evaluation
        self.elapsed = 0.0
        self.best: dict[str, Any] = {}
        self._maybe_resume()

    def _check_plugin_combination(self) -> None:
        forward = [n for n, p in self.plugins.items() if overrides_forward(p)]
        if len(forward) > 1:
            raise ConfigError(f"{forward[0]} and {forward[1]} both replace the forward pass; use only one of them.")
        if forward and self.cfg.trainer.forward == ForwardMode.separate:
            raise ConfigError(f"{forward[0]} replaces the forward pass, so trainer.forward=separate does not apply; "
                              "drop trainer.forward.")
        roles: dict[str, str] = {}
        for name, plugin in self.plugins.items():
            if plugin.exclusive and plugin.exclusive in roles:
                raise ConfigError(f"{roles[plugin.exclusive]} and {name} both replace the model's "
                                  f"{plugin.exclusive}; they cannot be stacked, use one of them.")
            if plugin.exclusive:
                roles[plugin.exclusive] = name
        if self.cfg.backbone.head == HeadName.encoding:
            clash = [n for n, p in self.plugins.items() if p.exclusive == "head" or p.reads_pooled_features]
            if clash:
                raise ConfigError(f"{clash[0]} needs the linear head on the backbone's pooled features (it replaces "
                                  "the head, or reads the pooled features), which backbone.head=encoding replaces; "
                                  "use one of them.")
        target = [n for n, p in self.plugins.items() if p.uses_target]
        if target and self.cfg.dataset.setting != "da":
            raise ConfigError(f"{target} need unlabelled target data; set dataset.setting=da.")

    # ---------------------------------------------------------------- checkpoints
    def _weights(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "classes": self.data.classes,
                "plugins": {n: p.state_dict() for n, p in self.plugins.items()}}

    def _state(self) -> dict[str, Any]:
        return {
            **self._weights(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": all_gather_objects(rng_state()),  # one entry per rank
            "loaders": {"source": self.source_loader.state_dict(),
                        "target": self.target_loader.state_dict() if self.target_loader else None},
            "step": self.step,
            "elapsed": self.elapsed,
            "best": self.best,
            "keys": self.keys,
            "config": self.resolved,  # the run's own config, should config.yaml be lost
        }

    def _maybe_resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            if self.cfg.trainer.resume:
                raise CheckpointError(f"trainer.resume=true but {path} does not exist; pass the run dir to resume "
                                      "as hydra.run.dir=<run dir>, or drop trainer.resume.")
            if self.main:  # records of a start killed before its first checkpoint are written again
                self.results.truncate_after(0)
                self.per_class.truncate_after(0)
            return
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            for name, plugin in self.plugins.items():
                plugin.load_state_dict(state["plugins"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} was written by a different model or method set "
                                  f"({str(e).splitlines()[0]}); resume with the run's own config "
                                  "(<run dir>/config.yaml) or use a new hydra.run.dir.") from e
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) != self.world:
            raise CheckpointError(f"{path} was written by {len(state['rng'])} process(es), this run has {self.world}; "
                                  "resume with the same number of devices.")
        set_rng_state(state["rng"][self.rank])
        self.source_loader.load_state_dict(state["loaders"]["source"])
        if self.target_loader is not None:
            self.target_loader.load_state_dict(state["loaders"]["target"])
        self.step, self.elapsed, self.best = state["step"], state["elapsed"], state["best"]
        if self.main:
            self.results.truncate_after(self.step)
            self.per_class.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def _save(self, metrics: dict[str, float]) -> None:
        if not self.cfg.trainer.save_checkpoints:
            return
        state = self._state()  # collective (gathers every rank's RNG state)
        if not self.main:
            return
        # best.pt first: a kill between the two writes resumes from the previous last.pt, which
        # redoes these steps and writes both again, so summary.json and best.pt always agree
        if self.best.get("step") == self.step:
            save_atomic({**self._weights(), "step": self.step, "metrics": metrics, "keys": self.keys},
                        self.ckpt_dir / "best.pt")
        save_atomic(state, self.ckpt_dir / "last.pt")

    # ---------------------------------------------------------------- steps
    def forward(self, x_s: Tensor, x_t: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Logits and features of source and target: one pass over ``cat([x_s, x_t])`` (BatchNorm
        normalises both domains together, as tllib's DANN/CDAN/MCC...) or, with
        ``trainer.forward=separate``, one pass per domain (each normalised with its own batch
        statistics, as tllib's AFN); a plug-in may replace the forward pass."""
        for plugin in self.plugins.values():
            if overrides_forward(plugin):
                return plugin.forward_step(self.model, x_s, x_t)
        if x_t is not None and self.cfg.trainer.forward == ForwardMode.separate:
            (logits_s, f_s), (logits_t, f_t) = self.model(x_s), self.model(x_t)
            return logits_s, f_s, logits_t, f_t
        logits, f = self.model(x_s if x_t is None else torch.cat([x_s, x_t]))
        if x_t is None:
            return logits, f, None, None
        n = len(x_s)
        return logits[:n], f[:n], logits[n:], f[n:]

    def _images(self, x: Tensor) -> Tensor:
        """Images on the device (an asynchronous copy from pinned memory on CUDA), in the weights'
        dtype and memory format."""
        return x.to(self.device, non_blocking=True).to(self.dtype, memory_format=self.memory_format)

    def _fetch(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The next labelled (and unlabelled) batch on the device."""
        x_s, y_s, d_s = next(self.source_loader)
        x_t = self._images(next(self.target_loader)[0]) if self.target_loader else None
        return self._images(x_s), y_s.to(self.device, non_blocking=True), d_s.to(self.device, non_blocking=True), x_t

    def _prefetch(self) -> None:
        """Fetch the next step's batch while this step's kernels run (CUDA), except before a
        checkpoint: the loaders' saved position must be that of the batches actually trained on."""
        upcoming = self.step + 1
        if self.prefetch and upcoming % self.eval_every and upcoming < self.total_steps:
            self._ahead = self._fetch()

    def train_step(self) -> tuple[dict[str, Tensor], Tensor]:
        """One optimizer step; returns the named loss terms and the labelled-batch accuracy."""
        (x_s, y_s, d_s, x_t), self._ahead = self._ahead or self._fetch(), None
        # dataset.skip_bad_images: unreadable images are left out of their batch
        full = self.cfg.trainer.batch_size
        self.skipped += full - len(x_s) + (full - len(x_t) if x_t is not None else 0)
        with self.autocast():
            logits_s, f_s, logits_t, f_t = self.forward(x_s, x_t)
            out = StepOutput(step=self.step, total_steps=self.total_steps, model=self.model, x_s=x_s, y_s=y_s,
                             d_s=d_s, logits_s=logits_s, f_s=f_s, x_t=x_t, logits_t=logits_t, f_t=f_t)
            terms = {"ce": F.cross_entropy(upcast_half(out.logits_s), y_s)}
            for name, plugin in self.plugins.items():
                terms.update({f"{name}/{k}": v for k, v in plugin.loss(out).items()})
            loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._prefetch()  # before the first wait on the GPU below
        self._optimizer_step(loss, terms)
        with self.autocast():  # further updates on this batch (MCD's), each through _update
            for name, plugin in self.plugins.items():
                terms.update({f"{name}/{k}": v for k, v in plugin.extra_updates(out, self._reforward,
                                                                                 self._update).items()})
        self.scheduler.step()
        for plugin in self.plugins.values():
            plugin.after_step(self.model)
        acc = (out.logits_s.argmax(1) == y_s).float().mean()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}, acc

    def _optimizer_step(self, loss: Tensor, terms: dict[str, Tensor], params: list[nn.Parameter] | None = None
                        ) -> None:
        """After the backward pass: average the gradients over ranks, stop on a non-finite loss
        (any rank), clip, and step the optimizer (parameters without a gradient do not move)."""
        params = params or [p for g in self.optimizer.param_groups for p in g["params"]]
        if self._average_gradients(params, bad_loss=not torch.isfinite(loss).item()):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            last = self.ckpt_dir / "last.pt"
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step + 1} ({values}). The last good checkpoint "
                f"{'is ' + str(last) if last.exists() else 'does not exist yet'}. Lower optim.lr, set "
                "trainer.grad_clip, or reduce the weight of the diverging loss term.")
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(params, self.cfg.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _reforward(self, out: StepOutput) -> StepOutput:
        """``out`` with logits and features of a new forward pass over its inputs (Plugin.extra_updates)."""
        logits_s, f_s, logits_t, f_t = self.forward(out.x_s, out.x_t)
        return dataclasses.replace(out, logits_s=logits_s, f_s=f_s, logits_t=logits_t, f_t=f_t)

    def _update(self, loss: Tensor, params: Sequence[nn.Parameter]) -> None:
        """One more optimizer step on this batch that moves only ``params`` (Plugin.extra_updates);
        a parameter the loss does not reach gets a zero gradient, as on every rank under DDP."""
        params = list(params)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=False):  # backward outside autocast
            grads = torch.autograd.grad(self.scaler.scale(loss), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self._optimizer_step(loss, {"extra update": loss.detach()}, params)

    def _average_gradients(self, params: list[nn.Parameter], bad_loss: bool) -> bool:
        """Data parallelism: each of ``params``' gradients becomes the mean over ranks, in one
        all-reduce (a parameter without a gradient counts as zero) that also carries each rank's
        non-finite-loss flag. Returns whether any rank's loss was not finite."""
        if self.world == 1:
            return bad_loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flag = torch.tensor([float(bad_loss)], dtype=grads[0].dtype, device=self.device)
        flat = all_reduce_sum(torch.cat([*(g.reshape(-1) for g in grads), flag]))
        if flat[-1].item() > 0:
            return True
        flat = flat[:-1].div_(self.world)
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p)
        return False

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], dict[str, list[float | None]]]:
        """Accuracy, mean per-class accuracy and mean cross-entropy on every evaluation split, and
        each split's per-class accuracies (``None`` for a class without images in the split).

        The mean per-class accuracy (VisDA-2017's "Mean") averages the classes present in the
        split. Under data parallelism each rank evaluates its part of every split (after taking
        rank 0's BatchNorm buffers) and the counts are all-reduced, so every number equals one
        process evaluating everything."""
        broadcast_tensors(self.model.buffers())
        was_training = self.model.training
        self.model.eval()
        metrics: dict[str, float] = {}
        per_class: dict[str, list[float | None]] = {}
        tc, k = self.cfg.trainer, self.cfg.dataset.num_classes
        for split, dataset in self.data.eval_splits.items():
            model = self.model
            for plugin in self.plugins.values():
                model = plugin.eval_model(model, self.ctx, split)
            model.eval()
            # loss, then per class: images, correct
            sums = torch.zeros(1 + 2 * k, dtype=torch.float64, device=self.device)
            for x, y, _ in eval_loader(dataset, tc.eval_batch_size, tc.num_workers, self.rank, self.world,
                                       self.pin_memory):
                x, y = self._images(x), y.to(self.device, non_blocking=True)
                with self.autocast():
                    logits, _ = model(x)
                sums[0] += F.cross_entropy(upcast_half(logits), y, reduction="sum").double()
                sums[1:k + 1] += torch.bincount(y, minlength=k).double()
                sums[k + 1:] += torch.bincount(y[logits.argmax(1) == y], minlength=k).double()
            sums = all_reduce_sum(sums)
            count, correct = sums[1:k + 1], sums[k + 1:]
            n, present = count.sum().item(), count > 0
            metrics[f"{split}/acc"] = correct.sum().item() / n
            metrics[f"{split}/acc_per_class_mean"] = (correct[present] / count[present]).mean().item()
            metrics[f"{split}/loss"] = sums[0].item() / n
            per_class[split] = [c / m if m else None for c, m in zip(correct.tolist(), count.tolist())]
            if self.cfg.dataset.skip_bad_images:
                metrics[f"{split}/skipped"] = len(dataset) - int(n)
        self.model.train(was_training)
        return metrics, per_class

    # ---------------------------------------------------------------- loop
    def fit(self, wandb_run: WandbRun | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (evaluating and checkpointing every ``eval_every`` steps and at
        the end), then write ``summary.json`` and the ``done`` marker; return the summary."""
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.cfg.trainer.quiet or not self.main,
                   desc="train", dynamic_ncols=True)
        try:
            with bar, logging_redirect_tqdm():  # log lines print above the progress bar
                self._train_until_done(bar, wandb_run)
        finally:
            for loader in (self.source_loader, self.target_loader):
                if loader is not None:
                    loader.close()
        return self._finish()

    def _train_until_done(self, bar: tqdm, wandb_run: WandbRun | None) -> None:
        sums: dict[str, float] = {}
        count, images, tick = 0, 0, time.perf_counter()
        while self.step < self.total_steps:
            terms, acc = self.train_step()
            self.step += 1
            count += 1
            images += self.cfg.trainer.batch_size
            for k, v in {**terms, "acc": acc}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}", acc=f"{acc.item():.3f}",
                            img_s=f"{images / max(now - tick, 1e-9):.0f}", refresh=False)
            if self.step % self.eval_every == 0 or self.step == self.total_steps:
                self.elapsed += now - tick
                means = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device))
                train = {f"train/{k}": v / count / self.world for k, v in zip(sums, means.tolist())}
                if self.cfg.dataset.skip_bad_images:  # images left out since the last evaluation
                    skipped = torch.tensor(float(self.skipped), dtype=torch.float64, device=self.device)
                    train["train/skipped"] = int(all_reduce_sum(skipped).item())
                    self.skipped = 0
                self._evaluate_and_record(train, wandb_run)
                sums, count, images, tick = {}, 0, 0, time.perf_counter()

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Diverged weights can give a finite training loss for a step or two; never checkpoint them."""
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad or not all(torch.isfinite(p).all() for p in self.model.parameters()):
            last = self.ckpt_dir / "last.pt"
            raise NonFiniteLossError(
                f"the model diverged by step {self.step} (non-finite {bad or 'weights'}); nothing was saved for "
                f"this step and the last good checkpoint {'is ' + str(last) if last.exists() else 'does not exist'}. "
                "Lower optim.lr or set trainer.grad_clip.")

    def _evaluate_and_record(self, train: dict[str, float], wandb_run: WandbRun | None) -> None:
        evaluated, per_class = self.evaluate()
        metrics = {**train, **evaluated}
        self._check_finite(metrics)
        skipped = {k.rsplit("/", 1)[0]: int(v) for k, v in metrics.items() if k.endswith("/skipped") and v}
        if skipped and self.main:
            log.warning("unreadable images left out (dataset.skip_bad_images): %s", skipped)
        lr = self.cfg.optim.lr * lr_factor(self.cfg.optim.scheduler, self.step, self.total_steps)
        record = {"step": self.step, "epoch": round(self.step / self.iters_per_epoch, 4),
                  "time": round(self.elapsed, 3), "lr": lr, **metrics, **self.keys}
        sel = self.data.selection_split
        score = metrics[f"{sel}/acc"] if sel else self.step
        if not self.best or score >= self.best["score"]:
            self.best = {"step": self.step, "score": score, "metrics": metrics}
        if self.main:
            self.results.append(record)
            self.per_class.append({"step": self.step, **per_class, "classes": self.data.classes})
            if wandb_run is not None:
                wandb_run.log({k: record[k] for k in ("step", "epoch", "lr", *metrics)})
            shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("/acc"))
            log.info("step %d/%d | %s", self.step, self.total_steps, shown)
        self._save(metrics)

    def _finish(self) -> dict[str, Any]:
        """Write ``summary.json`` and ``done`` (rank 0) and return the summary ({} on other ranks)."""
        if not self.main:
            return {}
        records = self.results.records()
        summary = {
            **self.keys,
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "time": round(self.elapsed, 3),
            "selection_split": self.data.selection_split,
            "final": {k: v for k, v in records[-1].items() if "/" in k} if records else {},
            "best": self.best,
            "num_params": sum(p.numel() for p in self.model.parameters()),
        }
        if self.cfg.dataset.skip_bad_images:  # unreadable images left out: training total, per split
            summary["skipped_images"] = {"train": sum(r.get("train/skipped", 0) for r in records),
                                         **{k.rsplit("/", 1)[0]: v for k, v in summary["final"].items()
                                            if k.endswith("/skipped") and not k.startswith("train/")}}
        write_json_atomic(self.run_dir / "summary.json", summary)
        (self.run_dir / "done").write_text("")
        return summary

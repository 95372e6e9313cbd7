"""Bi-Tuning: per-class FIFO queues, momentum key encoder, contrastive logits and losses, DDP queue
agreement, and a short fine-tuning run through the YAML."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import compose_config
from tests.dist_helpers import run_gloo
from tllab.models import Classifier
from tllab.plugin import SetupContext, StepOutput, build_plugins
from tllab.regularizer.bi_tuning import (
    BiTuning,
    classifier_contrastive_logits,
    contrastive_logits,
    contrastive_targets,
    enqueue_per_class,
    random_resized_crop,
)
from tllab.trainer import Trainer

C, FEAT = 3, 6


class TinyBackbone(nn.Sequential):
    out_features = FEAT

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, FEAT))


def make_plugin(tmp_path: Path, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[BiTuning, nn.Module]:
    torch.manual_seed(0)
    plugin = BiTuning(**{"K": 2, "projection_dim": 4, **kwargs})
    model = plugin.transform_model(Classifier(TinyBackbone(), C)).to(dtype)
    plugin.setup(SetupContext(model, None, torch.device("cpu"), tmp_path, {"seed": 0}))
    return plugin, model


def step_output(model: nn.Module, n: int = 5) -> StepOutput:
    x, y = torch.randn(n, 3, 8, 8, dtype=next(model.parameters()).dtype), torch.arange(n) % C
    logits, f = model(x)
    return StepOutput(step=0, total_steps=1, model=model, x_s=x, y_s=y, d_s=torch.zeros_like(y), logits_s=logits, f_s=f)


def sequential_enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor) -> None:
    """tllib's order: one sample at a time."""
    for key, c in zip(keys, labels.tolist()):
        queue[:, c, ptr[c]] = key
        ptr[c] = (ptr[c] + 1) % queue.shape[2]


def test_enqueue_is_fifo_per_class_with_wrap_around():
    queue, ptr = torch.zeros(1, 2, 3), torch.zeros(2, dtype=torch.long)
    # class 0 gets keys 1, 3, 4, 5: key 1 (slot 0) is overwritten by key 5 after wrapping around
    enqueue_per_class([queue], ptr, [torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])], torch.tensor([0, 1, 0, 0, 0]))
    assert queue[0].tolist() == [[5.0, 3.0, 4.0], [2.0, 0.0, 0.0]] and ptr.tolist() == [1, 1]
    enqueue_per_class([queue], ptr, [torch.tensor([[6.0], [7.0], [8.0]])], torch.tensor([0, 0, 1]))
    assert queue[0].tolist() == [[5.0, 6.0, 7.0], [2.0, 8.0, 0.0]] and ptr.tolist() == [0, 2]


def test_enqueue_matches_sample_by_sample_order():
    g = torch.Generator().manual_seed(1)
    queue, ptr = torch.randn(4, 3, 5, generator=g), torch.tensor([0, 3, 4])
    ref_queue, ref_ptr = queue.clone(), ptr.clone()
    for n in (1, 7, 16):  # 16 samples over 3 classes: some class gets more than K=5
        keys, labels = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        enqueue_per_class([queue], ptr, [keys], labels)
        sequential_enqueue(ref_queue, ref_ptr, keys, labels)
        assert torch.equal(queue, ref_queue) and torch.equal(ptr, ref_ptr)


def test_contrastive_logits_hand_computed():
    # C=2, K=2, D=2; queue[:, c, k]: class 0 = [0,1], [1,0]; class 1 = [-1,0], [0,-1]
    queue = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, -1.0]]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([1, 0])
    logits = contrastive_logits(q, k, queue, labels, T=0.5)
    # rows: [q.k, own-class slots 0..1, other-class slots 0..1] / T
    raw = torch.tensor([[1.0, -1.0, 0.0, 0.0, 1.0], [0.8, 1.0, 0.0, 0.0, -1.0]]) / 0.5
    assert logits.shape == (2, 1 + 2 * 2)
    torch.testing.assert_close(logits, raw.log_softmax(1))
    target = contrastive_targets(2, 2, 2)
    torch.testing.assert_close(target, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]] * 2))
    # KL(t || p) = sum_{j<=K} (1/3)(log(1/3) - log p_j), averaged over the batch
    expected = sum(math.log(1 / 3) - sum(r[:3]) / 3 + math.log(sum(math.exp(v) for v in r))
                   for r in raw.tolist()) / 2
    assert F.kl_div(logits, target, reduction="batchmean").item() == pytest.approx(expected, rel=1e-6)


def test_classifier_contrastive_logits_hand_computed():
    # F+1 = 2; prototypes w_0 = [1, 0], w_1 = [0, 1]; the sample's score uses only its own class's w
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = torch.tensor([[[0.5, 0.1], [0.2, 0.3]], [[0.4, 0.6], [0.7, 0.9]]])  # (F+1, C, K)
    hn = torch.tensor([[0.6, 0.8]])
    logits = classifier_contrastive_logits(hn, prototypes, queue, torch.tensor([1]), T=1.0)
    # label 1: [hn.w_1, queue[:,1,:].w_1, queue[:,0,:].w_1] = [0.8, 0.7, 0.9, 0.4, 0.6]
    torch.testing.assert_close(logits, torch.tensor([[0.8, 0.7, 0.9, 0.4, 0.6]]).log_softmax(1))


def test_random_resized_crop_is_seeded_and_identity_at_full_scale():
    x = torch.randn(3, 3, 8, 8)
    a = random_resized_crop(x, generator=torch.Generator().manual_seed(0))
    b = random_resized_crop(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    torch.testing.assert_close(random_resized_crop(x, (1.0, 1.0), (1.0, 1.0)), x, atol=1e-5, rtol=0)
    flipped = random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), flip=True, generator=torch.Generator().manual_seed(3))
    assert all(torch.allclose(f, x_i, atol=1e-5) or torch.allclose(f, x_i.flip(-1), atol=1e-5)
               for f, x_i in zip(flipped, x))


def test_loss_gradients_reach_query_and_projector_only(tmp_path):
    plugin, model = make_plugin(tmp_path)
    queues = [plugin.queue_h.clone(), plugin.queue_z.clone()]
    terms = plugin.loss(step_output(model))
    assert set(terms) == {"contrastive", "classifier_contrastive"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.projector.parameters())
    keys = [*plugin.key_model.parameters(), *plugin.key_projector.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in keys)
    assert not plugin.queue_h.requires_grad and not plugin.queue_z.requires_grad
    assert plugin.queue_ptr.tolist() == [0, 0, 1]  # 5 samples, labels 0 1 2 0 1, K=2
    assert not torch.equal(plugin.queue_h, queues[0]) and not torch.equal(plugin.queue_z, queues[1])
    # the projector trains at 0.1x; the head's prototypes get no gradient from the classifier contrast
    assert plugin.param_groups(model, 0.01) == [
        {"params": list(plugin.projector.parameters()), "lr": pytest.approx(0.001), "name": "projector"}]


def test_terms_are_float64_for_a_float64_model_and_float32_under_bfloat16_autocast(tmp_path):
    plugin, model = make_plugin(tmp_path, torch.float64)
    assert {t.dtype for t in plugin.loss(step_output(model)).values()} == {torch.float64}
    plugin, model = make_plugin(tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in plugin.loss(step_output(model)).values()} == {torch.float32}


def test_key_encoder_follows_the_momentum_rule(tmp_path):
    plugin, model = make_plugin(tmp_path, m=0.75)
    queries = [*model.parameters(), *plugin.projector.parameters()]
    keys = [*plugin.key_model.parameters(), *plugin.key_projector.parameters()]
    assert all(torch.equal(q, k) for q, k in zip(queries, keys))  # a copy at setup
    opt = torch.optim.SGD(queries, lr=0.5)
    sum(plugin.loss(step_output(model)).values()).backward()
    opt.step()
    before = [k.detach().clone() for k in keys]
    plugin.after_step(model)
    moved = [not torch.equal(b, q) for b, q in zip(before, queries)]
    assert any(moved)
    for b, q, k in zip(before, queries, keys):
        torch.testing.assert_close(k, 0.75 * b + 0.25 * q.detach(), rtol=0, atol=1e-7)


def test_yaml_composes_with_every_option():
    node = compose_config(["regularizer=bi_tuning"]).regularizer
    assert dict(node.bi_tuning) == {
        "_target_": "tllab.regularizer.bi_tuning.BiTuning", "weight": 1.0, "K": 40, "m": 0.999, "T": 0.07,
        "projection_dim": 128, "projector_lr_mult": 0.1, "head_init_std": 0.01, "crop_scale": [0.2, 1.0],
        "crop_ratio": [0.75, 4 / 3], "flip": False}
    plugin = build_plugins("regularizer", OmegaConf.to_container(node))["bi_tuning"]
    assert isinstance(plugin, BiTuning) and plugin.crop_scale == (0.2, 1.0)


def _ddp_enqueue_worker(rank: int, world: int, out_dir: str) -> None:
    plugin, _ = make_plugin(Path(out_dir))
    g = torch.Generator().manual_seed(10 + rank)
    n = 3 if rank == 0 else 4  # uneven local batches
    hn, z = torch.randn(n, FEAT + 1, generator=g), torch.randn(n, 4, generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    torch.save({"local": (hn, z, labels), "queues": (plugin.queue_h, plugin.queue_z, plugin.queue_ptr)},
               Path(out_dir) / f"before{rank}.pt")
    plugin.enqueue(hn, z, labels)
    torch.save((plugin.queue_h, plugin.queue_z, plugin.queue_ptr), Path(out_dir) / f"after{rank}.pt")


def test_ddp_queues_identical_and_equal_to_one_process(tmp_path):
    run_gloo(_ddp_enqueue_worker, 2, tmp_path, str(tmp_path))
    before = [torch.load(tmp_path / f"before{r}.pt") for r in range(2)]
    after = [torch.load(tmp_path / f"after{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*after))
    plugin, _ = make_plugin(tmp_path)
    queues = (plugin.queue_h, plugin.queue_z, plugin.queue_ptr)
    assert all(torch.equal(a, b) for a, b in zip(before[0]["queues"], queues))  # same start on every rank
    hn, z, labels = (torch.cat(parts) for parts in zip(*(b["local"] for b in before)))
    plugin.enqueue(hn, z, labels)
    assert all(torch.equal(a, b) for a, b in zip(after[0], queues))


def test_finetune_run_logs_both_terms_and_resumes_queues(train_run, pretrained, tmp_path, monkeypatch):
    ft = ["experiment=digits_finetune", f"backbone.pretrained={pretrained()}",
          "regularizer=bi_tuning", "trainer.max_steps=3", "trainer.eval_every=2"]
    original = Trainer.train_step

    def crash_at_step_2(self):
        if self.step == 2:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_run(*ft, run_dir=tmp_path / "ft")
    last = tmp_path / "ft/checkpoints/last.pt"
    saved = torch.load(last, weights_only=True)["plugins"]["regularizer.bi_tuning"]
    assert saved["queue_h"].shape[1:] == saved["queue_z"].shape[1:] == (10, 40)
    assert saved["queue_ptr"].sum().item() == 2 * 32  # 2 steps x batch 32, no class reached K=40 yet
    assert any(k.startswith("key_model.") for k in saved) and "_extra_state" in saved
    monkeypatch.setattr(Trainer, "train_step", original)
    summary = train_run(*ft, run_dir=tmp_path / "ft")  # resumes at step 2
    for term in ("contrastive", "classifier_contrastive"):
        assert math.isfinite(summary["final"][f"train/regularizer.bi_tuning/{term}"])
    state = torch.load(last, weights_only=True)["plugins"]["regularizer.bi_tuning"]
    ptr = state["queue_ptr"]
    assert ptr.sum().item() == 3 * 32  # continued from the saved pointers
    untouched = torch.arange(40)[None, :] < saved["queue_ptr"][:, None]  # slots written in steps 1-2
    assert torch.equal(state["queue_z"][:, untouched], saved["queue_z"][:, untouched])
    assert not torch.equal(state["key_model.head.weight"], saved["key_model.head.weight"])

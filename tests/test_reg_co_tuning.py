"""Co-Tuning (tllab/regularizer/co_tuning.py) and the source head of a checkpoint without bottleneck."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import compose_config
from tllab.models import Classifier, create_backbone
from tllab.plugin import StepOutput
from tllab.regularizer import co_tuning
from tllab.regularizer.co_tuning import CoTuning, relationship_from_probabilities, soft_cross_entropy
from tllab.regularizer.source import load_source_head
from tllab.train import resolve_config
from tllab.trainer import Trainer


@pytest.fixture
def source_ckpt(pretrained) -> Path:
    """A 2-step digits pretraining run (no bottleneck: the head acts on the backbone features)."""
    return pretrained()


def co_tuning_trainer(ckpt: Path, run_dir: Path, *overrides: str) -> Trainer:
    cfg, resolved = resolve_config(compose_config(["experiment=digits_finetune", f"backbone.pretrained={ckpt}",
                                                   "regularizer=co_tuning", "trainer.quiet=true", *overrides]))
    return Trainer(cfg, run_dir, resolved)


def test_source_head_without_bottleneck_reproduces_the_pretraining_model(source_ckpt):
    from tllab.analysis import load_run

    _, model = load_run(source_ckpt)
    head, classes = load_source_head({"pretrained": str(source_ckpt)})
    assert [name for name, _ in head.named_children()] == ["head"] and len(classes) == 10
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(model.backbone(x)), model(x)[0])


def test_relationship_hand_computed_on_a_toy():
    probs = torch.tensor([[0.5, 0.3, 0.2],
                          [0.1, 0.6, 0.3],
                          [0.0, 0.0, 1.0],
                          [0.2, 0.2, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2, 0])
    rel = relationship_from_probabilities(probs, labels, num_classes=4)
    expected = torch.tensor([[0.8 / 3, 1.1 / 3, 1.1 / 3],  # mean of rows 0, 1, 3
                             [1 / 3, 1 / 3, 1 / 3],        # no sample of class 1: uniform
                             [0.0, 0.0, 1.0],
                             [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(rel, expected)
    torch.testing.assert_close(rel.sum(1), torch.ones(4, dtype=torch.float64))


def test_soft_cross_entropy_hand_values():
    assert soft_cross_entropy(torch.zeros(1, 4), torch.tensor([[0.5, 0.5, 0.0, 0.0]])).item() == pytest.approx(
        math.log(4))
    # logits (ln 1, ln 3): softmax (1/4, 3/4); target (1/2, 1/2): -(1/2 ln 1/4 + 1/2 ln 3/4)
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) + math.log(2)) / 2
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert (CoTuning().weight, CoTuning().source_lr_mult) == (2.3, 0.1)


def test_setup_relationship_cache_param_group_and_loss(source_ckpt, tmp_path, monkeypatch):
    tr = co_tuning_trainer(source_ckpt, tmp_path / "run", "optim.lr=0.01")
    ct = tr.plugins["regularizer.co_tuning"]
    rel = ct.relationship
    assert rel.shape == (10, 10) and torch.allclose(rel.sum(1), torch.ones(10))

    # Hand computation from the pretrained model in eval mode over the labelled training set.
    from tllab.analysis import load_run

    _, pretrained = load_run(source_ckpt)
    x, y, _ = tr.data.train.__getitems__(range(len(tr.data.train)))
    with torch.no_grad():
        p = F.softmax(pretrained(x)[0].double(), 1)
    expected = torch.stack([p[y == c].mean(0) for c in range(10)])
    torch.testing.assert_close(rel.double(), expected, rtol=1e-5, atol=1e-6)

    # The trained source head: its own optimizer group at source_lr_mult * lr, in no other group.
    (group,) = [g for g in tr.optimizer.param_groups if g.get("name") == "source_head"]
    assert group["lr"] == pytest.approx(0.1 * 0.01)
    assert {id(p) for p in group["params"]} == {id(p) for p in ct.source_head.parameters()}
    others = {id(p) for g in tr.optimizer.param_groups if g is not group for p in g["params"]}
    assert not others & {id(p) for p in group["params"]}

    # The loss term equals weight * soft cross-entropy of the source head on the backbone features.
    x, y, d = next(tr.source_loader)
    logits, f = tr.model(x)
    term = ct.loss(StepOutput(0, 2, tr.model, x, y, d, logits, f))["co_tuning"]
    with torch.no_grad():
        z = ct.source_head(tr.model.backbone(x))
    hand = 2.3 * (-(rel[y] * F.log_softmax(z, 1)).sum(1)).mean()
    assert term.item() == pytest.approx(hand.item(), rel=1e-5)
    term.backward()
    assert all(p.grad is not None for p in ct.source_head.parameters())
    assert all(p.grad is not None for p in tr.model.backbone.parameters())

    # Cached in the run dir and reused: a second setup must not compute it again.
    assert (tmp_path / "run" / co_tuning.CACHE_FILE).is_file()

    def fail(*args, **kwargs):
        raise AssertionError("the relationship was recomputed")

    monkeypatch.setattr(co_tuning, "source_probabilities", fail)
    ct.setup(tr.ctx)
    torch.testing.assert_close(ct.relationship, rel, rtol=0, atol=0)
    assert len(tr.model.backbone._forward_hooks) == 1  # re-running setup keeps one hook


def test_other_ranks_take_rank_0s_relationship(source_ckpt, tmp_path, monkeypatch):
    """Only rank 0 computes (and caches) the relationship; the others receive it."""
    from tllab.plugin import SetupContext

    shared = torch.full((10, 10), 0.1, dtype=torch.float64)
    monkeypatch.setattr(co_tuning, "is_main", lambda: False)
    monkeypatch.setattr(co_tuning, "broadcast_object", lambda obj: shared if obj is None else None)
    monkeypatch.setattr(co_tuning, "source_probabilities", lambda *a, **k: pytest.fail("computed on rank 1"))
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    ct = CoTuning()
    config = {"backbone": {"pretrained": str(source_ckpt)}, "dataset": {"num_classes": 10}}
    ct.setup(SetupContext(model, None, torch.device("cpu"), tmp_path, config))
    torch.testing.assert_close(ct.relationship, shared.float())
    assert not (tmp_path / co_tuning.CACHE_FILE).exists()


def test_co_tuning_yaml_trains_and_the_checkpoint_holds_the_source_head_once(source_ckpt, train_run, tmp_path):
    from tllab.analysis import load_run

    summary = train_run("experiment=digits_finetune", f"backbone.pretrained={source_ckpt}", "regularizer=co_tuning",
                        "trainer.max_steps=2", run_dir=tmp_path / "ft")
    assert summary["steps"] == 2 and summary["final"]["train/regularizer.co_tuning/co_tuning"] > 0
    assert (tmp_path / "ft" / co_tuning.CACHE_FILE).is_file()
    state = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)
    plain = Classifier(create_backbone("tllab", "digits_cnn"), 10).state_dict()
    assert state["model"].keys() == plain.keys()
    assert set(state["plugins"]["regularizer.co_tuning"]) == {"source_head.head.weight", "source_head.head.bias"}
    # the source head was trained (0.1x lr) and still maps the same features to 10 source classes
    source = torch.load(source_ckpt, weights_only=True)["model"]["head.weight"]
    assert not torch.equal(state["plugins"]["regularizer.co_tuning"]["source_head.head.weight"], source)
    _, model = load_run(tmp_path / "ft")  # analysis rebuilds the model without the plug-in's setup
    assert isinstance(model.head, nn.Linear)


def test_soft_cross_entropy_of_float64_logits_is_float64_and_half_logits_are_upcast():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, dtype=torch.float64, generator=g)
    target = torch.rand(4, 5, dtype=torch.float64, generator=g)
    target /= target.sum(1, keepdim=True)
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    hand = -(target * log_p).sum() / 4
    torch.testing.assert_close(soft_cross_entropy(logits, target), hand, rtol=0, atol=1e-12)
    assert soft_cross_entropy(logits.bfloat16(), target.float()).dtype == torch.float32


def test_a_float64_run_keeps_a_float64_source_head_exactly(pretrained, tmp_path):
    ckpt = pretrained("trainer.precision=float64")
    stored = torch.load(ckpt, weights_only=True)["model"]
    assert not torch.equal(stored["head.weight"].float().double(), stored["head.weight"])  # float32 would round
    ct = co_tuning_trainer(ckpt, tmp_path / "run", "trainer.precision=float64").plugins["regularizer.co_tuning"]
    for k, v in ct.source_head.state_dict().items():
        torch.testing.assert_close(v, stored[k], rtol=0, atol=0, msg=k)  # dtype included
    assert ct.relationship.dtype == torch.float64

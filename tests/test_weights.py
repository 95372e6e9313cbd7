"""ImageNet weights by name (torchvision, IBN-Net, timm), local state dicts and MoCo checkpoints,
all offline: weights are planted in temporary caches and must arrive; missing ones give one line."""

from __future__ import annotations

import urllib.error

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from torch import nn
from torchvision import models as tvm

from tllab.errors import CheckpointError, ConfigError
from tllab.models import create_backbone, verify
from tllab.models.verify import PHOTOS, check_imagenet
from tllab.models.weights import IBN_FILES, WeightsError, imagenet_backbone
from tllab.regularizer.source import load_source_head


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME with downloads refused (CI may reach download.pytorch.org)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _plant(model: nn.Module, path) -> dict[str, torch.Tensor]:
    """Save ``model``'s state dict with recognisable values (every tensor a constant by position)."""
    state = {k: torch.full_like(v, 0.01 * i) if v.is_floating_point() else v
             for i, (k, v) in enumerate(model.state_dict().items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_torchvision_weights_load_from_torch_home_under_torchvisions_file_name(torch_home):
    planted = _plant(tvm.resnet18(), torch_home / "resnet18-f37072fd.pth")  # IMAGENET1K_V1's file
    backbone, head = imagenet_backbone("torchvision", "resnet18")
    assert backbone.out_features == 512 and isinstance(backbone.fc, nn.Identity)
    assert torch.equal(backbone.conv1.weight, planted["conv1.weight"])
    assert torch.equal(backbone.layer4[1].bn2.running_var, planted["layer4.1.bn2.running_var"])
    assert torch.equal(head.weight, planted["fc.weight"]) and head.weight.shape == (1000, 512)
    via_config = create_backbone("torchvision", "resnet18", pretrained="imagenet")
    assert torch.equal(via_config.conv1.weight, planted["conv1.weight"])


def test_torchvision_weights_can_be_chosen_by_name(torch_home):
    planted = _plant(tvm.resnet50(), torch_home / "resnet50-11ad3fa6.pth")  # IMAGENET1K_V2's file
    backbone = create_backbone("torchvision", "resnet50", pretrained="imagenet", weights="IMAGENET1K_V2")
    assert torch.equal(backbone.conv1.weight, planted["conv1.weight"])
    with pytest.raises(WeightsError, match="resnet50-0676ba61.pth is not in"):  # V1 is not planted
        create_backbone("torchvision", "resnet50", pretrained="imagenet")
    with pytest.raises(ConfigError, match=r"no weights 'IMAGENET1K_V9' for resnet50.*'IMAGENET1K_V1', 'IMAGENET1K_V2'"):
        create_backbone("torchvision", "resnet50", pretrained="imagenet", weights="IMAGENET1K_V9")


def test_missing_torchvision_weights_give_one_line_with_file_cache_and_fetch_command(torch_home):
    with pytest.raises(WeightsError) as err:
        create_backbone("torchvision", "resnet18", pretrained="imagenet")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"resnet18-f37072fd.pth is not in {torch_home}" in msg
    assert "curl -L -o resnet18-f37072fd.pth https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "network disabled in tests" in msg and "backbone.pretrained=<file>" in msg
    assert not torch_home.exists() or not any(torch_home.iterdir())  # nothing half-written


def test_corrupt_cached_weights_name_the_file_to_delete(torch_home):
    torch_home.mkdir(parents=True)
    (torch_home / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="resnet18-f37072fd.pth are unreadable.*delete the file"):
        create_backbone("torchvision", "resnet18", pretrained="imagenet")


@pytest.mark.parametrize("name", ["resnet18_ibn_a", "resnet18_ibn_b"])
def test_ibn_net_released_weights_load_into_tllab_ibn_resnets(torch_home, name):
    full = create_backbone("tllab", name)
    full.fc = nn.Linear(512, 1000)  # IBN-Net's files are whole models, fc included
    planted = _plant(full, torch_home / IBN_FILES[name])
    backbone, head = imagenet_backbone("tllab", name)
    assert set(backbone.state_dict()) == set(planted) - {"fc.weight", "fc.bias"}
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, planted[key]), key
    assert torch.equal(head.bias, planted["fc.bias"])
    with pytest.raises(ConfigError, match="IBN-Net released one set"):
        imagenet_backbone("tllab", name, weights="IMAGENET1K_V2")


def test_weights_that_do_not_fit_the_built_layers_say_which_setting_to_drop(torch_home):
    full = create_backbone("tllab", "resnet18_ibn_a")
    full.fc = nn.Linear(512, 1000)
    _plant(full, torch_home / IBN_FILES["resnet18_ibn_a"])
    with pytest.raises(CheckpointError, match="weights of resnet18_ibn_a do not fit.*drop the backbone.kwargs"):
        imagenet_backbone("tllab", "resnet18_ibn_a", ratio=0.25)


def test_models_without_imagenet_weights_are_refused_by_name():
    with pytest.raises(ConfigError, match="no ImageNet weights for tllab model 'digits_cnn'"):
        create_backbone("tllab", "digits_cnn", pretrained="imagenet")
    with pytest.raises(ConfigError, match=r"timm has no pretrained weights 'resnet18.nope'.*'a1_in1k'"):
        create_backbone("timm", "resnet18", pretrained="imagenet", weights="nope")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A private Hugging Face hub cache in offline mode (timm's own mechanism, no network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


def test_timm_weights_load_from_the_hugging_face_cache_offline(hf_cache):
    model = timm.create_model("resnet18", num_classes=1000)
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    repo = hf_cache / "models--timm--resnet18.a1_in1k"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(state, str(repo / "snapshots" / revision / "model.safetensors"))

    backbone, head = imagenet_backbone("timm", "resnet18", "a1_in1k")
    assert backbone.num_classes == 0 and backbone.out_features == 512
    assert (backbone.conv1.weight == 0.5).all() and (head.weight == 0.5).all()
    assert (create_backbone("timm", "resnet18", "imagenet").layer1[0].conv1.weight == 0.5).all()  # default tag


def test_missing_timm_weights_give_one_line_with_repo_cache_and_fetch_command(hf_cache):
    with pytest.raises(WeightsError) as err:
        create_backbone("timm", "resnet18", pretrained="imagenet", weights="a1_in1k")
    msg = str(err.value)
    assert "\n" not in msg
    assert "ImageNet weights for timm resnet18.a1_in1k are not cached and cannot be downloaded" in msg
    assert f"timm/resnet18.a1_in1k (model.safetensors) in the Hugging Face cache {hf_cache}/models--timm--" in msg
    assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in msg
    assert "models--timm--resnet18.a1_in1k" in msg


def test_imagenet_source_head_of_a_torchvision_backbone(torch_home):
    planted = _plant(tvm.resnet18(), torch_home / "resnet18-f37072fd.pth")
    head, classes = load_source_head({"library": "torchvision", "name": "resnet18", "pretrained": "imagenet"})
    assert torch.equal(head.head.weight, planted["fc.weight"])
    assert len(classes) == 1000 and classes[285] == "Egyptian cat"


# ------------------------------------------------------------------------------------------ local files


def test_full_torchvision_and_timm_state_dicts_load_without_their_classifier(tmp_path):
    planted = _plant(tvm.resnet18(), tmp_path / "tv.pth")
    backbone = create_backbone("torchvision", "resnet18", pretrained=str(tmp_path / "tv.pth"))
    assert torch.equal(backbone.layer2[0].downsample[1].weight, planted["layer2.0.downsample.1.weight"])
    planted = _plant(timm.create_model("mobilenetv3_small_050"), tmp_path / "timm.pth")  # classifier: "classifier"
    backbone = create_backbone("timm", "mobilenetv3_small_050", pretrained=str(tmp_path / "timm.pth"))
    assert torch.equal(backbone.conv_stem.weight, planted["conv_stem.weight"])


def test_moco_checkpoint_loads_its_query_encoder_without_the_projection(tmp_path):
    """MoCo v2 layout: ``module.encoder_q.*`` with an MLP ``fc.0``/``fc.2``, plus the key encoder
    and the queue, under ``state_dict`` (tllib's convert_moco_to_pretrained.py keeps encoder_q)."""
    query = tvm.resnet18()
    query.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    q_state = {k: torch.full_like(v, 0.01 * i) if v.is_floating_point() else v
               for i, (k, v) in enumerate(query.state_dict().items())}
    torch.save({"epoch": 200, "arch": "resnet18", "optimizer": {},
                "state_dict": {**{f"module.encoder_q.{k}": v for k, v in q_state.items()},
                               **{f"module.encoder_k.{k}": -torch.ones_like(v) for k, v in q_state.items()},
                               "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1)}},
               tmp_path / "moco_v2_200ep.pth.tar")
    backbone = create_backbone("torchvision", "resnet18", pretrained=str(tmp_path / "moco_v2_200ep.pth.tar"))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, q_state[key]), key


# ------------------------------------------------------------------------------- weights, verified


def test_efficientnet_lite0_weights_put_skimage_photos_in_their_classes_with_timms_preprocessing(capsys):
    """The offline EfficientNet-Lite0 as tllab loads it, preprocessed as its pretrained config says
    (timm's resolve_data_config: 224 px, bicubic, crop 0.875, mean = std = 0.5)."""
    backbone, _ = imagenet_backbone("timm", "tf_efficientnet_lite0")
    config = resolve_data_config({}, model=backbone)
    assert config["input_size"] == (3, 224, 224) and config["mean"] == (0.5, 0.5, 0.5)
    top5 = check_imagenet("timm", "tf_efficientnet_lite0")
    assert top5["chelsea"][0] in PHOTOS["chelsea"] and top5["coffee"][0] in PHOTOS["coffee"]
    verify.main(["check", "timm", "tf_efficientnet_lite0"])
    out = capsys.readouterr().out
    assert "chelsea: ok: tiger cat (282), Egyptian cat (285)" in out and "coffee: ok: espresso (967)" in out


def test_torchvision_weights_are_checked_with_torchvisions_preprocessing(torch_home, capsys):
    """Random weights planted as ResNet-18's: loaded, but they do not know a cat; `where` names the file."""
    _plant(tvm.resnet18(), torch_home / "resnet18-f37072fd.pth")
    with pytest.raises(SystemExit, match="misclassify a photo"):
        verify.main(["check", "torchvision", "resnet18"])
    assert "chelsea: WRONG" in capsys.readouterr().out
    verify.main(["where", "torchvision", "resnet50", "--weights", "IMAGENET1K_V2"])
    assert capsys.readouterr().out == (f"{torch_home}/resnet50-11ad3fa6.pth; fetch it with `curl -L -o "
                                       "resnet50-11ad3fa6.pth https://download.pytorch.org/models/resnet50-11ad3fa6.pth`\n")
    verify.main(["where", "tllab", "resnet50_ibn_b"])
    assert "resnet50_ibn_b-9ca61e85.pth" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="tllab-weights: error: no ImageNet weights for tllab model 'digits_cnn'"):
        verify.main(["check", "tllab", "digits_cnn"])

